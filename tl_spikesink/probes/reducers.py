"""Mergeable reducers: what a scan keeps of each batch instead of the activations themselves.

Each reducer is a frozen value with `merge`: reducing shard A and shard B and merging equals
reducing A + B. That is what lets a corpus stream through in batches, and be split over
processes, without new code in the analyses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int

from tl_spikesink.errors import SpikeSinkError

N_BINS = 1 << 11
"""Histogram bins: the top 11 bits of a non-negative float32 (exponent + 3 mantissa bits)."""
BIN_SHIFT = 20


def abs_bits(
    x: Float[torch.Tensor, ...], out: torch.Tensor | None = None
) -> Int[torch.Tensor, ...]:
    """The float32 bit pattern of |x|, as int32 (into `out` if given): ordered exactly like |x|.

    The bit pattern of a non-negative float32 is monotone in its value, so with the sign bit
    cleared its high bits (`>> BIN_SHIFT`) are a log-scale bin index of |x|: 8 bins per octave,
    exact for every float32 range, with no range to choose and nothing to clip.
    """
    return torch.bitwise_and(x.float().contiguous().view(torch.int32), 0x7FFFFFFF, out=out)


def bin_edges(bins: torch.Tensor) -> torch.Tensor:
    """Lower edge of each bin `abs_bits(x) >> BIN_SHIFT`."""
    return (bins.to(torch.int32) << BIN_SHIFT).view(torch.float32)


def histogram_quantile(counts: Int[torch.Tensor, "... bins"], q: float) -> Float[torch.Tensor, ...]:
    """The `q`-quantile of each histogram, interpolated geometrically within its bin.

    Bins are 9 % wide, so the answer is within about 5 % of the exact quantile.
    """
    counts = counts.double()
    total = counts.sum(-1, keepdim=True)
    cum = counts.cumsum(-1)
    target = q * total
    idx = torch.searchsorted(cum, target).clamp(max=counts.shape[-1] - 1)
    below = torch.where(idx > 0, cum.gather(-1, (idx - 1).clamp(min=0)), torch.zeros_like(target))
    inside = counts.gather(-1, idx).clamp(min=1)
    frac = ((target - below) / inside).clamp(0, 1)
    lo = bin_edges(idx).double()
    hi = bin_edges(idx + 1).double()
    # Bin 0 holds zeros and denormals: no log-interpolation below the smallest normal float.
    value = torch.where(lo > 0, lo * (hi / lo.clamp(min=1e-38)) ** frac, hi * frac)
    return torch.where(total > 0, value, torch.full_like(value, float("nan"))).squeeze(-1).float()


class Buffers:
    """Scratch tensors reused from hook to hook, by name.

    On CPU a fresh activation-sized tensor costs its page faults again on every call (several
    milliseconds for a 4 MB attention pattern, more than the arithmetic on it); a buffer handed
    back as ``out=`` is resized in place and keeps its pages.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def __call__(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """The buffer `name`, resized to `shape` (its storage only ever grows)."""
        buf = self._bufs.get(name)
        if buf is None or buf.dtype != dtype or buf.device != device:
            buf = self._bufs[name] = torch.empty(0, dtype=dtype, device=device)
        return buf.resize_(shape)


STAGE_BYTES = 8 << 20
"""What a :class:`Stage` holds before reducing (at least one activation): every layer of a short
batch at once, yet small enough to leave a CPU's last-level cache to the weights."""


class Stage:
    """Activations copied in as hooks fire, reduced together: one reduction for many layers.

    At batch size 1 a reduction costs what its torch calls cost, whatever their size, so one
    reduction per pass instead of one per layer is what keeps a probe close to a bare forward.
    `reduce(keys, x)` gets the keys given to :meth:`add` and their activations stacked as
    float32 ``[n, tokens, d]``; it runs when the stage is full (:data:`STAGE_BYTES`), when an
    activation of another shape comes, and on :meth:`flush`. Copies, not references: a later
    write hook may change a tensor in place (``hook_resid_pre`` is the previous
    ``hook_resid_post``).
    """

    def __init__(self, buffers: Buffers, name: str, most: int, reduce: Callable[..., None]):
        self.buffers, self.name, self.most, self.reduce = buffers, name, most, reduce
        self.keys: list[Any] = []
        self.x = torch.zeros(0, 0, 0)

    def add(self, key: Any, act: torch.Tensor) -> None:
        """Copy `act` in (as float32 ``[tokens, d]``), reducing what is staged first if needed."""
        d = act.shape[-1]
        shape = (act.numel() // d, d)
        if self.keys and (shape != self.x.shape[1:] or len(self.keys) == len(self.x)):
            self.flush()
        if not self.keys:
            slots = max(1, min(self.most, STAGE_BYTES // (4 * act.numel())))
            self.x = self.buffers(self.name, (slots, *shape), torch.float32, act.device)
        self.x[len(self.keys)].copy_(act.reshape(shape))
        self.keys.append(key)

    def flush(self) -> None:
        """Reduce what is staged, if anything."""
        keys, self.keys = self.keys, []
        if keys:
            self.reduce(keys, self.x[: len(keys)])

    def clear(self) -> None:
        """Drop what is staged (a new batch begins)."""
        self.keys = []


@dataclass(frozen=True)
class TopEntries:
    """The largest entries seen, by key, with integer metadata; duplicates never arise.

    Keeps the top `max(k, min(capacity, #keys > threshold))` entries: always the top `k`, and
    every entry above `threshold` unless there are more than `capacity` of them (then `truncated`).
    This rule merges exactly: merge(reduce(A), reduce(B)) == reduce(A + B), ties aside.
    """

    keys: Float[torch.Tensor, " n"]
    values: Float[torch.Tensor, " n"]
    meta: Int[torch.Tensor, "n m"]
    k: int
    threshold: float
    capacity: int
    truncated: bool = False

    @classmethod
    def empty(cls, n_meta: int, k: int, threshold: float, capacity: int) -> TopEntries:
        """No entries yet."""
        return cls(
            torch.zeros(0),
            torch.zeros(0),
            torch.zeros(0, n_meta, dtype=torch.int32),
            k,
            threshold,
            capacity,
        )

    @classmethod
    def select(
        cls,
        keys: Float[torch.Tensor, " n"],
        values: Float[torch.Tensor, " n"],
        meta: Int[torch.Tensor, "n m"],
        k: int,
        threshold: float,
        capacity: int,
    ) -> TopEntries:
        """Reduce candidate entries; a negative key marks an entry to leave out (a pad)."""
        # numpy, not torch: boolean and fancy indexing of a few thousand rows costs a tenth.
        keys, values, meta = (t.detach().cpu().numpy() for t in (keys, values, meta))
        valid = keys >= 0
        if not valid.all():
            keys, values, meta = keys[valid], values[valid], meta[valid]
        n_above = int((keys > threshold).sum())
        m = max(k, min(capacity, n_above))
        order = total_order(keys, meta)[:m]
        return cls(
            torch.from_numpy(keys[order]),
            torch.from_numpy(values[order]),
            torch.from_numpy(meta[order]),
            k,
            threshold,
            capacity,
            n_above > capacity,
        )

    def merge(self, other: TopEntries) -> TopEntries:
        """The reduction of both inputs together."""
        merged = TopEntries.select(
            torch.cat([self.keys, other.keys]),
            torch.cat([self.values, other.values]),
            torch.cat([self.meta, other.meta]),
            self.k,
            self.threshold,
            self.capacity,
        )
        return replace(merged, truncated=merged.truncated or self.truncated or other.truncated)

    def shift_column(self, column: int, offset: int) -> TopEntries:
        """The same entries with `offset` added to one metadata column (e.g. text indices)."""
        meta = self.meta.clone()
        meta[:, column] += offset
        return replace(self, meta=meta)

    def __len__(self) -> int:
        return int(self.keys.numel())


def select_groups(
    keys: Float[torch.Tensor, " n"],
    values: Float[torch.Tensor, " n"],
    meta: Int[torch.Tensor, "n m"],
    groups: np.ndarray,
    like: list[TopEntries],
) -> list[TopEntries]:
    """:meth:`TopEntries.select` of every group at once, with the settings of `like[group]`.

    One sort of every entry (by group, then :func:`total_order`'s order) instead of one per
    group: the same entries in the same order, at a fraction of the cost where there are many
    small groups (the spike probe's 3 sites x layers).
    """
    keys, values, meta = (t.detach().cpu().numpy() for t in (keys, values, meta))
    valid = keys >= 0
    if not valid.all():
        keys, values, meta, groups = keys[valid], values[valid], meta[valid], groups[valid]
    n = len(like)
    # One sort by (group, descending key): a key's float32 bits are ordered like the key (it
    # is >= 0; -0.0 is 0.0). Ties go to the metadata as in total_order.
    from tl_spikesink.probes import kernels  # it imports this module

    bits = keys.astype(np.float32, copy=False).view(np.int32) & 0x7FFFFFFF
    order = kernels.group_order(groups, bits, meta)
    if order is None:
        paired = groups.astype(np.int64) << 32 | (0x7FFFFFFF - bits)
        order = total_order(paired, meta, ascending=True)
    threshold = np.array([e.threshold for e in like], np.float64)
    counts = np.bincount(groups, minlength=n)
    above = np.bincount(groups, weights=keys > threshold[groups], minlength=n).astype(np.int64)
    starts = np.cumsum(counts) - counts
    k = np.array([e.k for e in like])
    m = np.minimum(np.maximum(k, np.minimum([e.capacity for e in like], above)), counts)
    # Gather what every group keeps at once; each group's result is a copy of its slice (a
    # view would keep every group's entries alive for as long as any one of them).
    ends = np.cumsum(m)
    take = order[np.repeat(starts - ends + m, m) + np.arange(ends[-1] if n else 0)]
    keys, values, meta = keys[take], values[take], meta[take]
    return [
        TopEntries(
            torch.from_numpy(keys[end - size : end].copy()),
            torch.from_numpy(values[end - size : end].copy()),
            torch.from_numpy(meta[end - size : end].copy()),
            e.k,
            e.threshold,
            e.capacity,
            bool(above[g] > e.capacity),
        )
        for g, (e, size, end) in enumerate(zip(like, m, ends, strict=True))
    ]


def total_order(keys: np.ndarray, meta: np.ndarray, ascending: bool = False) -> np.ndarray:
    """Indices that sort by key, descending unless `ascending`, then by the metadata columns.

    The columns count left to right. A total order makes merges independent of batch order.
    One sort on the key, then a lexsort of the tied entries alone: the same order as one lexsort
    of everything on every column, at a third of the cost (ties are a minority, mostly the
    first token's identical rows).
    """
    order = np.argsort(keys if ascending else -keys, kind="stable")
    ranked = keys[order]
    tie = (ranked[1:] == ranked[:-1]) | (np.isnan(ranked[1:]) & np.isnan(ranked[:-1]))
    if not tie.any():
        return order
    in_tie = np.zeros(len(ranked), bool)
    in_tie[1:] |= tie
    in_tie[:-1] |= tie
    at = np.nonzero(in_tie)[0]
    run = np.cumsum(np.concatenate([[True], ~tie]))[at]  # tied runs are contiguous in `order`
    tied = order[at]
    order[at] = tied[np.lexsort((*meta[tied].T[::-1], run))]
    return order


def share(items: tuple, pred: Callable[[Any], bool]) -> float:
    """Share of `items` for which `pred` holds (NaN for none)."""
    return sum(map(pred, items)) / len(items) if items else float("nan")


class TokenShares:
    """``share_first`` / ``share_delimiter`` of a result's ``tokens`` (spike or sink tokens)."""

    tokens: tuple

    @property
    def share_first(self) -> float:
        """Share of the tokens that are the first token of their sequence."""
        return share(self.tokens, lambda t: t.token.is_first)

    @property
    def share_delimiter(self) -> float:
        """Share of the tokens that are delimiters (punctuation or whitespace)."""
        return share(self.tokens, lambda t: t.is_delimiter)


def check_same(a: Any, b: Any, fields: tuple[str, ...]) -> None:
    """Refuse to merge two results that differ in any of `fields` (model, settings, ...)."""
    for f in fields:
        if getattr(a, f) != getattr(b, f):
            raise SpikeSinkError(
                f"cannot merge results with different {f} "
                f"({getattr(a, f)!r} vs {getattr(b, f)!r}); "
                "scan both shards with the same model and settings"
            )
