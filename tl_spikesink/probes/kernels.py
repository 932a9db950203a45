"""Fused CPU reductions: one pass over an activation where torch needs five.

The spike probe's reduction of an activation is a bit pattern, a row maximum, a histogram and a
search of the few rows that can hold an entry. In torch those are separate calls, each reading
the whole activation (and the histogram's ``bincount`` a second, shifted copy of it); on a CPU
that costs more than the arithmetic, and the copies compete with the model's weights for the
cache (docs/speed.md). :func:`spike_entries` does all of it in one compiled pass over the
activation, straight from the hook, while the activation is still in cache;
:func:`token_kurtosis` does the same for the kurtosis probe's moments.

Numba compiles them (:mod:`~tl_spikesink.probes.compiled`) on a process's first scan (seconds,
then cached on disk). Without numba, on a GPU, with ``TL_SPIKESINK_KERNELS=0`` or inside
:func:`switched_off`, the probes run their torch reductions instead: the same histograms and
entries bit for bit, the kurtosis to float32 rounding (``tests/unit/probes/test_kernels.py``).
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
    hist = np.zeros(N_BINS, np.int64)
    spike_entries(x, np.zeros(2, bool), np.zeros((2, 4), np.int32), hist, 1.0, 1, 1, BIN_SHIFT)
    token_kurtosis(x)
    return True


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
    """Histogram and kept entries of one activation, by the spike probe's torch rules.

    Args:
        x: the activation, ``[..., d]`` (read as float32, rows flattened).
        pads: bool per row, True at pads (never counted, never kept).
        where: int32 ``[row, 4]``: each row's text index, start, position and token id.
        hist: int64 histogram of ``|x|``'s float32 bits ``>> shift``, added to in place.
        threshold: entries above it are kept, unless fewer than `top_k` or more than
            `capacity` are above it: then the `top_k` (`capacity`) largest, ties included.
        top_k: the fewest entries kept.
        capacity: the most entries kept above `threshold` (ties aside).
        shift: the histogram's bin of a bit pattern is the pattern ``>> shift``.

    Returns:
        (|x|, x, metadata) of the kept entries, row-major; the metadata columns are text
        index, start, position, channel and token id. Then the number of entries above
        `threshold`.
    """
    flat = _rows(x)
    keys, values, meta, n_above = _kernels().spike_entries(
        flat, flat.view(np.int32), pads, where, hist, _bits(threshold), top_k, capacity, shift
    )
    return torch.from_numpy(keys), torch.from_numpy(values), torch.from_numpy(meta), int(n_above)


def token_kurtosis(
    x: Float[torch.Tensor, "... d_model"],
) -> tuple[Float[torch.Tensor, " row"], Float[torch.Tensor, " row"]]:
    """Each row's excess kurtosis and max |x| (:func:`.kurtosis.token_kurtosis`, and a max).

    The moments are summed in float64, one row at a time: the same numbers as the torch
    version to float32 rounding, in one pass over the activation instead of eight.
    """
    k, peak = _kernels().token_kurtosis(_rows(x))
    return torch.from_numpy(k), torch.from_numpy(peak)


def _rows(x: torch.Tensor) -> np.ndarray:
    """`x` as the kernels read it: float32 ``[rows, d]``, C-contiguous, sharing memory if it can."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    # numpy's reshape of a contiguous array is a view, and cheaper than torch's view (a hook
    # runs this ~100 times a forward, with its objects out of cache).
    return x.detach().numpy().reshape(-1, x.shape[-1])


@cache
def _bits(threshold: float) -> int:
    """`threshold` as float32 bits, the form the spike kernel compares."""
    return int(np.float32(threshold).view(np.int32))
