"""Compression valleys (Queipo-de-Llano et al. 2025): entropy drops where the first token spikes.

Queipo-de-Llano, Arroyo, Barbero, Dong, Bronstein, LeCun & Shwartz-Ziv ("Attention sinks and
compression valleys in LLMs are two sides of the same coin") report that when the first (BOS)
token's norm explodes in the middle layers, the matrix entropy of a sequence's token
representations drops (a "valley") and attention sinks appear in the same layers. Per layer ℓ,
reading ``blocks.0.hook_resid_pre`` as layer −1 (the embedding) and ``blocks.ℓ.hook_resid_post``
for ℓ = 0 … L−1, this module measures, averaged over sequences:

(a) **Matrix entropy**: X (n × D) is the sequence's real token vectors (optionally centered over
    its tokens); K = X Xᵀ, or XᵀX when D < n (same non-zero eigenvalues; the smaller one is
    decomposed, in float64), normalized to unit trace; S_α = log(Σ λ_i^α) / (1 − α), Shannon
    −Σ λ_i log λ_i at α = 1; divided by log min(n, D), so 1 is isotropic and 0 rank one.
(b) **Norm ratio**: ‖x₀‖ / median_{t>0} ‖x_t‖ (lower median), x₀ the first real token; the
    geometric mean over sequences (ratios span orders of magnitude).
(c) **Sink ratio** per layer: the scan's Eq. 28 ratio (Sun et al. 2026) restricted to the
    layer's heads, :attr:`~tl_spikesink.probes.sinks.SinkStats.sink_ratio_per_layer`, from the
    same :class:`~tl_spikesink.probes.sinks.SinkProbe` the scan uses; none at the embedding.
(d) **Logit-lens loss**: ``ln_final`` then W_U + b_U applied to the layer's residual; mean
    next-token NLL over the scored positions (at the last layer, the model's own loss); by
    default in the clean run only, since it costs about three forward passes.

Then the same under spike ablation (:func:`~tl_spikesink.interventions.spike_ablation`, "mean"
and "zero", at the scan's spike site) as extra passes of the same batches, to test the claim
that the valley follows the spike. Valley depth = ½(S_first + S_last) − min_ℓ S_ℓ over the
layers, first and last being the embedding and the last block.

Deviations, in docs/definitions.md: rows are not scaled to unit norm as the entropy code of the
same group (information_flow) does, since that would erase the norm spike the paper's bound is
about; Gram entries are not clamped at 0 (which would make K = XXᵀ and XᵀX disagree); the
"mean" ablation is Sun et al.'s (mean over spike tokens of a calibration pass), not a mean over
the other tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from jaxtyping import Bool, Float

from tl_spikesink.anatomy import Anatomy, hook_name
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.mechanism.captures import DEFAULT_MAX_TOKENS, Texts, as_corpus, scan_of
from tl_spikesink.probes.engine import HookFn, Pass, Probe, Step, run
from tl_spikesink.results import Result
from tl_spikesink.views.format import json_clean, num, text_table

Ablation = Literal["mean", "zero"]
LensRuns = Literal["clean", "all", "none"]
EMBEDDING = -1
"""Layer index of the embedding (``blocks.0.hook_resid_pre``) in every curve."""
_LENS_ROWS = 2048
"""Positions unembedded at once by the logit lens (bounds the [rows, vocab] buffer)."""


def matrix_entropy(
    x: Float[torch.Tensor, "batch pos d_model"],
    mask: Bool[torch.Tensor, "batch pos"] | None = None,
    *,
    alpha: float = 1.0,
    center: bool = False,
) -> Float[torch.Tensor, " batch"]:
    """Normalized matrix-based Rényi entropy of each sequence's token vectors (float64).

    Args:
        x: token vectors; a single (pos, d_model) matrix is treated as a batch of one.
        mask: True at the rows that count (default: all); other rows may hold anything (NaN).
        alpha: Rényi order > 0 (1: Shannon entropy of the eigenvalues).
        center: subtract each sequence's mean token vector first.

    Returns:
        S_α / log min(n, D) per sequence: 0 for rank one, 1 for n orthonormal vectors; NaN
        where fewer than two rows count or all of them are zero.

    Example:
        >>> matrix_entropy(torch.eye(4)).item(), matrix_entropy(torch.ones(3, 5)).item()
        (1.0, 0.0)
    """
    _check_alpha(alpha)
    if x.ndim == 2:
        return matrix_entropy(x[None], None if mask is None else mask[None], alpha=alpha,
                              center=center)[0]  # fmt: skip
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    keep = mask[..., None]
    # Rows left out become exact zeros: they add only zero eigenvalues (where, not *, for NaN).
    x = torch.where(keep, x.double(), 0.0)
    n = mask.sum(-1)
    if center:
        mean = x.sum(1, keepdim=True) / n.clamp(min=1)[:, None, None]
        x = torch.where(keep, x - mean, 0.0)
    d = x.shape[-1]
    gram = x @ x.mT if x.shape[1] <= d else x.mT @ x
    lam = torch.linalg.eigvalsh(gram)
    # Eigenvalues below the rank tolerance are round-off; dropping them makes rank one exact.
    tol = lam.amax(-1, keepdim=True) * gram.shape[-1] * torch.finfo(torch.float64).eps
    lam = torch.where(lam > tol, lam, 0.0)
    total = lam.sum(-1, keepdim=True)
    p = lam / total.clamp(min=torch.finfo(torch.float64).tiny)
    if alpha == 1.0:
        h = -torch.special.xlogy(p, p).sum(-1)
    else:
        h = torch.log((p**alpha).sum(-1)) / (1.0 - alpha)
    h = h.clamp(min=0.0) + 0.0  # round-off below 0, and −0.0, on rank one
    size = torch.minimum(n, torch.tensor(d, device=n.device)).double()
    ok = (size >= 2) & (total[:, 0] > 0)
    return torch.where(ok, h / size.clamp(min=2).log(), float("nan"))


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise SpikeSinkError(
            f"alpha must be a finite Rényi order > 0 (1 for Shannon), got {alpha!r}"
        )


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of the pairs where both are finite (NaN: < 3 pairs or no spread)."""
    x, y = x.double().flatten(), y.double().flatten()
    ok = x.isfinite() & y.isfinite()
    x, y = x[ok], y[ok]
    if x.numel() < 3:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else float("nan")


@dataclass(frozen=True, repr=False)
class Valleys(Result):
    """Per-layer entropy, first-token norm ratio, sink ratio and logit-lens loss, per run."""

    model: str
    layers: tuple[int, ...]
    """−1 (the embedding, ``blocks.0.hook_resid_pre``), then each block's ``hook_resid_post``."""
    runs: tuple[str, ...]
    """"clean", then one per spike ablation ("mean", "zero")."""
    alpha: float
    center: bool
    entropy: Float[torch.Tensor, "run layer"]
    """Mean over sequences of the normalized matrix entropy."""
    norm_ratio: Float[torch.Tensor, "run layer"]
    """Geometric mean over sequences of ‖x₀‖ / median_{t>0} ‖x_t‖."""
    sink_ratio: Float[torch.Tensor, "run layer"]
    """Eq. 28 sink ratio of each layer's heads (NaN at the embedding)."""
    lens_loss: Float[torch.Tensor, "run layer"]
    """Mean next-token NLL of the logit lens (NaN in runs it was not computed for)."""
    n_sequences: int
    n_tokens: int
    ablations: dict[str, dict[str, Any]]
    """Settings of each ablation run's intervention (layers, channels, means, ...)."""
    settings: dict[str, Any]
    corpus: tuple[dict[str, Any], ...]

    def _row(self, run: str) -> int:
        if run not in self.runs:
            raise SpikeSinkError(f"no run {run!r}; this result has {self.runs}")
        return self.runs.index(run)

    def valley_layer(self, run: str = "clean") -> int:
        """The layer of lowest entropy."""
        e = self.entropy[self._row(run)].nan_to_num(float("inf"))
        return self.layers[int(e.argmin())]

    def min_entropy(self, run: str = "clean") -> float:
        """The lowest normalized entropy over the layers."""
        e = self.entropy[self._row(run)]
        return float(e[e.isfinite()].min()) if bool(e.isfinite().any()) else float("nan")

    def depth(self, run: str = "clean") -> float:
        """½(entropy at the first layer + at the last) minus the lowest entropy."""
        e = self.entropy[self._row(run)]
        return float(0.5 * (e[0] + e[-1])) - self.min_entropy(run)

    def entropy_vs_norm(self, run: str = "clean") -> float:
        """Pearson over layers between entropy and log norm ratio (negative: valley at spike)."""
        i = self._row(run)
        return pearson(self.entropy[i], self.norm_ratio[i].log())

    def entropy_vs_sinks(self, run: str = "clean") -> float:
        """Pearson over the blocks' layers between entropy and the Eq. 28 sink ratio."""
        i = self._row(run)
        return pearson(self.entropy[i], self.sink_ratio[i])

    def summary(self, run: str = "clean") -> dict[str, Any]:
        """Valley layer, min entropy, depth and both correlations of one run."""
        return {
            "valley_layer": self.valley_layer(run),
            "min_entropy": self.min_entropy(run),
            "depth": self.depth(run),
            "entropy_vs_log_norm_ratio": self.entropy_vs_norm(run),
            "entropy_vs_sink_ratio": self.entropy_vs_sinks(run),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per run the curves and :meth:`summary`; settings, corpus."""
        return json_clean(
            {
                "model": self.model,
                "layers": list(self.layers),
                "alpha": self.alpha,
                "center": self.center,
                "n_sequences": self.n_sequences,
                "n_tokens": self.n_tokens,
                "runs": {
                    run: {
                        **self.summary(run),
                        "entropy": self.entropy[i],
                        "norm_ratio": self.norm_ratio[i],
                        "sink_ratio": self.sink_ratio[i],
                        "lens_loss": self.lens_loss[i],
                    }
                    for i, run in enumerate(self.runs)
                },
                "ablations": self.ablations,
                "settings": self.settings,
                "corpus": list(self.corpus),
            }
        )

    def __str__(self) -> str:
        head = ["layer", "entropy", "‖x₀‖/med", "sink ratio", "lens loss"]
        head += [f"entropy {r}" for r in self.runs[1:]]
        body = [
            [
                "emb" if layer == EMBEDDING else str(layer),
                num(float(self.entropy[0, j])),
                num(float(self.norm_ratio[0, j])),
                num(float(self.sink_ratio[0, j])),
                num(float(self.lens_loss[0, j])),
                *(num(float(self.entropy[i, j])) for i in range(1, len(self.runs))),
            ]
            for j, layer in enumerate(self.layers)
        ]
        title = (
            f"compression valleys of {self.model}: matrix entropy (α = {self.alpha:g}, "
            f"{'centered' if self.center else 'uncentered'}, / log min(n, D)) over "
            f"{self.n_sequences} sequences, {self.n_tokens:,} tokens"
        )
        lines = [title, *text_table(head, body)]
        for name in self.runs:
            s = self.summary(name)
            lines.append(
                f"  {name:>5}: valley at layer {s['valley_layer']}, min entropy "
                f"{num(s['min_entropy'])}, depth {num(s['depth'])}; r(entropy, log norm ratio) "
                f"{num(s['entropy_vs_log_norm_ratio'])}, r(entropy, sink ratio) "
                f"{num(s['entropy_vs_sink_ratio'])}"
            )
        return "\n".join(lines)


class _ValleyProbe(Probe):
    """Entropy, norm ratio and logit-lens loss of every sequence at each residual hook."""

    def __init__(self, model: Any, n_layers: int, alpha: float, center: bool, lens: bool):
        self.model, self.alpha, self.center, self.lens = model, alpha, center, lens
        self.names = [hook_name("resid_pre", 0)]
        self.names += [hook_name("resid_post", la) for la in range(n_layers)]
        size = len(self.names)
        self.entropy_sum = torch.zeros(size, dtype=torch.float64)
        self.entropy_n = torch.zeros(size, dtype=torch.float64)
        self.log_ratio_sum = torch.zeros(size, dtype=torch.float64)
        self.ratio_n = torch.zeros(size, dtype=torch.float64)
        self.loss_sum = torch.zeros(size, dtype=torch.float64)
        self.loss_n = torch.zeros(size, dtype=torch.float64)

    def hooks(self) -> list[tuple[str, HookFn]]:
        return [(name, self._hook(i)) for i, name in enumerate(self.names)]

    def start_batch(self, step: Step) -> None:
        self.mask, self.tokens = step.mask, step.tokens
        self.first = step.batch.first.to(step.mask.device)
        cols = torch.arange(step.mask.shape[1], device=step.mask.device)
        self.others = step.mask & (cols[None, :] != self.first[:, None])
        self.scored = step.mask[:, :-1] & step.mask[:, 1:]

    def _hook(self, i: int) -> HookFn:
        def hook(resid: Float[torch.Tensor, "batch pos d_model"], hook: Any) -> None:
            self._reduce(i, resid.detach())

        return hook

    def _reduce(self, i: int, resid: torch.Tensor) -> None:
        h = matrix_entropy(resid, self.mask, alpha=self.alpha, center=self.center).cpu()
        self.entropy_sum[i] += h.nan_to_num(0.0).sum()
        self.entropy_n[i] += h.isfinite().sum()
        norms = resid.double().norm(dim=-1)
        x0 = norms.gather(1, self.first[:, None])[:, 0]
        median = torch.where(self.others, norms, float("nan")).nanmedian(dim=1).values
        log_ratio = (x0 / median).log().cpu()
        ok = log_ratio.isfinite()
        self.log_ratio_sum[i] += log_ratio[ok].sum()
        self.ratio_n[i] += ok.sum()
        if self.lens:
            self._lens(i, resid)

    def _lens(self, i: int, resid: torch.Tensor) -> None:
        rows = resid[:, :-1][self.scored]
        targets = self.tokens[:, 1:][self.scored]
        w, b = self.model.W_U, self.model.b_U
        for lo in range(0, rows.shape[0], _LENS_ROWS):
            x = self.model.ln_final(rows[None, lo : lo + _LENS_ROWS])[0]
            logits = torch.addmm(b, x, w).float()
            # NLL = logsumexp − target logit: one pass over [rows, vocab], no log-prob copy.
            target = logits.gather(-1, targets[lo : lo + _LENS_ROWS, None])[:, 0]
            loss = (logits.logsumexp(-1) - target).double()
            self.loss_sum[i] += float(loss.sum())
            self.loss_n[i] += loss.numel()

    def curves(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nan = float("nan")
        entropy = self.entropy_sum / self.entropy_n.where(self.entropy_n > 0, nan)
        ratio = (self.log_ratio_sum / self.ratio_n.where(self.ratio_n > 0, nan)).exp()
        loss = self.loss_sum / self.loss_n.where(self.loss_n > 0, nan)
        return entropy, ratio, loss


def compression_valleys(
    model: Any,
    texts: Texts | None = None,
    scan: Any = None,
    *,
    alpha: float = 1.0,
    center: bool = False,
    ablations: Sequence[Ablation] = ("mean", "zero"),
    calibration: Texts | None = None,
    logit_lens: LensRuns = "clean",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = 8,
    padding_side: Literal["right", "left"] = "right",
    progress: bool = True,
) -> Valleys:
    """Matrix entropy, first-token norm ratio, sink ratio and logit-lens loss per layer.

    Args:
        model: a causal HookedTransformer; borrowed (read hooks, and the ablations' write
            hooks, are removed after each pass).
        texts: strings or a Corpus (default: the offline default corpus), read in sequences of
            at most 128 tokens, `max_tokens` in all.
        scan: a scan of the model, for the spike site the ablations use and the sink settings
            (ε, T); run on `texts` when None.
        alpha: Rényi order of the matrix entropy (1: Shannon).
        center: center each sequence's token vectors before the Gram matrix.
        ablations: spike ablations run as extra passes, "mean" and/or "zero" (empty: none).
        calibration: texts for the "mean" ablation's spike means (default: default-corpus texts
            not among `texts`); keep them disjoint from `texts`.
        logit_lens: runs whose logit-lens loss is computed: "clean" (default), "all" or
            "none"; it is the costliest part (one unembedding per layer, 3× a forward pass).
        max_tokens: tokens read from raw `texts`.
        batch_size: sequences per forward pass.
        padding_side: side on which batches are padded; the numbers do not depend on it.
        progress: show a progress bar.

    Example:
        >>> v = compression_valleys(model, texts, scan=result)  # doctest: +SKIP
        >>> v.valley_layer(), v.depth("clean"), v.depth("zero")  # doctest: +SKIP
    """
    from tl_spikesink.config import ScanConfig
    from tl_spikesink.corpus import default_texts
    from tl_spikesink.interventions.spikes import spike_ablation
    from tl_spikesink.probes.scan import ScanProbes

    _check_alpha(alpha)
    ablations = tuple(ablations)
    bad = [m for m in ablations if m not in get_args(Ablation)]
    if bad or len(set(ablations)) != len(ablations):
        raise SpikeSinkError(
            f"ablations must be distinct modes out of {get_args(Ablation)}, got {ablations}"
        )
    if logit_lens not in get_args(LensRuns):
        raise SpikeSinkError(f"logit_lens must be one of {get_args(LensRuns)}, got {logit_lens!r}")
    a = Anatomy.of(model)
    if logit_lens != "none" and not a.causal:
        raise SpikeSinkError(
            f"the logit-lens loss is a next-token loss; {a.model_name} attends both ways: pass "
            "logit_lens='none'"
        )
    texts = default_texts() if texts is None else texts
    corpus = as_corpus(model, texts, max_tokens)
    if ablations or scan is not None:
        scan = scan_of(model, corpus, scan)
    config = scan.config if scan is not None else ScanConfig()
    ivs = {}
    for mode in ablations:
        if mode == "mean" and calibration is None:
            # Only the texts the corpus read are off limits (the default corpus is read in part).
            listed = list(texts) if isinstance(texts, (list, tuple)) else []
            seen = {listed[c.text_index] for c in corpus.chunks if c.text_index < len(listed)}
            calibration = as_corpus(model, [t for t in default_texts() if t not in seen],
                                    max_tokens)  # fmt: skip
        try:
            ivs[mode] = spike_ablation(
                scan, mode=mode, model=model, calibration=calibration if mode == "mean" else None
            )
        except SpikeSinkError as e:
            raise SpikeSinkError(f"compression_valleys: {e}; or pass ablations=()") from e
    runs = ("clean", *ablations)
    lens = {r: logit_lens == "all" or (logit_lens == "clean" and r == "clean") for r in runs}
    valley = {r: _ValleyProbe(model, a.n_layers, alpha, center, lens[r]) for r in runs}
    sinks = {r: ScanProbes(model, config).sinks for r in runs}
    passes = [
        Pass([valley[r], sinks[r]], fwd_hooks=ivs[r].fwd_hooks if r in ivs else ()) for r in runs
    ]
    run(model, corpus, passes=passes, batch_size=batch_size, padding_side=padding_side,
        progress=progress, desc=f"valleys ({len(passes)} passes a batch)")  # fmt: skip
    curves = [valley[r].curves() for r in runs]
    nan = torch.full((len(runs), 1), float("nan"), dtype=torch.float64)
    sink = torch.stack([sinks[r].result().sink_ratio_per_layer for r in runs]).double()
    return Valleys(
        model=a.model_name,
        layers=(EMBEDDING, *range(a.n_layers)),
        runs=runs,
        alpha=float(alpha),
        center=center,
        entropy=torch.stack([c[0] for c in curves]),
        norm_ratio=torch.stack([c[1] for c in curves]),
        sink_ratio=torch.cat([nan, sink], dim=1),
        lens_loss=torch.stack([c[2] for c in curves]),
        n_sequences=len(corpus.chunks),
        n_tokens=corpus.n_tokens,
        ablations={r: iv.settings for r, iv in ivs.items()},
        settings={
            "alpha": float(alpha),
            "center": center,
            "logit_lens": logit_lens,
            "batch_size": batch_size,
            "padding_side": padding_side,
            "embedding_layer": f"{EMBEDDING} = {hook_name('resid_pre', 0)}",
            "epsilon": config.epsilon,
            "sink_probe_len": config.sink_probe_len,
            "sink_min_len": config.sink_min_len,
        },
        corpus=(corpus.describe(),),
    )


__all__ = ["EMBEDDING", "Ablation", "Valleys", "compression_valleys", "matrix_entropy", "pearson"]
