"""Claims report: the spike-to-sink mechanism as a table of checks that hold or do not, per model.

Each row states one link of the chain described in :mod:`tl_spikesink.mechanism` (SiLU regime,
SwiGLU quadratic form, RMSNorm bound and near-constant representations, sink geometry,
short-range bias, head decomposition), the value measured on the given texts, the threshold it
is judged against, and the verdict. A link the model cannot have (no gated MLP, no RMSNorm, no
spike at all, no spike token in the texts, causal attention) gives a "not applicable" row with
the reason instead of an error, so the table can be run on any TransformerLens model.

Thresholds are ours, set from the reconstruction: "near identity" is a cosine of at least 0.9,
"dominates" is at least half of the energy, a quadratic prediction within 25 % counts as
reproducing the spike. Comparisons with other tokens or heads are strict inequalities.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from tl_spikesink.anatomy import Anatomy
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.mechanism import captures as mech
from tl_spikesink.mechanism.attention import short_range, sink_geometry
from tl_spikesink.mechanism.first_tokens import STATIC_TOLERANCE, first_tokens
from tl_spikesink.mechanism.heads import head_decomposition
from tl_spikesink.mechanism.locality import locality
from tl_spikesink.mechanism.mlp import quadratic_from, quadratic_names, silu_from, silu_names
from tl_spikesink.mechanism.representations import representation_names, representations_from

Verdict = Literal["holds", "does not hold", "not applicable"]

OURS_SHORT_RANGE = "(our metric) without the sink key, sink heads attend more locally"
WINDOW_SHARE = "sink heads keep more of their non-sink attention in the recent window"
WINDOW_CAUSAL = "restricting sink heads to the first token + recent window moves the loss less"
FIRST_TOKEN_CLAIMS = {
    "static": "Eq. 22: the first token's head outputs are h̃₀W_V + b_V: largest relative error",
    "self_sink": "delimiters attend to themselves more than other tokens in early layers",
    "scale": "delimiter embeddings are more collinear with the first norm's gain: mean cos",
}


@dataclass(frozen=True)
class Claim:
    """One row of the claims table."""

    link: str
    """Mechanism link: "silu", "quadratic", "rmsnorm", "sink", "short-range", "heads"."""
    claim: str
    measured: float | None
    """The measured value (None when not applicable)."""
    threshold: str
    """What `measured` is judged against, e.g. "≥ 0.9" or "> 0.31 (other tokens)"."""
    verdict: Verdict
    note: str = ""
    """Context: the comparison value, or why the claim does not apply."""


@dataclass(frozen=True)
class ClaimsTable:
    """Verdicts on the mechanism's claims for one model and corpus."""

    model: str
    n_tokens: int
    n_spike_tokens: int | None
    """Spike tokens found in the analysed texts (None when the scan found no spike)."""
    rows: tuple[Claim, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: {"model", "n_tokens", "n_spike_tokens", "rows": [...]}."""
        return {
            "model": self.model,
            "n_tokens": self.n_tokens,
            "n_spike_tokens": self.n_spike_tokens,
            "rows": [asdict(r) for r in self.rows],
        }

    def __str__(self) -> str:
        head = ("link", "claim", "measured", "threshold", "verdict", "note")
        body = [
            (
                r.link,
                r.claim,
                "—" if r.measured is None else f"{r.measured:.4g}",
                r.threshold,
                r.verdict,
                r.note,
            )
            for r in self.rows
        ]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

        def line(row: tuple[str, ...]) -> str:
            return " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()

        title = (
            f"claims for {self.model} ({self.n_tokens} tokens, {self.n_spike_tokens} spike tokens)"
        )
        return "\n".join([title, line(head), "-+-".join("-" * w for w in widths), *map(line, body)])


def _at_least(link: str, claim: str, value: float, bound: float, note: str = "") -> Claim:
    return Claim(
        link, claim, value, f"≥ {bound:g}", "holds" if value >= bound else "does not hold", note
    )


def _at_most(link: str, claim: str, value: float, bound: float, note: str = "") -> Claim:
    return Claim(
        link, claim, value, f"≤ {bound:g}", "holds" if value <= bound else "does not hold", note
    )


def _above(link: str, claim: str, value: float, other: float, what: str) -> Claim:
    return Claim(
        link, claim, value, f"> {other:.4g} ({what})", "holds" if value > other else "does not hold"
    )


def _below(link: str, claim: str, value: float, other: float, what: str) -> Claim:
    return Claim(
        link, claim, value, f"< {other:.4g} ({what})", "holds" if value < other else "does not hold"
    )


def _guarded(link: str, claims: tuple[str, ...], build: Callable[[], list[Claim]]) -> list[Claim]:
    """Rows from `build`, or one "not applicable" row per claim when the model lacks a part."""
    try:
        return build()
    except SpikeSinkError as e:
        return [Claim(link, c, None, "—", "not applicable", str(e)) for c in claims]


def claims(
    model: Any,
    texts: mech.Texts | None = None,
    scan: Any = None,
    *,
    max_tokens: int = mech.DEFAULT_MAX_TOKENS,
    seed: int = 0,
) -> ClaimsTable:
    """Check every link of the spike → sink mechanism on `model` and tabulate the verdicts.

    Args:
        model: a TransformerLens model; only read (hooks are removed, parameters untouched).
        texts: strings or a :class:`~tl_spikesink.Corpus`; None reads the default offline corpus.
        scan: the model's scan (spike layer, channels, cut, sink heads); run on `texts` if None.
        max_tokens: tokens read from raw texts (two forward passes over them).
        seed: seed of the random channel and token samples.

    Returns:
        A :class:`ClaimsTable`; `print(table)` renders it, `table.to_dict()` is JSON-ready.
    """
    from tl_spikesink.corpus import default_texts

    corpus = mech.as_corpus(model, default_texts() if texts is None else texts, max_tokens)
    scan = mech.scan_of(model, corpus, scan)
    rows: list[Claim] = []
    n_spike: int | None = None
    state: dict[str, Any] = {}

    def site() -> mech.SpikeSite:
        if "site" not in state:
            state["site"] = mech.spike_site(scan)
        return state["site"]

    def captured() -> Any:
        # One pass for the SiLU, quadratic and representation links together.
        if "cap" not in state:
            s = site()
            names = [*silu_names(model, s.layer), *quadratic_names(s.layer)]
            names += representation_names(model, s)
            state["cap"] = mech.capture(model, corpus, names)
            n = int(mech.spike_mask(state["cap"], s).sum())
            state["n_spike"] = n
        if state["n_spike"] == 0:
            raise SpikeSinkError(
                f"no spike token in these texts at layer {site().layer}; pass texts with some"
            )
        return state["cap"]

    def silu() -> list[Claim]:
        r = silu_from(model, captured(), site())
        return [
            _at_least(
                "silu",
                f"spike tokens see the block-{r.layer} MLP activation as the identity: "
                "mean cos(z, act(z))",
                r.spike_cosine,
                0.9,
                f"other tokens {r.other_cosine:.3g}; norm ratio spike {r.spike_norm_ratio:.3g} vs "
                f"other {r.other_norm_ratio:.3g}",
            ),
            _at_least(
                "silu",
                f"the neurons writing spike channel {r.channel} at spike tokens are in the linear "
                "regime (act(z)/z ≥ 0.9): mean share of what they write",
                r.spike_linear_share,
                0.9,
                f"other tokens {r.other_linear_share:.3g}",
            ),
        ]

    def quadratic() -> list[Claim]:
        mech.require_gated(model, "the SwiGLU quadratic form")
        q = quadratic_from(model, captured(), site(), 8, seed)
        k = q.channels[0]
        return [
            _above(
                "quadratic",
                f"spike tokens' x̂ aligns with S_{k}'s trigger direction: mean |cos|",
                q.spike_alignment,
                q.other_alignment,
                "other tokens",
            ),
            _at_most(
                "quadratic",
                f"x̂ᵀS_{k}x̂ + c reproduces the MLP's channel-{k} output at spike tokens: "
                "median rel. error",
                q.spike_relative_error,
                0.25,
                f"λ* = {float(q.lambda_star[0]):.4g}",
            ),
            _at_least(
                "quadratic",
                f"S_{k} is larger than random channels' forms: ‖S_{k}‖_F / median random ‖S‖_F",
                q.frobenius_ratio,
                2.0,
                f"|λ*|/‖S‖_F {float(q.lambda_share[0]):.3g} vs random median "
                f"{float(q.random_lambda_share.median()):.3g}",
            ),
        ]

    def rmsnorm() -> list[Claim]:
        mech.require_rms(model, "the RMSNorm bound")
        r = representations_from(model, captured(), site(), seed)
        after = float(r.resid_cosine[r.layer])
        return [
            _at_least(
                "rmsnorm",
                f"spike tokens' residuals become near-identical at block {r.layer}: "
                "mean pairwise cos",
                after,
                0.9,
                f"entering the block {r.resid_pre_cosine:.3g}; "
                f"other tokens {float(r.other_resid_cosine[r.layer]):.3g}",
            ),
            _at_most(
                "rmsnorm",
                "RMSNorm bound |x̂_i| ≤ √d·|γ_i| holds: max over tokens of max_i |x̂_i|/(√d|γ_i|)",
                float(r.bound_ratio.max()),
                1.0 + 1e-4,
                f"spike tokens reach {r.spike_bound_ratio:.3g} of the bound",
            ),
            _at_least(
                "rmsnorm",
                "spike tokens' normalized vector puts its energy in the spike channels: mean share",
                r.spike_energy,
                0.5,
                f"other tokens {r.other_energy:.3g}",
            ),
            _at_least(
                "rmsnorm",
                f"normalized spike tokens (block {r.layer + 1} ln1) are near-identical: "
                "mean pairwise cos",
                r.normalized_cosine,
                0.9,
                f"other tokens {r.other_normalized_cosine:.3g}",
            ),
        ]

    rows += _guarded(
        "silu",
        (
            "spike tokens see the MLP activation as the identity",
            "the neurons writing the spike channel are in the linear regime",
        ),
        silu,
    )
    rows += _guarded(
        "quadratic",
        (
            "spike tokens' x̂ aligns with S_k's trigger direction",
            "x̂ᵀS_k x̂ reproduces the MLP's spike-channel output",
            "S_k is larger than random channels' forms",
        ),
        quadratic,
    )
    rows += _guarded(
        "rmsnorm",
        (
            "spike tokens' residuals become near-identical",
            "RMSNorm bound |x̂_i| ≤ √d·|γ_i| holds",
            "spike tokens' normalized energy is in the spike channels",
            "normalized spike tokens are near-identical",
        ),
        rmsnorm,
    )

    def sink() -> list[Claim]:
        if not scan.sinks.sink_heads:
            raise SpikeSinkError("the scan found no sink head")
        g = sink_geometry(model, corpus, scan, seed=seed)
        sink_share = mech.mean_or_nan(g.key_share_spike[_mask(g.sink_heads, g.logit_gap)])
        other_share = mech.mean_or_nan(g.key_share_other[_mask(g.sink_heads, g.logit_gap)])
        return [
            _above(
                "sink",
                "sink heads give the first-token key a larger logit gap than other heads: mean gap",
                g.sink_gap,
                g.other_gap,
                "other heads",
            ),
            _above(
                "sink",
                "in sink heads, spike tokens' keys share one direction: top singular energy share",
                sink_share,
                other_share,
                "other tokens",
            ),
        ]

    rows += _guarded(
        "sink",
        (
            "sink heads give the first-token key a larger logit gap",
            "spike tokens' keys share one direction",
        ),
        sink,
    )

    def local() -> list[Claim]:
        if not scan.sinks.sink_heads:
            raise SpikeSinkError("the scan found no sink head")
        if not Anatomy.of(model).causal:
            raise SpikeSinkError(
                "attention distance is defined for causal attention; this model attends both ways"
            )
        r = short_range(scan)
        if len(r.sink_heads) == scan.n_layers * scan.n_heads:
            raise SpikeSinkError("every head is a sink head; nothing to compare with")
        if r.sink_distance_without_sink != r.sink_distance_without_sink:  # NaN
            raise SpikeSinkError(
                "the sink heads attend only to the sink key; no distance is left without it"
            )
        return [
            _below(
                "short-range",
                f"{OURS_SHORT_RANGE}: mean distance (tokens)",
                r.sink_distance_without_sink,
                r.other_distance_without_sink,
                "other heads",
            )
        ]

    rows += _guarded("short-range", (OURS_SHORT_RANGE,), local)

    def windows() -> list[Claim]:
        loc = locality(model, corpus, scan)
        verdict, reason = loc.verdict
        if verdict == "not applicable":
            raise SpikeSinkError(reason)
        w, i = loc.causal_window, list(loc.windows).index(loc.causal_window)
        return [
            _above("short-range", f"{WINDOW_SHARE} (w = {w})", loc.sink_share(i),
                   loc.other_share(i), "other heads of their layers"),
            _below("short-range", f"{WINDOW_CAUSAL}: |Δloss| (nats), w = {w}",
                   abs(loc.delta_loss_sink), abs(loc.delta_loss_control),
                   "as many other heads of their layers"),
        ]  # fmt: skip

    rows += _guarded("short-range", (WINDOW_SHARE, WINDOW_CAUSAL), windows)

    first = None

    def first_token_row(key: str) -> list[Claim]:
        nonlocal first
        if not scan.spikes.massive:  # §3.1.3 explains which tokens spike; here none do
            raise SpikeSinkError("the scan found no massive activation")
        first = first or first_tokens(model, corpus, scan)
        verdict, reason = getattr(first, f"{key}_verdict")
        if verdict == "not applicable":
            raise SpikeSinkError(reason)
        claim = FIRST_TOKEN_CLAIMS[key]
        if key == "static":
            return [_at_most("first-tokens", claim, float(first.static_error.max()),
                             STATIC_TOLERANCE, reason)]  # fmt: skip
        if key == "self_sink":
            value, other = first.early(first.self_delimiter), first.early(first.self_other)
            return [_above("first-tokens", claim, value, other, "other tokens")]
        value, other = first.scale_cos_delimiter, first.scale_cos_other
        return [_above("first-tokens", claim, value, other, "other vocabulary items")]

    for key, claim in FIRST_TOKEN_CLAIMS.items():
        rows += _guarded("first-tokens", (claim,), lambda key=key: first_token_row(key))

    def heads() -> list[Claim]:
        sink_heads = scan.sinks.sink_heads
        if not sink_heads:
            raise SpikeSinkError("the scan found no sink head")
        if len(sink_heads) == scan.n_layers * scan.n_heads:
            raise SpikeSinkError("every head is a sink head; nothing to compare with")
        d = head_decomposition(model, corpus, scan)
        if d.sink_relative_norm != d.sink_relative_norm:  # NaN: no layer with a sink head writes
            raise SpikeSinkError("no head in the sink heads' layers writes at ordinary tokens")
        writes = _below(
            "heads",
            "sink heads write less than other heads at ordinary tokens: "
            "mean ‖head output‖ / its layer's mean head",
            d.sink_relative_norm,
            d.other_relative_norm,
            "other heads",
        )
        note = f"sink heads give the sink tokens {d.sink_heads_sink_attention:.3g} of attention"
        return [
            replace(writes, note=note),
            _below(
                "heads",
                "the sink tokens' values are small: in sink heads, mean ‖v W_O‖ at sink tokens "
                "/ at other tokens",
                d.sink_value_ratio,
                1.0,
                "as large",
            ),
        ]

    rows += _guarded(
        "heads",
        (
            "sink heads write less than other heads at ordinary tokens",
            "the sink tokens' values are small",
        ),
        heads,
    )
    n_spike = state.get("n_spike")
    return ClaimsTable(str(scan.model), corpus.n_tokens, n_spike, tuple(rows))


def _mask(heads: tuple[tuple[int, int], ...], like: Any) -> Any:
    import torch

    m = torch.zeros_like(like, dtype=torch.bool)
    for layer, head in heads:
        m[layer, head] = True
    return m


__all__ = ["Claim", "ClaimsTable", "Verdict", "claims"]
