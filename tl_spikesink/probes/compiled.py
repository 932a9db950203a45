"""The numba kernels behind :mod:`tl_spikesink.probes.kernels` (imported only where numba is)."""

import numpy as np
from numba import njit

ABS = 0x7FFFFFFF
INF = 0x7F800000
"""float32 +inf as bits: a larger pattern is a NaN, which no float comparison keeps."""


@njit(cache=True, nogil=True)
def spike_entries(x, bits, pads, where, hist, thr_bits, top_k, capacity, shift):  # pragma: no cover
    """See :func:`tl_spikesink.probes.kernels.spike_entries`; `bits` are `x`'s float32 bits."""
    # Every comparison is on the bit pattern of |x|, ordered like |x| itself; the rules are
    # SpikeProbe._reduce's, and a NaN is never kept. Only the first loop reads every entry;
    # what follows reads the few rows that can hold a kept one.
    n, d = bits.shape
    local = np.zeros(hist.shape[0], np.int64)
    tok_max = np.empty(n, np.int32)
    nan_rows = False
    for i in range(n):
        if pads[i]:
            tok_max[i] = -1
            continue
        # Two loops, not one: the maximum alone runs in SIMD lanes; the histogram's scatter
        # cannot, and would hold the maximum back with it (2x slower together).
        m = 0
        for j in range(d):
            m = max(m, bits[i, j] & ABS)
        for j in range(d):
            local[(bits[i, j] & ABS) >> shift] += 1
        tok_max[i] = m
        nan_rows |= m > INF
    hist += local
    k = min(top_k, n)
    kth = np.partition(tok_max, n - k)[n - k] if k > 0 else -1
    if kth > INF:  # torch's topk ranks NaN first, and a NaN cut selects no row
        return np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros((0, 5), np.int32), 0
    cut = min(kth, thr_bits)
    n_above = 0
    for i in range(n):
        if thr_bits < tok_max[i] <= INF:
            for j in range(d):
                n_above += thr_bits < (bits[i, j] & ABS) <= INF
    if top_k <= n_above <= capacity:
        floor = thr_bits + 1
    else:
        m = top_k if n_above < top_k else capacity
        # The m-th largest entry is the last one kept. Only entries from the bin that holds it
        # upward compete (the histogram says which); with NaN rows, or fewer than m entries
        # above the lowest bin, every entry of every candidate row does, as in torch.
        top, count = hist.shape[0] - 1, local[hist.shape[0] - 1]
        while count < m and top > 0:
            top -= 1
            count += local[top]
        edge, lowest = top << shift, top << shift
        if nan_rows or top == 0:
            edge, lowest = cut, -1
        rows = np.nonzero((tok_max >= edge) & (tok_max > 0) & (tok_max <= INF))[0]
        pool = (bits[rows] & ABS).ravel()  # no NaN: a row with one has a NaN maximum
        pool = pool[pool >= lowest]
        m = min(m, len(pool))
        floor = np.partition(pool, len(pool) - m)[len(pool) - m] if m > 0 else INF + 1
        floor = max(floor, 1)  # exact zeros tie by the million and say nothing
    rows = np.nonzero((tok_max >= floor) & (tok_max >= cut) & (tok_max <= INF))[0]
    n_keep = 0
    for i in rows:
        for j in range(d):
            n_keep += floor <= (bits[i, j] & ABS) <= INF
    keys = np.empty(n_keep, np.int32)
    values = np.empty(n_keep, np.float32)
    meta = np.empty((n_keep, 5), np.int32)  # text_index, start, position, channel, token_id
    e = 0
    for i in rows:
        for j in range(d):
            b = bits[i, j] & ABS
            if floor <= b <= INF:
                keys[e], values[e] = b, x[i, j]
                meta[e, 0], meta[e, 1], meta[e, 2] = where[i, 0], where[i, 1], where[i, 2]
                meta[e, 3], meta[e, 4] = j, where[i, 3]
                e += 1
    return keys.view(np.float32), values, meta, n_above


# Reassociating the sums lets them run in SIMD lanes (the row's order of additions is not
# kept; torch does not keep it either). NaN and inf keep their IEEE meaning.
@njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def token_kurtosis(x):  # pragma: no cover
    """See :func:`tl_spikesink.probes.kernels.token_kurtosis`."""
    n, d = x.shape
    k = np.zeros(n, np.float32)
    peak = np.empty(n, np.int32)
    bits = x.view(np.int32)
    for i in range(n):
        total, top = 0.0, 0
        for j in range(d):
            total += x[i, j]
        # max |x| on the bit patterns: a float max does not vectorize (NaN rules), an int one
        # does, 10x faster. A NaN's pattern is above +inf's, so it wins, as in torch.
        for j in range(d):
            top = max(top, bits[i, j] & ABS)
        mean = total / d
        var, m4 = 0.0, 0.0
        for j in range(d):
            c = x[i, j] - mean
            var += c * c
            sq = x[i, j] * x[i, j]
            m4 += sq * sq
        var /= d - 1
        if var > 0:
            k[i] = max(m4 / d / (var * var) - 3.0, 0.0)
        peak[i] = top
    return k, peak.view(np.float32)
