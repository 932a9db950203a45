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
from functools import cached_property
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
from tl_spikesink.results import Result
from tl_spikesink.views.format import json_clean

Verdict = Literal["holds", "does not hold", "not applicable"]

OURS_SHORT_RANGE = "(our metric) without the sink key, sink heads attend more locally"
WINDOW_SHARE = "sink heads keep more of their non-sink attention in the recent window"
WINDOW_CAUSAL = "restricting sink heads to the first token + recent window moves the loss less"
FIRST_TOKEN_CLAIMS = {
    "static": "Eq. 22: the first token's head outputs are h̃₀W_V + b_V",
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


@dataclass(frozen=True, repr=False)
class ClaimsTable(Result):
    """Verdicts on the mechanism's claims for one model and corpus."""

    model: str
    n_tokens: int
    n_spike_tokens: int | None
    """Spike tokens found in the analysed texts (None when the scan found no spike)."""
    rows: tuple[Claim, ...]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: {"model", "n_tokens", "n_spike_tokens", "rows": [...]}."""
        return json_clean(
            {
                "model": self.model,
                "n_tokens": self.n_tokens,
                "n_spike_tokens": self.n_spike_tokens,
                "rows": [asdict(r) for r in self.rows],
            }
        )

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


class _Measures:
    """What the links of one claims run share, each measured on first use and kept."""

    def __init__(self, model: Any, corpus: Any, scan: Any, seed: int):
        self.model, self.corpus, self.scan, self.seed = model, corpus, scan, seed
        self.n_spike: int | None = None

    @cached_property
    def site(self) -> mech.SpikeSite:
        return mech.spike_site(self.scan)

    @cached_property
    def _captured(self) -> Any:
        # One pass for the SiLU, quadratic and representation links together.
        s = self.site
        names = [*silu_names(self.model, s.layer), *quadratic_names(s.layer)]
        names += representation_names(self.model, s)
        cap = mech.capture(self.model, self.corpus, names)
        self.n_spike = int(mech.spike_mask(cap, s).sum())
        return cap

    @property
    def captured(self) -> Any:
        cap = self._captured
        if self.n_spike == 0:
            raise SpikeSinkError(
                f"no spike token in these texts at layer {self.site.layer}; pass texts with some"
            )
        return cap

    @cached_property
    def locality(self) -> Any:
        return locality(self.model, self.corpus, self.scan)

    @cached_property
    def first_tokens(self) -> Any:
        if not self.scan.spikes.massive:  # §3.1.3 explains which tokens spike; here none do
            raise SpikeSinkError("the scan found no massive activation")
        return first_tokens(self.model, self.corpus, self.scan)

    def sink_heads(self, *, all_allowed: bool = False) -> tuple[tuple[int, int], ...]:
        heads = self.scan.sinks.sink_heads
        if not heads:
            raise SpikeSinkError("the scan found no sink head")
        if not all_allowed and len(heads) == self.scan.n_layers * self.scan.n_heads:
            raise SpikeSinkError("every head is a sink head; nothing to compare with")
        return heads


Build = Callable[[_Measures, tuple[str, ...]], list[Claim]]


def _silu(m: _Measures, claim: tuple[str, ...]) -> list[Claim]:
    r = silu_from(m.model, m.captured, m.site)
    return [
        _at_least("silu", f"{claim[0]} (block {r.layer}): mean cos(z, act(z))", r.spike_cosine,
                  0.9, f"other tokens {r.other_cosine:.3g}; norm ratio spike "
                  f"{r.spike_norm_ratio:.3g} vs other {r.other_norm_ratio:.3g}"),
        _at_least("silu", f"{claim[1]} (channel {r.channel}, act(z)/z ≥ 0.9): mean share of "
                  "what they write", r.spike_linear_share, 0.9,
                  f"other tokens {r.other_linear_share:.3g}"),
    ]  # fmt: skip


def _quadratic(m: _Measures, claim: tuple[str, ...]) -> list[Claim]:
    mech.require_gated(m.model, "the SwiGLU quadratic form")
    q = quadratic_from(m.model, m.captured, m.site, 8, m.seed)
    k = q.channels[0]
    return [
        _above("quadratic", f"{claim[0]} (k = {k}): mean |cos|", q.spike_alignment,
               q.other_alignment, "other tokens"),
        _at_most("quadratic", f"{claim[1]} (k = {k}): median rel. error",
                 q.spike_relative_error, 0.25, f"λ* = {float(q.lambda_star[0]):.4g}"),
        _at_least("quadratic", f"{claim[2]}: ‖S_{k}‖_F / median random ‖S‖_F", q.frobenius_ratio,
                  2.0, f"|λ*|/‖S‖_F {float(q.lambda_share[0]):.3g} vs random median "
                  f"{float(q.random_lambda_share.median()):.3g}"),
    ]  # fmt: skip


def _rmsnorm(m: _Measures, claim: tuple[str, ...]) -> list[Claim]:
    mech.require_rms(m.model, "the RMSNorm bound")
    r = representations_from(m.model, m.captured, m.site, m.seed)
    return [
        _at_least("rmsnorm", f"{claim[0]} (block {r.layer}): mean pairwise cos",
                  float(r.resid_cosine[r.layer]), 0.9,
                  f"entering the block {r.resid_pre_cosine:.3g}; "
                  f"other tokens {float(r.other_resid_cosine[r.layer]):.3g}"),
        _at_most("rmsnorm", f"{claim[1]}: max over tokens of max_i |x̂_i|/(√d|γ_i|)",
                 float(r.bound_ratio.max()), 1.0 + 1e-4,
                 f"spike tokens reach {r.spike_bound_ratio:.3g} of the bound"),
        _at_least("rmsnorm", f"{claim[2]}: mean share", r.spike_energy, 0.5,
                  f"other tokens {r.other_energy:.3g}"),
        _at_least("rmsnorm", f"{claim[3]} (block {r.layer + 1} ln1): mean pairwise cos",
                  r.normalized_cosine, 0.9, f"other tokens {r.other_normalized_cosine:.3g}"),
    ]  # fmt: skip


def _sink(m: _Measures, claim: tuple[str, ...]) -> list[Claim]:
    m.sink_heads(all_allowed=True)
    g = sink_geometry(m.model, m.corpus, m.scan, seed=m.seed)
    in_sink_heads = _mask(g.sink_heads, g.logit_gap)
    return [
        _above("sink", f"{claim[0]}: mean gap", g.sink_gap, g.other_gap, "other heads"),
        _above("sink", f"{claim[1]} in sink heads: top singular energy share",
               mech.mean_or_nan(g.key_share_spike[in_sink_heads]),
               mech.mean_or_nan(g.key_share_other[in_sink_heads]), "other tokens"),
    ]  # fmt: skip


def _distance(m: _Measures, claim: tuple[str, ...]) -> list[Claim]:
    m.sink_heads()
    if not Anatomy.of(m.model).causal:
        raise SpikeSinkError(
            "attention distance is defined for causal attention; this model attends both ways"
        )
    r = short_range(m.scan)
    if r.sink_distance_without_sink != r.sink_distance_without_sink:  # NaN
        raise SpikeSinkError(
            "the sink heads attend only to the sink key; no distance is left without it"
        )
    distance = f"{claim[0]}: mean distance (tokens)"
    return [_below("short-range", distance, r.sink_distance_without_sink,
                   r.other_distance_without_sink, "other heads")]  # fmt: skip


def _windows(m: _Measures, claim: tuple[str, ...]) -> list[Claim]:
    loc = m.locality
    verdict, reason = loc.verdict
    if verdict == "not applicable":
        raise SpikeSinkError(reason)
    w = loc.causal_window
    i = list(loc.windows).index(w)
    others = "other heads of their layers"
    return [
        _above("short-range", f"{claim[0]} (w = {w})", loc.sink_share(i), loc.other_share(i),
               others),
        _below("short-range", f"{claim[1]} (w = {w}): |Δloss| (nats)", abs(loc.delta_loss_sink),
               abs(loc.delta_loss_control), f"as many {others}"),
    ]  # fmt: skip


def _first_tokens(key: str) -> Build:
    def build(m: _Measures, claim: tuple[str, ...]) -> list[Claim]:
        f = m.first_tokens
        verdict, reason = getattr(f, f"{key}_verdict")
        if verdict == "not applicable":
            raise SpikeSinkError(reason)
        if key == "static":
            return [_at_most("first-tokens", f"{claim[0]}: largest relative error",
                             float(f.static_error.max()), STATIC_TOLERANCE, reason)]  # fmt: skip
        if key == "self_sink":
            value, other, what = f.early(f.self_delimiter), f.early(f.self_other), "other tokens"
        else:
            value, other, what = f.scale_cos_delimiter, f.scale_cos_other, "other items"
        return [_above("first-tokens", claim[0], value, other, what)]

    return build


def _heads(m: _Measures, claim: tuple[str, ...]) -> list[Claim]:
    m.sink_heads()
    d = head_decomposition(m.model, m.corpus, m.scan)
    if d.sink_relative_norm != d.sink_relative_norm:  # NaN: no layer with a sink head writes
        raise SpikeSinkError("no head in the sink heads' layers writes at ordinary tokens")
    writes = _below("heads", f"{claim[0]}: mean ‖head output‖ / its layer's mean head",
                    d.sink_relative_norm, d.other_relative_norm, "other heads")  # fmt: skip
    note = f"sink heads give the sink tokens {d.sink_heads_sink_attention:.3g} of attention"
    return [
        replace(writes, note=note),
        _below("heads", f"{claim[1]}: in sink heads, mean ‖v W_O‖ at sink tokens / at other "
               "tokens", d.sink_value_ratio, 1.0, "as large"),
    ]  # fmt: skip


LINKS: tuple[tuple[str, tuple[str, ...], Build], ...] = (
    ("silu", ("spike tokens see the MLP activation as the identity",
              "the neurons writing the spike channel are in the linear regime"), _silu),
    ("quadratic", ("spike tokens' x̂ aligns with S_k's trigger direction",
                   "x̂ᵀS_k x̂ + c reproduces the MLP's spike-channel output",
                   "S_k is larger than random channels' forms"), _quadratic),
    ("rmsnorm", ("spike tokens' residuals become near-identical",
                 "RMSNorm bound |x̂_i| ≤ √d·|γ_i| holds",
                 "spike tokens' normalized energy is in the spike channels",
                 "normalized spike tokens are near-identical"), _rmsnorm),
    ("sink", ("sink heads give the first-token key a larger logit gap than other heads",
              "spike tokens' keys share one direction"), _sink),
    ("short-range", (OURS_SHORT_RANGE,), _distance),
    ("short-range", (WINDOW_SHARE, WINDOW_CAUSAL), _windows),
    *(("first-tokens", (claim,), _first_tokens(key)) for key, claim in FIRST_TOKEN_CLAIMS.items()),
    ("heads", ("sink heads write less than other heads at ordinary tokens",
               "the sink tokens' values are small"), _heads),
)  # fmt: skip
"""Every link of the chain: its name, its claims (short form), and what measures them."""


def claims(
    model: Any,
    texts: mech.Texts | None = None,
    scan: Any = None,
    *,
    max_tokens: int = mech.DEFAULT_MAX_TOKENS,
    seed: int = 0,
    progress: bool = True,
) -> ClaimsTable:
    """Check every link of the spike → sink mechanism on `model` and tabulate the verdicts.

    Args:
        model: a TransformerLens model; only read (hooks are removed, parameters untouched).
        texts: strings or a :class:`~tl_spikesink.Corpus`; None reads the default offline corpus.
        scan: the model's scan (spike layer, channels, cut, sink heads); run on `texts` if None.
        max_tokens: tokens read from raw texts.
        seed: seed of the random channel and token samples.
        progress: show a progress bar over the links (each measured on first use).

    Returns:
        A :class:`ClaimsTable`; `print(table)` renders it, `table.to_dict()` is JSON-ready.
    """
    from tqdm.auto import tqdm

    from tl_spikesink.corpus import default_texts

    corpus = mech.as_corpus(model, default_texts() if texts is None else texts, max_tokens)
    scan = mech.scan_of(model, corpus, scan)
    measures = _Measures(model, corpus, scan, seed)
    links = tqdm(LINKS, desc="claims", unit="link", disable=not progress, leave=False)
    rows = [
        row
        for link, claim, build in links
        for row in _guarded(link, claim, lambda build=build, claim=claim: build(measures, claim))
    ]
    return ClaimsTable(str(scan.model), corpus.n_tokens, measures.n_spike, tuple(rows))


def _mask(heads: tuple[tuple[int, int], ...], like: Any) -> Any:
    import torch

    m = torch.zeros_like(like, dtype=torch.bool)
    for layer, head in heads:
        m[layer, head] = True
    return m


__all__ = ["Claim", "ClaimsTable", "Verdict", "claims"]
