"""Fused CPU reductions: one pass over an activation where torch needs five.

The spike probe's reduction of an activation is a bit pattern, a row maximum, a histogram and a
search of the few rows that can hold an entry. In torch those are separate calls, each reading
the whole activation (and the histogram's ``bincount`` a second, shifted copy of it); on a CPU
that costs more than the arithmetic, and the copies compete with the model's weights for the
cache (docs/speed.md). :class:`SpikeKernel` does all of it in one compiled pass over the
activation, straight from the hook, while the activation is still in cache;
:func:`token_kurtosis_into` does the same for the kurtosis probe's moments, and
:class:`SinkKernel` for the sink probe's sums over each attention pattern. Each writes into
arrays its probe made once per pass (at batch size 1, a hook's own objects cost more than its
arithmetic).

Numba compiles them (:mod:`~tl_spikesink.probes.compiled`) on a process's first scan (seconds,
then cached on disk). Without numba, on a GPU, with ``TL_SPIKESINK_KERNELS=0`` or inside
:func:`switched_off`, the probes run their torch reductions instead: the same histograms and
entries bit for bit, the kurtosis and the sink sums to float32 rounding
(``tests/unit/probes/test_kernels.py``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from functools import cache
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.probes.reducers import BIN_SHIFT, N_BINS

_off = False
"""Set by :func:`switched_off`; the environment variable is read once per process."""


@cache
def _kernels() -> Any:
    """The module of compiled kernels, or None where numba is missing or they are switched off."""
    if os.environ.get("TL_SPIKESINK_KERNELS", "1") == "0":
        return None
    try:
        from tl_spikesink.probes import compiled
    except ImportError:  # numba is not installed
        return None
    return compiled


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can reduce `x` (a CPU tensor, with numba installed, not switched off)."""
    return not _off and x.device.type == "cpu" and _kernels() is not None


@contextlib.contextmanager
def switched_off() -> Iterator[None]:
    """Run the torch reductions instead inside this block (to compare the two, or time them)."""
    global _off
    before, _off = _off, True
    try:
        yield
    finally:
        _off = before


def warm_up() -> bool:
    """Compile the kernels now (or load them from the disk cache); False where they are off.

    A scan does this on its first CPU hook; call it first where that would be measured (a
    benchmark's baseline), as the numba runtime and its code take some 60-70 MiB once per process.
    """
    x = torch.zeros(2, 4)
    if not available(x):
        return False
    # Each array rank a scan passes is its own compiled version: 2-d here, 3-d in the probes.
    for act in (x, x[None]):
        pads, where = np.zeros(2, bool), np.zeros((2, 4), np.int32)
        spike_entries(act, pads, where, np.zeros(N_BINS, np.int64), 1.0, 1, 1, BIN_SHIFT)
        token_kurtosis(act)
    # The sink kernel's arguments as its probe makes them, for one sequence of two tokens.
    from tl_spikesink.corpus import Batch
    from tl_spikesink.probes.engine import Step
    from tl_spikesink.probes.sinks import SinkProbe

    tokens, zero = torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    mask = torch.ones(1, 2, dtype=torch.bool)
    sinks = SinkProbe(1, 1, 0.5, 0.3, 1, 1, 4, min_len=1, causal=True)
    batch = Batch(tokens, mask, text_index=zero, start=zero, first=zero, lengths=zero + 2)
    with torch.inference_mode():
        sinks.start_batch(Step(0, batch, tokens, mask, has_pads=False))
        sinks.fused(torch.zeros(1, 1, 2, 2), 0)
    int32 = np.zeros(2, np.int32)
    group_order(int32, int32, np.zeros((2, 5), np.int32))
    return True


class Arena:
    """Where the spike kernel writes the entries it keeps, hook after hook, for one forward pass.

    A hook's own tensors and Python objects cost more than its arithmetic at batch size 1
    (docs/speed.md): the kernel writes into these arrays instead, and the probe takes them all
    at the end of the pass. It grows (by doubling) when a hook would overflow it.
    """

    def __init__(self, n_slots: int, size: int = 1024):
        self.overflow = np.zeros(n_slots, bool)
        self.fill = np.zeros(2, np.int64)  # [entries written, entries needed on overflow]
        self._allocate(size)

    def _allocate(self, size: int) -> None:
        n = int(self.fill[0])
        old = getattr(self, "args", None)
        keys, values = np.empty(size, np.int32), np.empty(size, np.float32)
        meta, slots = np.empty((size, 5), np.int32), np.empty(size, np.int32)
        if old is not None:
            for new, was in zip((keys, values, meta, slots), old, strict=False):
                new[:n] = was[:n]
        # What the kernel takes after the probe's own arguments, in its order.
        self.args = (keys, values, meta, slots, self.overflow, self.fill)

    def grow(self) -> None:
        """Make room for what the last call needed."""
        self._allocate(max(2 * len(self.args[0]), int(self.fill[1])))

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
        """Copies of (|x|, x, metadata, slot, overflow per slot) written so far; then empty."""
        n = int(self.fill[0])
        keys, values, meta, slots = (a[:n].copy() for a in self.args[:4])
        overflow = self.overflow.copy()
        self.fill[0], self.overflow[:] = 0, False
        return (
            torch.from_numpy(keys.view(np.float32)),
            torch.from_numpy(values),
            torch.from_numpy(meta),
            slots,
            overflow,
        )


_NO_KURTOSIS = (np.zeros((1, 1), np.float32), np.zeros((1, 1), np.int32), np.zeros(1, bool))


class Frame:
    """Arrays a compiled C entry point reads and writes, by address: one table row each.

    A call through numba's dispatcher unboxes every array argument, and torch's ``numpy()``
    makes an array of the activation: at batch size 1, out of cache after the forward's matrix
    products, about 20 µs a hook, half of what the spike kernel's pass costs (docs/speed.md).
    A C call with the activation's address and this table's costs about 7 µs. The table is
    (address, size of each dimension) per array; the frame keeps its arrays alive, and checks
    each against the dtype and rank the kernel reads it as, since nothing checks them after.
    """

    def __init__(self, spec: tuple[tuple[type, int], ...], arrays: tuple[np.ndarray, ...]):
        if len(arrays) != len(spec):
            raise ValueError(f"the kernel reads {len(spec)} arrays, got {len(arrays)}")
        table = np.ones((len(arrays), 4), np.int64)
        for i, (a, (dtype, ndim)) in enumerate(zip(arrays, spec, strict=True)):
            if a.dtype != dtype or a.ndim != ndim or not a.flags.c_contiguous:
                raise TypeError(
                    f"kernel array {i}: the kernel reads a C-contiguous {np.dtype(dtype)} array "
                    f"with {ndim} dimensions, got {a.dtype} {a.shape}"
                )
            table[i, 0] = a.ctypes.data
            table[i, 1 : 1 + ndim] = a.shape
        self.arrays, self.table = arrays, table
        self.address = table.ctypes.data


class SpikeKernel:
    """The spike kernel bound to one pass's arrays: ``kernel(act, slot)`` reduces an activation.

    Args:
        probe: ``(thresholds, settings, pads, where, hist)``: int32 float32-bit threshold per
            slot; int64 ``[top_k, capacity, shift]``; bool per row, True at pads (never counted,
            never kept); int32 ``[row, 4]``: each row's text index, start, position and token
            id; int64 ``[slot, bins]`` histogram of ``|x|``'s float32 bits ``>> shift``, added
            to in place.
        arena: where the kept entries go.
        kurtosis: ``(k, peak, seen)``, the kurtosis probe's arrays
            (:func:`token_kurtosis_into`), for calls given a layer.

    A call reduces `act` (``[..., d]``, read as float32 rows) into the arena and row `slot`
    of the histogram and returns the number of entries above the slot's threshold. Entries
    above the threshold are kept, unless fewer than ``top_k`` or more than ``capacity`` are:
    then the ``top_k`` (``capacity``) largest, ties included (more than ``capacity`` sets the
    slot's overflow flag). Each kept entry's metadata is its text index, start, position,
    channel and token id. With ``layer >= 0`` it also writes :func:`token_kurtosis_into` of
    every row at that layer (pads get 0), in the same pass.
    """

    def __init__(self, probe: tuple, arena: Arena, kurtosis: tuple = _NO_KURTOSIS):
        self.parts, self.arena = (probe, kurtosis), arena
        self.call = _kernels().spike_call.ctypes
        self._frame()

    def _frame(self) -> None:
        probe, kurtosis = self.parts
        self.frame = Frame(_kernels().SPIKE_FRAME, (*probe, *self.arena.args, *kurtosis))
        self.address = self.frame.address

    def __call__(self, act: torch.Tensor, slot: int, layer: int = -1) -> int:
        """Reduce `act` into row `slot` (and kurtosis row `layer`, if >= 0); entries above."""
        x = _float32(act)  # kept here until the call returns: the kernel reads its memory
        d = x.shape[-1]
        at = (x.data_ptr(), x.numel() // d, d, slot, layer)
        while (n_above := self.call(*at, self.address)) == -1:
            self.arena.grow()  # the arena was full: grow it and call again
            self._frame()
        if n_above < 0:
            _misfit("spike", tuple(x.shape), slot, layer)
        return n_above


def spike_entries(
    x: torch.Tensor,
    pads: np.ndarray,
    where: np.ndarray,
    hist: np.ndarray,
    threshold: float,
    top_k: int,
    capacity: int,
    shift: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """:class:`SpikeKernel` for one activation on its own, with one threshold.

    Returns (|x|, x, metadata) of its kept entries, row-major, and the number of entries above
    `threshold`; `hist` (int64 ``[bins]``) is added to.
    """
    arena = Arena(1, size=16)
    settings = np.array([top_k, capacity, shift], np.int64)
    thresholds = np.array([float_bits(threshold)], np.int32)
    n_above = SpikeKernel((thresholds, settings, pads, where, hist[None]), arena)(x, 0)
    keys, values, meta, _, _ = arena.take()
    return keys, values, meta, n_above


class SinkKernel:
    """The sink kernel bound to one pass's arrays: ``kernel(pattern, layer)`` adds one layer.

    Args:
        batch: the pass's ``(query_w, key_w, seen_by, eligible, ratio_t, ratio_keys,
            rel_pos)``: float32 ``[batch, 2, query]`` query weights (every real query; Eq. 27's
            first T), float32 key positions, float64 ``[batch, key]`` how many queries see each
            key, bool ``[batch, key]`` keys that may vote, float32 ``[batch]`` T of each
            sequence the ratio reads (0: too short), bool ``[batch, key]`` keys k < T // 2,
            float32 ``[batch, query]`` positions.
        epsilon: the sink threshold.
        causal: the pattern is causal (its entries past the query, exactly 0, are not read).
        sums: the probe's ``(alpha_sum, mass_sum, votes, sink_head_count, distance_sum,
            distance_nosink_sum, distance_nosink_count)``, added to in place.

    A call reads a ``[batch, head, query, key]`` pattern (as float32, right-padded: no NaN
    rows) once, and leaves nothing for the end of the pass, where the torch path takes four
    products and a dozen reductions (the same sums to float32 rounding).
    """

    def __init__(self, batch: tuple, epsilon: float, causal: bool, sums: tuple):
        scalars = np.array([epsilon, float(causal)])
        self.frame = Frame(_kernels().SINK_FRAME, (*batch, scalars, *sums))
        self.call = _kernels().sink_call.ctypes

    def __call__(self, pattern: torch.Tensor, layer: int) -> None:
        """Add `pattern`'s sums to row `layer` of the probe's."""
        p = _float32(pattern)
        b, h, q, k = p.shape
        if self.call(p.data_ptr(), b, h, q, k, layer, self.frame.address) < 0:
            _misfit("sink", (b, h, q, k), layer)


def _misfit(kernel: str, shape: tuple[int, ...], *at: int) -> None:
    raise SpikeSinkError(
        f"the {kernel} kernel's arrays do not fit an activation of shape {shape} at {at}: they "
        "were made for another batch or model; make them again at the batch's start_batch"
    )


def token_kurtosis(
    x: Float[torch.Tensor, "... d_model"],
) -> tuple[Float[torch.Tensor, " row"], Float[torch.Tensor, " row"]]:
    """Each row's excess kurtosis and max |x| (:func:`.kurtosis.token_kurtosis`, and a max).

    The moments are summed in float64, one row at a time: the same numbers as the torch
    version to float32 rounding, in one pass over the activation instead of eight.
    """
    rows = x.numel() // x.shape[-1]
    k, peak = torch.empty(1, rows), torch.empty(1, rows)
    token_kurtosis_into(x, 0, (k.numpy(), peak.numpy().view(np.int32), np.zeros(1, bool)))
    return k[0], peak[0]


def token_kurtosis_into(x: torch.Tensor, layer: int, probe: tuple) -> None:
    """:func:`token_kurtosis` of one layer, written at row `layer` of the kurtosis probe's arrays.

    `probe` is ``(k, peak, seen)``: float32 ``[layer, row]``, the same as int32 bits, and a bool
    per layer that marks it done.
    """
    _kernels().token_kurtosis(_array(x), layer, *probe)


def group_order(groups: np.ndarray, bits: np.ndarray, meta: np.ndarray) -> np.ndarray | None:
    """Indices that sort entries by group, then key descending, then metadata; None without numba.

    `groups` is each entry's group (int), `bits` its key's float32 bit pattern (>= 0), `meta`
    its int metadata rows, compared column by column. The same order as
    :func:`~tl_spikesink.probes.reducers.total_order` of the (group, key) pairs, by a radix
    sort: 2.5 ms against 6.4 ms for the 82,000 entries of a scan's final selection.
    """
    if _off or _kernels() is None:
        return None
    return _kernels().group_order(groups, bits, np.ascontiguousarray(meta))


def _array(x: torch.Tensor) -> np.ndarray:
    """`x` as the kernels read it: float32, C-contiguous, in its own shape.

    It shares `x`'s memory where it can (a hook's activation already is all of that); the
    kernels flatten the rows themselves.
    """
    if x.requires_grad:  # never inside the engine's inference mode; detach makes a tensor
        x = x.detach()
    return _float32(x).numpy()


def _float32(x: torch.Tensor) -> torch.Tensor:
    """`x` as float32 and C-contiguous (itself where it already is, as a hook's activation)."""
    if x.dtype is not torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    return x


def float_bits(threshold: float) -> int:
    """`threshold` as float32 bits, the form the spike kernel compares."""
    return int(np.float32(threshold).view(np.int32))
