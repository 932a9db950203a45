"""Position masks of spike and sink tokens, and the token classes SAE reports are split by.

Two sources, for two situations:

* **From a scan** (:func:`scan_mask`): the spike and sink tokens a :class:`~tl_spikesink.ScanResult`
  found, by :class:`~tl_spikesink.TokenRef`. Exact, but only for batches of the corpus that was
  scanned (the same texts, tokenized and chunked the same way).
* **On the fly** (:class:`SpikeRule`): from the activation at one hook point, for any text. A
  position is a spike token when its norm exceeds `norm_ratio` × the median norm of the batch's
  real tokens, or when |x| at any of the scan's spike channels exceeds the scan's
  massive-activation cut (:meth:`SpikeRule.from_scan`). Sinks cannot be told this way (they are a
  property of attention patterns), so on-the-fly masks are spike masks.

Token classes are exclusive, in priority order: a spike token that is also a sink token counts as
a spike token, so the classes of a batch partition its real tokens and every per-class sum adds
up to the total.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from jaxtyping import Bool, Float, Int

from tl_spikesink.corpus import Batch
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.tokens import TokenRef, is_delimiter

if TYPE_CHECKING:
    from tl_spikesink.probes.scan import ScanResult

TokenClass = Literal["spike", "sink", "delimiter", "other"]
TOKEN_CLASSES: tuple[TokenClass, ...] = get_args(TokenClass)
"""Exclusive token classes, in priority order (a spike token that is a sink counts as spike)."""
MaskKind = Literal["spike", "sink"]
DEFAULT_NORM_RATIO = 10.0
"""On SmolLM2's plateau (blocks 11-28) the first token's norm is ~140x the median and no other
token exceeds 1.3x, so any ratio from ~2 to ~100 gives the same mask; 10 leaves room both ways."""


@dataclass(frozen=True)
class SpikeRule:
    """How to tell spike tokens from the activation at one hook point, on the fly.

    A real position is a spike token when either test holds (a test set to None is off):

    * ``norm_ratio``: ‖x‖ > norm_ratio × the median ‖x‖ over the batch's real tokens;
    * ``channels`` / ``cut``: |x| at any of `channels` exceeds `cut`.
    """

    norm_ratio: float | None = DEFAULT_NORM_RATIO
    """A spike token's norm exceeds this multiple of the batch median (None: no norm test)."""
    channels: tuple[int, ...] = ()
    """Spike channels for the channel test (empty: no channel test)."""
    cut: float | None = None
    """|x| above which a spike channel marks a spike token (needed with `channels`)."""

    def __post_init__(self) -> None:
        if self.norm_ratio is None and not self.channels:
            raise SpikeSinkError(
                "SpikeRule needs a test: set norm_ratio, or channels= and cut= (see from_scan)"
            )
        if self.norm_ratio is not None and self.norm_ratio <= 1:
            raise SpikeSinkError(
                f"norm_ratio must exceed 1 (a multiple of the median norm), got {self.norm_ratio}"
            )
        if self.channels and (self.cut is None or self.cut <= 0):
            raise SpikeSinkError(f"channels= needs a positive cut= (|x| threshold), got {self.cut}")

    @classmethod
    def from_scan(
        cls, scan: ScanResult, layer: int, *, norm_ratio: float | None = None
    ) -> SpikeRule:
        """The scan's definition at `layer`'s resid_post: its spike channels and massive cut.

        Args:
            scan: a clean scan of the model (any corpus: channels and medians describe the model).
            layer: the block whose ``hook_resid_post`` the rule will read.
            norm_ratio: also apply the norm test (default: channel test only).
        """
        from tl_spikesink.interventions.base import spike_cuts

        if not 0 <= layer < scan.n_layers:
            raise SpikeSinkError(f"layer {layer} is out of range (the scan has {scan.n_layers})")
        if not scan.spikes.channels:
            raise SpikeSinkError(
                f"the scan of {scan.model} found no spike channel; use SpikeRule(norm_ratio=...)"
            )
        return cls(
            norm_ratio=norm_ratio,
            channels=tuple(scan.spikes.channels),
            cut=spike_cuts(scan, None, [layer])[layer],
        )

    def mask(
        self,
        x: Float[torch.Tensor, "batch pos d_model"],
        real: Bool[torch.Tensor, "batch pos"] | None = None,
    ) -> Bool[torch.Tensor, "batch pos"]:
        """Spike positions of one activation; `real` marks non-pad tokens (default: all)."""
        real = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device) if real is None else real
        out = torch.zeros_like(real)
        if self.norm_ratio is not None and bool(real.any()):
            norms = x.detach().float().norm(dim=-1)
            out |= norms > self.norm_ratio * norms[real].median()
        if self.channels:
            if max(self.channels) >= x.shape[-1]:
                raise SpikeSinkError(
                    f"spike channel {max(self.channels)} is out of range for an activation of "
                    f"width {x.shape[-1]}; build the rule from a scan of this model"
                )
            index = torch.tensor(self.channels, device=x.device)
            out |= (x.detach().index_select(-1, index).abs() > self.cut).any(-1)
        return out & real

    def describe(self) -> dict[str, Any]:
        """JSON-ready settings."""
        return {"norm_ratio": self.norm_ratio, "channels": list(self.channels), "cut": self.cut}


def scan_tokens(scan: ScanResult, kind: MaskKind) -> tuple[TokenRef, ...]:
    """The spike or sink tokens a scan found."""
    if kind == "spike":
        return tuple(t.token for t in scan.spikes.tokens)
    if kind == "sink":
        return tuple(t.token for t in scan.sinks.tokens)
    raise SpikeSinkError(f"unknown mask kind {kind!r}; choose one of {get_args(MaskKind)}")


def refs_mask(refs: Iterable[TokenRef], batch: Batch) -> Bool[torch.Tensor, "batch pos"]:
    """True at the positions of `refs` that lie in `batch` (a batch of the corpus they index)."""
    where: dict[tuple[int, int], list[int]] = defaultdict(list)
    for ref in refs:
        where[(ref.text_index, ref.start)].append(ref.position)
    mask = torch.zeros_like(batch.mask)
    rows = zip(batch.text_index.tolist(), batch.start.tolist(), batch.first.tolist(), strict=True)
    for row, (text, start, first) in enumerate(rows):
        for position in where.get((text, start), ()):
            col = first + position
            if col < mask.shape[1] and batch.mask[row, col]:
                mask[row, col] = True
    return mask


def scan_mask(scan: ScanResult, batch: Batch, kind: MaskKind) -> Bool[torch.Tensor, "batch pos"]:
    """The scan's spike (or sink) tokens as a [batch, pos] mask of one batch of its corpus."""
    return refs_mask(scan_tokens(scan, kind), batch)


class DelimiterIds:
    """Which token ids are delimiters (punctuation / whitespace), decoded once per id."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.known: dict[int, bool] = {}

    def __call__(self, tokens: Int[torch.Tensor, "batch pos"]) -> Bool[torch.Tensor, "batch pos"]:
        """Mask of delimiter tokens."""
        ids = tokens.unique().tolist()
        for i in ids:
            if i not in self.known:
                self.known[i] = is_delimiter(self.tokenizer.decode([i]))
        hits = [i for i in ids if self.known[i]]
        return torch.isin(tokens, torch.tensor(hits, dtype=tokens.dtype, device=tokens.device))


def token_classes(
    batch: Batch,
    spike: Bool[torch.Tensor, "batch pos"],
    sink: Bool[torch.Tensor, "batch pos"],
    delimiter: Bool[torch.Tensor, "batch pos"],
) -> Int[torch.Tensor, "batch pos"]:
    """Index into :data:`TOKEN_CLASSES` of every position (-1 at pads), by priority."""
    classes = torch.full(batch.mask.shape, TOKEN_CLASSES.index("other"), dtype=torch.long)
    # Lowest priority first, so higher classes overwrite.
    for name, mask in (("delimiter", delimiter), ("sink", sink), ("spike", spike)):
        classes[mask.cpu()] = TOKEN_CLASSES.index(name)
    classes[~batch.mask] = -1
    return classes


__all__ = [
    "DEFAULT_NORM_RATIO",
    "TOKEN_CLASSES",
    "DelimiterIds",
    "SpikeRule",
    "TokenClass",
    "refs_mask",
    "scan_mask",
    "scan_tokens",
    "token_classes",
]
