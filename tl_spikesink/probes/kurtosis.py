"""Excess kurtosis of the residual stream, layer by layer (Outlier-Safe Pre-Training, Park et al. 2025).

The definition is the one in OSP's ``evaluate_kurtosis.py`` (dmis-lab/Outlier-Safe-Pre-Training).
For each token, over the d_model channels of ``hook_resid_post``:

    k = relu(mean(x⁴) / std(x)⁴ − 3)

then the mean of k over the real tokens of the corpus (pads never), one number per layer.

- ``mean(x⁴)`` is the raw, uncentred fourth moment; ``std(x)`` is centred and Bessel-corrected
  (n − 1), torch's default, as OSP. A population std would multiply every ratio by
  (n / (n − 1))², +0.35 % at d_model = 576.
- The relu is taken per token, before the mean: a token flatter than a Gaussian counts 0.
- A token whose channels are all equal (std 0) counts 0; OSP would divide by zero.

Where this departs from OSP: OSP feeds each token as a sequence of its own (``seq.unsqueeze(1)``
gives a batch of length-1 sequences) and reports one number averaged over every hidden state
(the embeddings and the final-normed output included). Here tokens are read in their context and
each block's ``hook_resid_post`` gets its own number; :attr:`ExcessKurtosis.mean` is the mean
over layers.

Without spike tokens: the same average with the scan's spike tokens (every token carrying a
massive activation in some layer) left out of every layer, to show how much the spike alone
drives the number. Spike tokens are only known once the whole corpus has fixed each layer's
median, so the probe keeps every token whose |x| exceeds ``abs_threshold`` in some layer (a
superset of the spike tokens: their cut is at least ``abs_threshold``) with its k in every layer,
and subtracts the spike tokens at the end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float, Int

import tl_spikesink.probes.kernels as kernels
from tl_spikesink.anatomy import hook_name
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.probes.engine import HookFn, Probe, Step
from tl_spikesink.probes.reducers import Buffers, Stage, check_same
from tl_spikesink.results import Result
from tl_spikesink.tokens import TokenRef
from tl_spikesink.views.format import num, text_table

if TYPE_CHECKING:
    from tl_spikesink.probes.scan import ScanResult

KURTOSIS_DEFINITION = (
    "per token over d_model at hook_resid_post: relu(mean(x^4) / std(x)^4 - 3), std with n - 1 "
    "(OSP, Park et al. 2025), averaged over real tokens; 'without spikes' leaves the scan's "
    "spike tokens out of every layer"
)
"""What :class:`ExcessKurtosis` measures, as reports print it."""


def token_kurtosis(x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "..."]:
    """OSP's per-token excess kurtosis relu(mean(x⁴) / std(x)⁴ − 3), over the last axis.

    Elementwise products and plain sums only: the scan runs this on every layer of every batch,
    and on CPU ``torch.var`` and ``vector_norm(x, 4)`` over the last axis are each about 20x
    slower than the same moments written out. The variance is taken about the mean (never as
    E[x²] − E[x]², which cancels catastrophically in float32 when the mean is large).
    """
    d = x.shape[-1]
    # One scratch buffer: every fresh activation-sized tensor costs page faults on CPU.
    scratch = x - x.mean(-1, keepdim=True)
    var = torch.linalg.vecdot(scratch, scratch) / (d - 1)  # Bessel-corrected, as OSP's x.std(-1)
    square = torch.square(x, out=scratch)
    m4 = torch.linalg.vecdot(square, square) / d
    k = (m4 / var.square() - 3).relu()
    return torch.where(var > 0, k, torch.zeros_like(k))


@dataclass(frozen=True, repr=False)
class KurtosisStats(Result):
    """Streaming sums of the per-token excess kurtosis; merge two to get both corpora's.

    Candidates are the tokens whose |x| exceeds `abs_threshold` in some layer, largest peak
    first, at most `capacity` of them (`truncated` when more were seen).
    """

    n_layers: int
    abs_threshold: float
    capacity: int
    total: Float[torch.Tensor, " layer"]
    """Sum over real tokens of k (float64)."""
    n_tokens: int
    refs: Int[torch.Tensor, "cand 3"]
    """(text_index, start, position) of each candidate."""
    peak: Float[torch.Tensor, " cand"]
    """Largest |x| of each candidate over layers."""
    values: Float[torch.Tensor, "cand layer"]
    """k of each candidate in every layer."""
    truncated: bool = False

    @classmethod
    def empty(cls, n_layers: int, abs_threshold: float, capacity: int) -> KurtosisStats:
        """No tokens seen yet."""
        return cls(
            n_layers,
            abs_threshold,
            capacity,
            torch.zeros(n_layers, dtype=torch.float64),
            0,
            torch.zeros(0, 3, dtype=torch.long),
            torch.zeros(0),
            torch.zeros(0, n_layers),
        )

    def per_layer(self) -> Float[torch.Tensor, " layer"]:
        """Mean k over every real token, per layer (NaN before any token)."""
        return _mean(self.total, self.n_tokens)

    def without(self, tokens: Iterable[TokenRef]) -> Float[torch.Tensor, " layer"]:
        """Mean k per layer with `tokens` left out of every layer.

        Every token in `tokens` must be a candidate (|x| > `abs_threshold` somewhere), as a
        spike token of the same scan always is. NaN if a candidate was dropped (`truncated`)
        and is needed.
        """
        wanted = {(t.text_index, t.start, t.position) for t in tokens}
        rows = {tuple(r): i for i, r in enumerate(self.refs.tolist())}
        missing = wanted - rows.keys()
        if missing and self.truncated:
            return torch.full((self.n_layers,), float("nan"))
        if missing:
            ref = TokenRef(*min(missing))
            raise SpikeSinkError(
                f"token {ref} never exceeded |x| > {num(self.abs_threshold)} at hook_resid_post, "
                "so the kurtosis probe kept no per-token values for it; pass spike tokens of the "
                "same scan (result.spikes.tokens) or scan with a lower abs_threshold"
            )
        idx = torch.tensor(sorted(rows[w] for w in wanted), dtype=torch.long)
        left = self.total - self.values[idx].double().sum(0)
        return _mean(left, self.n_tokens - len(idx))

    def merge(self, other: KurtosisStats) -> KurtosisStats:
        """The statistics of both scans' corpora together."""
        check_same(self, other, ("n_layers", "abs_threshold", "capacity"))
        return _select(
            replace(
                self,
                total=self.total + other.total,
                n_tokens=self.n_tokens + other.n_tokens,
                refs=torch.cat([self.refs, other.refs]),
                peak=torch.cat([self.peak, other.peak]),
                values=torch.cat([self.values, other.values]),
                truncated=self.truncated or other.truncated,
            )
        )

    def shift_texts(self, offset: int) -> KurtosisStats:
        """The same statistics with text indices moved by `offset` (to merge separate corpora)."""
        refs = self.refs.clone()
        refs[:, 0] += offset
        return replace(self, refs=refs)

    def __str__(self) -> str:
        rows = [[str(layer), num(float(k))] for layer, k in enumerate(self.per_layer())]
        return "\n".join(
            [f"excess kurtosis over {self.n_tokens:,} tokens", *text_table(["layer", "k"], rows)]
        )


def _mean(total: torch.Tensor, n: int) -> torch.Tensor:
    return (total / n).float() if n > 0 else torch.full(total.shape, float("nan"))


def _select(s: KurtosisStats) -> KurtosisStats:
    """Keep the `capacity` candidates of largest peak, in a total order (peak desc, then ref).

    A total order makes the kept set independent of batching and merge order.
    """
    order = torch.arange(len(s.peak))
    for col in reversed(range(3)):
        order = order[torch.sort(s.refs[order, col], stable=True).indices]
    order = order[torch.sort(-s.peak[order], stable=True).indices]
    dropped = len(order) > s.capacity
    order = order[: s.capacity]
    return replace(
        s,
        refs=s.refs[order],
        peak=s.peak[order],
        values=s.values[order],
        truncated=s.truncated or dropped,
    )


class KurtosisProbe(Probe):
    """Read-only hooks on every ``hook_resid_post`` that reduce batches into :class:`KurtosisStats`."""

    def __init__(self, n_layers: int, abs_threshold: float, capacity: int):
        self.n_layers = n_layers
        self.stats = KurtosisStats.empty(n_layers, abs_threshold, capacity)
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.peak: list[torch.Tensor | None] = [None] * n_layers
        self.buffers = Buffers()
        self.stage = Stage(self.buffers, "resid_post", n_layers, self._reduce)
        self.fused: tuple | None = None
        """The compiled kernel's per-pass arrays, or None where the torch path runs."""
        self.hosted = False
        """Another probe's hooks call :meth:`read` (a SpikeProbe's, in its own kernel)."""

    def hooks(self) -> list[tuple[str, HookFn]]:
        """(hook_name, fn) pairs for `model.hooks` (none when hosted)."""
        if self.hosted:
            return []
        return [
            (hook_name("resid_post", layer), self._hook(layer)) for layer in range(self.n_layers)
        ]

    def start_batch(self, step: Step) -> None:
        """Forget the previous batch's per-layer values."""
        self.k = [None] * self.n_layers
        self.peak = [None] * self.n_layers
        self.stage.clear()
        self.fused = None
        if kernels.available(step.mask):
            # The kernel writes each layer's row of these; end_batch reads them whole.
            shape, cpu = (self.n_layers, step.mask.numel()), torch.device("cpu")
            self.k_all = self.buffers("k", shape, torch.float32, cpu)
            self.peak_all = self.buffers("peak", shape, torch.float32, cpu)
            self.seen = np.zeros(self.n_layers, bool)
            self.fused = (self.k_all.numpy(), self.peak_all.numpy().view(np.int32), self.seen)

    def _hook(self, layer: int) -> HookFn:
        def hook(act: Float[torch.Tensor, "batch pos d_model"], hook: Any) -> None:
            self.read(act, layer)

        return hook

    def read(self, act: Float[torch.Tensor, "batch pos d_model"], layer: int) -> None:
        """Take `layer`'s residual stream for this batch."""
        if self.fused is not None:  # one compiled pass, while the activation is in cache
            kernels.token_kurtosis_into(act, layer, self.fused)
        else:
            self.stage.add(layer, act.detach())

    def _reduce(self, layers: list[int], x: Float[torch.Tensor, "n token d_model"]) -> None:
        k = token_kurtosis(x)
        # max |x| without an |x| buffer; vector_norm(x, inf) and aminmax are far slower on CPU
        peak = torch.maximum(x.amax(-1), -x.amin(-1))
        for i, layer in enumerate(layers):
            self.k[layer], self.peak[layer] = k[i], peak[i]

    def end_batch(self, step: Step, logits: torch.Tensor | None) -> None:
        """Add the batch's real tokens to the sums; keep the candidates' per-layer values."""
        self.stage.flush()
        mask = step.mask
        if self.fused is not None:
            if not self.seen.all():
                return  # a pass that stopped early (stop_at_layer) saw no complete token
            k, peak = self.k_all.view(-1, *mask.shape), self.peak_all.amax(0).view(mask.shape)
        elif any(k is None for k in self.k):
            return
        else:
            k = torch.stack(self.k).view(-1, *mask.shape)  # type: ignore[arg-type]
            peak = torch.stack(self.peak).amax(0).view(mask.shape)  # type: ignore[arg-type]
        total = torch.where(mask, k, torch.zeros_like(k)).double().sum((1, 2)).cpu()
        keep = (mask & (peak > self.stats.abs_threshold)).cpu()
        row, pos = keep.nonzero(as_tuple=True)
        b = step.batch
        refs = torch.stack([b.text_index[row], b.start[row], pos - b.first[row]], dim=1)
        s = self.stats
        self.stats = replace(
            s,
            total=s.total + total,
            n_tokens=s.n_tokens + int(mask.sum()),
            refs=torch.cat([s.refs, refs]),
            peak=torch.cat([s.peak, peak.cpu()[keep]]),
            values=torch.cat([s.values, k.cpu()[:, keep].T]),
        )
        if len(self.stats.peak) > 2 * s.capacity:
            self.stats = _select(self.stats)

    def result(self) -> KurtosisStats:
        """Freeze what was seen into :class:`KurtosisStats`."""
        return _select(self.stats)


@dataclass(frozen=True, repr=False)
class ExcessKurtosis(Result):
    """Excess kurtosis per layer of a scan, with and without its spike tokens."""

    model: str
    per_layer: Float[torch.Tensor, " layer"]
    per_layer_without_spikes: Float[torch.Tensor, " layer"]
    n_tokens: int
    n_spike_tokens: int
    truncated: bool
    corpus: tuple[dict[str, Any], ...]
    definition: str = KURTOSIS_DEFINITION
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        """Mean over layers of the per-layer kurtosis (all tokens)."""
        return float(self.per_layer.double().mean())

    @property
    def mean_without_spikes(self) -> float:
        """Mean over layers without the spike tokens."""
        return float(self.per_layer_without_spikes.double().mean())

    @property
    def peak_layer(self) -> int:
        """Layer of the largest kurtosis (all tokens)."""
        return int(self.per_layer.nan_to_num(-1.0).argmax())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: both per-layer curves, their means, the definition and the corpus."""
        return self.json_fields(
            "model definition per_layer per_layer_without_spikes mean mean_without_spikes "
            "n_tokens n_spike_tokens truncated corpus settings"
        )

    def __str__(self) -> str:
        rows = [
            [str(layer), num(float(a)), num(float(b))]
            for layer, (a, b) in enumerate(
                zip(self.per_layer, self.per_layer_without_spikes, strict=True)
            )
        ]
        rows.append(["mean", num(self.mean), num(self.mean_without_spikes)])
        lines = [
            f"excess kurtosis of {self.model} at hook_resid_post over {self.n_tokens:,} tokens "
            f"({self.n_spike_tokens} spike tokens)",
            f"  {self.definition}",
            *text_table(["layer", "all tokens", "without spike tokens"], rows),
        ]
        if self.truncated:
            lines.append("(more candidates than max_candidates: 'without' may be NaN; raise it)")
        return "\n".join(lines)


def excess_kurtosis(result: ScanResult) -> ExcessKurtosis:
    """The excess kurtosis per layer of a scan, with and without its spike tokens.

    Example:
        >>> k = excess_kurtosis(ts.scan(model))  # doctest: +SKIP
        >>> k.per_layer, k.per_layer_without_spikes  # doctest: +SKIP
    """
    stats = getattr(result, "kurtosis", None)
    if stats is None:
        raise SpikeSinkError(
            "this scan has no kurtosis statistics (it was made before they existed, or loaded "
            "without them); rerun ts.scan(model, texts)"
        )
    spikes = result.spikes.tokens
    return ExcessKurtosis(
        model=result.model,
        per_layer=stats.per_layer(),
        per_layer_without_spikes=stats.without(t.token for t in spikes),
        n_tokens=stats.n_tokens,
        n_spike_tokens=len(spikes),
        truncated=stats.truncated,
        corpus=result.corpus,
        settings={
            "abs_threshold": result.config.abs_threshold,
            "rel_threshold": result.config.rel_threshold,
            "max_candidates": stats.capacity,
        },
    )


__all__ = [
    "KURTOSIS_DEFINITION",
    "ExcessKurtosis",
    "KurtosisProbe",
    "KurtosisStats",
    "excess_kurtosis",
    "token_kurtosis",
]
