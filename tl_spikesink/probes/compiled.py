"""The numba kernels behind :mod:`tl_spikesink.probes.kernels` (imported only where numba is)."""

import numpy as np
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

ABS = 0x7FFFFFFF
ABS32 = np.int32(ABS)
INF = 0x7F800000
"""float32 +inf as bits: a larger pattern is a NaN, which no float comparison keeps."""


@njit(cache=True, nogil=True)
def spike_into(
    x, slot, thresholds, cfg, pads, where, hist, keys, values, meta, slots, overflow, fill,
    kurt_k, kurt_peak, kurt_seen, kurt_layer,
):  # pragma: no cover
    """See :class:`tl_spikesink.probes.kernels.SpikeKernel`; `x` is float32 ``[..., d]``.

    With ``kurt_layer >= 0``, also :func:`token_kurtosis` of every real row into that row of
    `kurt_k` and `kurt_peak` (pads: 0), while the row is in cache.
    """
    # Every comparison is on the bit pattern of |x|, ordered like |x| itself; the rules are
    # SpikeProbe._reduce's, and a NaN is never kept. Only the first loop reads every entry;
    # what follows reads the few rows that can hold a kept one.
    d = x.shape[-1]
    flat = x.reshape((x.size // d, d))
    bits = flat.view(np.int32)
    n = bits.shape[0]
    top_k, capacity, shift = cfg[0], cfg[1], cfg[2]
    thr_bits = thresholds[slot]
    local = np.zeros(hist.shape[1], np.int64)
    tok_max = np.empty(n, np.int32)
    # Each entry above the threshold, as i * d + j, noted while its row is in cache; `flags`
    # is one row's (above: 1), padded to whole 8-byte words, read a word at a time.
    above = np.empty(max(1024, 2 * d), np.int64)
    flags = np.zeros(-(-d // 8) * 8, np.uint8)
    nan_rows = False
    n_above = 0
    for i in range(n):
        if pads[i]:
            tok_max[i] = -1
            if kurt_layer >= 0:
                kurt_k[kurt_layer, i], kurt_peak[kurt_layer, i] = 0.0, 0
            continue
        # Separate loops: the maximum runs in SIMD lanes (in int32: numba widens integer
        # arithmetic to int64, which AVX2 has no max for); the histogram's scatter cannot, and
        # would hold it back.
        m = np.int32(0)
        for j in range(d):
            m = np.int32(max(m, np.int32(bits[i, j] & ABS32)))
        for j in range(d):
            local[(bits[i, j] & ABS) >> shift] += 1
        tok_max[i] = m
        if kurt_layer >= 0:
            kurt_k[kurt_layer, i], kurt_peak[kurt_layer, i] = _row_kurtosis(flat, i), m
        if m > INF:  # torch never searches a row whose maximum is NaN
            nan_rows = True
        elif m > thr_bits:  # only such a row has entries above the threshold; most do not
            if n_above + len(flags) > len(above):
                grown = np.empty(2 * len(above) + len(flags), np.int64)
                grown[:n_above] = above[:n_above]
                above = grown
            n_above = _note_above(bits, i, thr_bits, flags, above, n_above)
    if kurt_layer >= 0:
        kurt_seen[kurt_layer] = True
    k = min(top_k, n)
    kth = np.partition(tok_max, n - k)[n - k] if k > 0 else -1
    e = fill[0]
    if kth > INF:  # torch's topk ranks NaN first, and a NaN cut selects no row
        _add_row(hist, slot, local)
        return 0
    if top_k <= n_above <= capacity:  # the usual case: every entry above the threshold
        if e + n_above > len(keys):  # the caller grows the arena and calls again
            fill[1] = e + n_above
            return -1
        _add_row(hist, slot, local)
        for a in range(n_above):
            i, j = above[a] // d, above[a] % d
            _put(keys, values, meta, slots, e, bits[i, j] & ABS, flat[i, j], where, i, j, slot)
            e += 1
        fill[0] = e
        return n_above
    # Otherwise every entry down to the m-th largest, ties included: only the entries that
    # can be among those are gathered, once, and the kept ones written from there.
    m = top_k if n_above < top_k else capacity
    # Every kept entry is at least the k-th largest token maximum (k = m tokens hold an entry
    # that large), or above the threshold when more than capacity are.
    low = thr_bits + 1 if n_above > capacity else (kth if k == m else 0)
    cut = min(kth, thr_bits)
    pool, at = _candidates(bits, tok_max, local, m, low, cut, nan_rows, shift, flags)
    m = min(m, len(pool))
    floor = np.partition(pool, len(pool) - m)[len(pool) - m] if m > 0 else INF + 1
    floor = max(floor, 1)  # exact zeros tie by the million and say nothing
    n_keep = 0
    for c in range(len(pool)):
        n_keep += pool[c] >= floor
    if e + n_keep > len(keys):
        fill[1] = e + n_keep
        return -1
    _add_row(hist, slot, local)
    for c in range(len(pool)):
        if pool[c] >= floor:
            i, j = at[c] // d, at[c] % d
            _put(keys, values, meta, slots, e, pool[c], flat[i, j], where, i, j, slot)
            e += 1
    fill[0] = e
    overflow[slot] |= n_above > capacity
    return n_above


@njit(cache=True, nogil=True, inline="always")
def _add_row(hist, slot, local):  # pragma: no cover
    row = hist[slot]  # `hist[slot] += local` makes a temporary: twice the time
    for b in range(len(local)):
        row[b] += local[b]


@njit(cache=True, nogil=True, inline="never")
def _note_above(bits, i, thr_bits, flags, above, n):  # pragma: no cover
    """Append row i's entries above the threshold to `above` from its n-th on; the new count.

    The flags run in SIMD lanes, and the positions are written without a branch, a word of 8
    flags at a time, skipping words of zeros: a branch per entry costs four times as much.
    Never inlined: in the caller's loop, LLVM leaves the row maximum's loop unvectorized.
    """
    d = bits.shape[1]
    for j in range(d):
        flags[j] = np.uint8((bits[i, j] & ABS32) > thr_bits)
    words = flags.view(np.uint64)
    for w in range(len(words)):
        if words[w] != 0:
            for j in range(8 * w, 8 * w + 8):
                above[n] = i * d + j
                n += flags[j]
    return n


@njit(cache=True, nogil=True, inline="always")
def _put(keys, values, meta, slots, e, b, value, where, i, j, slot):  # pragma: no cover
    keys[e], values[e], slots[e] = b, value, slot
    # text_index, start, position, channel, token_id
    meta[e, 0], meta[e, 1], meta[e, 2] = where[i, 0], where[i, 1], where[i, 2]
    meta[e, 3], meta[e, 4] = j, where[i, 3]


@njit(cache=True, nogil=True)
def _candidates(bits, tok_max, local, m, low, cut, nan_rows, shift, flags):  # pragma: no cover
    """(bits, i * d + j) of the entries that can be among the m largest, row-major.

    Those at least `low` and in the histogram's bins that hold the m largest. With NaN rows,
    or fewer than m entries above the lowest bin, every entry of every row whose maximum is at
    least `cut` competes, as in torch.
    """
    n, d = bits.shape
    top, count = local.shape[0] - 1, local[local.shape[0] - 1]
    while count < m and top > 0:
        top -= 1
        count += local[top]
    lowest = max(top << shift, low)
    if nan_rows or top == 0:
        lowest, count = -1, n * d
    first = cut if lowest < 0 else lowest
    at = np.empty(count + len(flags), np.int64)
    p = 0
    for i in range(n):
        if tok_max[i] >= first and tok_max[i] > 0 and tok_max[i] <= INF:
            p = _note_above(bits, i, np.int32(lowest - 1), flags, at, p)
    pool = np.empty(p, np.int32)
    for c in range(p):
        pool[c] = bits[at[c] // d, at[c] % d] & ABS
    return pool, at[:p]


# Reassociating the sums lets them run in SIMD lanes (the row's order of additions is not
# kept; torch does not keep it either). NaN and inf keep their IEEE meaning.
FAST = {"reassoc", "contract", "nsz", "arcp"}


@njit(cache=True, nogil=True)
def token_kurtosis(x, layer, k, peak, seen):  # pragma: no cover
    """See :func:`tl_spikesink.probes.kernels.token_kurtosis_into`; `peak` is int32 bits."""
    d = x.shape[-1]
    flat = x.reshape((x.size // d, d))
    bits = flat.view(np.int32)
    for i in range(flat.shape[0]):
        k[layer, i] = _row_kurtosis(flat, i)
        # max |x| on the bit patterns, in int32 (numba widens integer arithmetic to int64,
        # which AVX2 has no max for): a float max does not vectorize (NaN rules), an int one
        # does, 10x faster. A NaN's pattern is above +inf's, so it wins, as in torch.
        top = np.int32(0)
        for j in range(d):
            top = np.int32(max(top, np.int32(bits[i, j] & ABS32)))
        peak[layer, i] = top
    seen[layer] = True


@njit(cache=True, nogil=True, inline="never", fastmath=FAST)
def _row_kurtosis(flat, i):  # pragma: no cover
    """Row i's excess kurtosis, as :func:`tl_spikesink.probes.kurtosis.token_kurtosis`."""
    d = flat.shape[1]
    # One pass: the sums of (x - x0) and its square give the variance about the mean, with x0
    # the row's first entry, so nothing cancels unless x0 is far from the mean, and then the
    # variance is as large; in float64 on float32 inputs (the shifted-data algorithm: half
    # the time of two passes, one for the mean and one about it).
    shift = np.float64(flat[i, 0])
    s1, s2, m4 = 0.0, 0.0, 0.0
    for j in range(d):
        v = np.float64(flat[i, j])
        c = v - shift
        s1 += c
        s2 += c * c
        sq = v * v
        m4 += sq * sq
    var = (s2 - s1 * s1 / d) / (d - 1)
    return max(m4 / d / (var * var) - 3.0, 0.0) if var > 0 else 0.0


# The same reassociation as token_kurtosis: the sums run in SIMD lanes, in another order than
# torch's matrix products (float32 rounding apart, the same numbers).
@njit(cache=True, nogil=True, fastmath=FAST)
def sink_sums(p, layer, batch, sums):  # pragma: no cover
    """See :class:`tl_spikesink.probes.kernels.SinkKernel`."""
    query_w, key_w, seen_by, eligible, ratio_t, ratio_keys, rel_pos, eps, causal = batch
    alpha_sum, mass_sum, votes, sink_count, dist_sum, nosink_sum, nosink_count = sums
    b, h, q, k = p.shape
    w = ratio_keys.shape[1]
    got, early = np.empty(k, np.float32), np.empty(w, np.float32)
    for bi in range(b):
        for hi in range(h):
            got[:] = 0.0
            early[:] = 0.0
            dist, nosink, n_nosink = 0.0, 0.0, 0
            for qi in range(q):
                row = p[bi, hi, qi]
                wq, wr = query_w[bi, 0, qi], query_w[bi, 1, qi]
                total, weighted = np.float32(0.0), np.float32(0.0)
                # A causal pattern is exactly 0 past the query (softmax of -inf): half the
                # pattern need not be read.
                end = min(qi + 1, k) if causal else k
                for ki in range(end):
                    v = row[ki]
                    total += v
                    weighted += v * key_w[ki]
                    got[ki] += wq * v
                if wr != 0.0:
                    for ki in range(min(w, end)):
                        early[ki] += wr * row[ki]
                # Σ_j A_ij (i − j) over real queries, and the same without the first key,
                # renormalised (the distances with and without the sink).
                if wq != 0.0:
                    at = rel_pos[bi, qi]
                    d = at * total - weighted
                    dist += d
                    rest = total - row[0]
                    if at >= 1.0 and rest > 1e-6:
                        nosink += (d - row[0] * at) / rest
                        n_nosink += 1
            dist_sum[layer, hi] += dist
            nosink_sum[layer, hi] += nosink
            nosink_count[layer, hi] += n_nosink
            # What each key received, from the queries that can see it.
            for ki in range(k):
                if seen_by[bi, ki] > 0:
                    alpha_sum[layer, hi, ki] += got[ki]
                    mass_sum[layer, hi] += got[ki]
                    alpha = got[ki] / np.float32(max(seen_by[bi, ki], 1.0))
                    if alpha > eps and eligible[bi, ki]:
                        votes[bi, ki] += 1
            # Eq. 27: the head sinks in this sequence when a key k < T // 2 takes more than
            # eps of the first T queries' attention on average.
            if ratio_t[bi] > 0:
                best = np.float32(-1.0)
                for ki in range(w):
                    if ratio_keys[bi, ki]:
                        best = max(best, early[ki] / np.float32(ratio_t[bi]))
                if best > eps:
                    sink_count[layer, hi] += 1


@njit(cache=True, nogil=True)
def group_order(groups, bits, meta):  # pragma: no cover
    """See :func:`tl_spikesink.probes.kernels.group_order`."""
    n = len(bits)
    key, idx = np.empty(n, np.uint64), np.arange(n)
    top = np.uint64(0)
    for i in range(n):
        key[i] = (np.uint64(groups[i]) << np.uint64(31)) | np.uint64(0x7FFFFFFF - bits[i])
        top = max(top, key[i])
    # A stable radix sort, 11 bits a pass, of (key, index) pairs: a few passes over the
    # entries instead of a comparison sort's log n.
    key2, idx2 = np.empty(n, np.uint64), np.empty(n, np.int64)
    count = np.empty(2049, np.int64)
    shift = np.uint64(0)
    while shift == 0 or (top >> shift) > 0:
        count[:] = 0
        for i in range(n):
            count[((key[i] >> shift) & np.uint64(2047)) + 1] += 1
        for b in range(2048):
            count[b + 1] += count[b]
        for i in range(n):
            b = (key[i] >> shift) & np.uint64(2047)
            key2[count[b]], idx2[count[b]] = key[i], idx[i]
            count[b] += 1
        key, key2, idx, idx2 = key2, key, idx2, idx
        shift += np.uint64(11)
    # Equal keys (mostly the first token's identical rows in every text) go by their metadata,
    # column by column: short runs by insertion, long ones by a stable sort per column.
    start = 0
    while start < n:
        end = start + 1
        while end < n and key[end] == key[start]:
            end += 1
        if end - start > 32:
            run = idx[start:end].copy()
            for c in range(meta.shape[1] - 1, -1, -1):
                run = run[np.argsort(meta[run, c], kind="mergesort")]
            idx[start:end] = run
        elif end - start > 1:
            for a in range(start + 1, end):
                x, b = idx[a], a - 1
                while b >= start and _meta_before(meta, x, idx[b]):
                    idx[b + 1] = idx[b]
                    b -= 1
                idx[b + 1] = x
        start = end
    return idx


@njit(cache=True, nogil=True, inline="always")
def _meta_before(meta, a, b):  # pragma: no cover
    for c in range(meta.shape[1]):
        if meta[a, c] != meta[b, c]:
            return meta[a, c] < meta[b, c]
    return False


# The C entry points the probes' hooks call (kernels.Frame): an activation's address and shape,
# and a table of the other arrays' addresses and sizes, one row each in the order below.
SPIKE_FRAME = (
    (np.int32, 1), (np.int64, 1), (np.bool_, 1), (np.int32, 2), (np.int64, 2),  # the probe's
    (np.int32, 1), (np.float32, 1), (np.int32, 2), (np.int32, 1), (np.bool_, 1),  # the arena's
    (np.int64, 1), (np.float32, 2), (np.int32, 2), (np.bool_, 1),  # ... and the kurtosis'
)  # fmt: skip
SINK_FRAME = (
    (np.float32, 3), (np.float32, 1), (np.float64, 2), (np.bool_, 2), (np.float32, 1),
    (np.bool_, 2), (np.float32, 2), (np.float64, 1),  # the batch's; [epsilon, causal]
    (np.float64, 3), (np.float64, 2), (np.float32, 2), (np.float64, 2), (np.float64, 2),
    (np.float64, 2), (np.float64, 2),  # the running sums
)  # fmt: skip


@intrinsic
def _pointer(typingctx, address):  # pragma: no cover
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(types.int64), codegen


@njit(cache=True, inline="always")
def _row1(table, i, dtype):  # pragma: no cover
    return carray(_pointer(table[i, 0]), (table[i, 1],), dtype)


@njit(cache=True, inline="always")
def _row2(table, i, dtype):  # pragma: no cover
    return carray(_pointer(table[i, 0]), (table[i, 1], table[i, 2]), dtype)


@njit(cache=True, inline="always")
def _row3(table, i, dtype):  # pragma: no cover
    return carray(_pointer(table[i, 0]), (table[i, 1], table[i, 2], table[i, 3]), dtype)


MISFIT = -2
"""What an entry point returns, touching nothing, when its arrays are too small for the call."""


@cfunc(
    types.int64(types.voidptr, types.int64, types.int64, types.int64, types.int64, types.voidptr),
    cache=True,
    nogil=True,
)
def spike_call(x, rows, d, slot, kurt_layer, frame):  # pragma: no cover
    """:func:`spike_into` of the float32 ``[rows, d]`` at `x`, with the arrays of SPIKE_FRAME."""
    t = carray(frame, (len(SPIKE_FRAME), 4), np.int64)
    thresholds, cfg, pads = _row1(t, 0, np.int32), _row1(t, 1, np.int64), _row1(t, 2, np.bool_)
    where, hist = _row2(t, 3, np.int32), _row2(t, 4, np.int64)
    keys, values, meta = _row1(t, 5, np.int32), _row1(t, 6, np.float32), _row2(t, 7, np.int32)
    slots, overflow, fill = _row1(t, 8, np.int32), _row1(t, 9, np.bool_), _row1(t, 10, np.int64)
    k, peak, seen = _row2(t, 11, np.float32), _row2(t, 12, np.int32), _row1(t, 13, np.bool_)
    # Nothing past here checks an index: an array that does not fit is refused, not overrun.
    fits = 0 <= slot < min(len(thresholds), hist.shape[0], len(overflow))
    fits &= min(len(pads), where.shape[0]) >= rows and where.shape[1] >= 4
    fits &= len(cfg) >= 3 and len(fill) >= 2 and meta.shape[1] >= 5
    fits &= min(len(values), meta.shape[0], len(slots)) >= len(keys)
    if kurt_layer >= 0:
        fits &= kurt_layer < min(k.shape[0], peak.shape[0], len(seen))
        fits &= min(k.shape[1], peak.shape[1]) >= rows
    if not fits:
        return MISFIT
    return spike_into(
        carray(x, (rows, d), np.float32), slot, thresholds, cfg, pads, where, hist, keys,
        values, meta, slots, overflow, fill, k, peak, seen, kurt_layer,
    )


@cfunc(
    types.int64(
        types.voidptr, types.int64, types.int64, types.int64, types.int64, types.int64,
        types.voidptr,
    ),
    cache=True,
    nogil=True,
)  # fmt: skip
def sink_call(p, b, h, q, k, layer, frame):  # pragma: no cover
    """:func:`sink_sums` of the float32 ``[b, h, q, k]`` pattern at `p`, with SINK_FRAME's arrays.

    Returns 0, or MISFIT.
    """
    t = carray(frame, (len(SINK_FRAME), 4), np.int64)
    scalars = _row1(t, 7, np.float64)
    batch = (
        _row3(t, 0, np.float32), _row1(t, 1, np.float32), _row2(t, 2, np.float64),
        _row2(t, 3, np.bool_), _row1(t, 4, np.float32), _row2(t, 5, np.bool_),
        _row2(t, 6, np.float32), scalars[0], scalars[1] != 0.0,
    )  # fmt: skip
    sums = (
        _row3(t, 8, np.float64), _row2(t, 9, np.float64), _row2(t, 10, np.float32),
        _row2(t, 11, np.float64), _row2(t, 12, np.float64), _row2(t, 13, np.float64),
        _row2(t, 14, np.float64),
    )  # fmt: skip
    # Every [batch, key] and [batch, query] array covers the pattern, every [layer, head] the
    # layer and heads; Eq. 27's keys never reach past the pattern's.
    query_w, key_w, seen_by, eligible, ratio_t, ratio_keys, rel_pos = batch[:7]
    fits = query_w.shape[0] >= b and query_w.shape[1] == 2 and query_w.shape[2] >= q
    fits &= len(key_w) >= k and len(ratio_t) >= b and ratio_keys.shape[0] >= b
    fits &= ratio_keys.shape[1] <= k and rel_pos.shape[0] >= b and rel_pos.shape[1] >= q
    for shape in (seen_by.shape, eligible.shape, sums[2].shape):
        fits &= shape[0] >= b and shape[1] >= k
    fits &= sums[0].shape[0] > layer >= 0 and sums[0].shape[1] >= h and sums[0].shape[2] >= k
    for shape in (sums[1].shape, sums[3].shape, sums[4].shape, sums[5].shape, sums[6].shape):
        fits &= shape[0] > layer and shape[1] >= h
    if not fits:
        return MISFIT
    sink_sums(carray(p, (b, h, q, k), np.float32), layer, batch, sums)
    return 0
