"""Mergeable everywhere: scan(A).merge(scan(B)) is the scan of A + B."""

import numpy as np
import pytest
import torch
from checks import assert_same_scan
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from planted import sentences

import tl_spikesink as ts
from tl_spikesink.probes.reducers import TopEntries, select_groups, total_order

TEXTS = sentences(12, seed=5, min_words=3, max_words=40)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(cut=st.integers(1, len(TEXTS) - 1), batch=st.integers(1, 5))
def test_merge_of_two_corpora_equals_scan_of_both(planted, cut, batch):
    whole = ts.scan(planted, TEXTS, batch_size=4, progress=False)
    a = ts.scan(planted, TEXTS[:cut], batch_size=batch, progress=False)
    b = ts.scan(planted, TEXTS[cut:], batch_size=batch, progress=False)
    merged = a.merge(b)
    assert merged.n_texts == len(TEXTS)
    assert_same_scan(merged, whole)


def test_merge_of_shards_keeps_text_indices(planted):
    corpus = ts.tokenize(planted, TEXTS)
    whole = ts.scan(planted, corpus, progress=False)
    parts = [ts.scan(planted, corpus.shard(r, 3), progress=False) for r in range(3)]
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert_same_scan(merged, whole)


def test_merge_refuses_different_settings(planted):
    a = ts.scan(planted, TEXTS[:3], progress=False)
    b = ts.scan(planted, TEXTS[3:6], epsilon=0.5, progress=False)
    try:
        a.merge(b)
    except ts.SpikeSinkError as e:
        assert "config" in str(e)
    else:
        raise AssertionError("merging scans with different settings must fail")


@given(
    keys=st.lists(st.floats(0, 1000, allow_nan=False), min_size=1, max_size=60),
    cut=st.integers(0, 60),
    k=st.integers(1, 5),
    capacity=st.integers(5, 20),
)
def test_top_entries_merge_is_exact(keys, cut, k, capacity):
    cut = min(cut, len(keys))
    key = torch.tensor(keys)
    meta = torch.arange(len(keys))[:, None]

    def reduce(sl):
        return TopEntries.select(key[sl], key[sl], meta[sl], k, 500.0, capacity)

    whole = reduce(slice(None))
    merged = reduce(slice(None, cut)).merge(reduce(slice(cut, None)))
    assert torch.equal(whole.keys, merged.keys) and torch.equal(whole.meta, merged.meta)
    assert whole.truncated == merged.truncated


@given(
    keys=st.lists(st.sampled_from([0.0, -0.0, 1.0, 2.5, 7.0, float("nan")]), max_size=40),
    meta=st.data(),
)
def test_total_order_is_one_lexsort_of_every_column(keys, meta):
    key = np.array(keys, np.float32)
    cols = meta.draw(
        st.lists(
            st.lists(st.integers(-2, 2), min_size=3, max_size=3),
            min_size=len(keys),
            max_size=len(keys),
        )
    )
    m = np.array(cols, np.int32).reshape(len(keys), 3)
    got, want = total_order(key, m), np.lexsort((*m.T[::-1], -key))
    # Rows equal in key and every column may come in either order; nothing else may differ.
    assert np.array_equal(key[got], key[want], equal_nan=True)
    assert np.array_equal(m[got], m[want])


@settings(max_examples=80, deadline=None)
@given(
    keys=st.lists(st.sampled_from([-1.0, 0.0, 1.0, 2.5, 7.0, 300.0]), max_size=80),
    data=st.data(),
    n_groups=st.integers(1, 5),
    k=st.integers(1, 4),
    capacity=st.integers(4, 9),
)
def test_select_groups_is_select_of_each_group(keys, data, n_groups, k, capacity):
    n = len(keys)
    groups = np.array(data.draw(st.lists(st.integers(0, n_groups - 1), min_size=n, max_size=n)))
    key = torch.tensor(keys)
    # Unique metadata per group, in shuffled order, as the probes' (text, position, channel).
    meta = torch.from_numpy(np.random.default_rng(n).permutation(n)[:, None].repeat(2, 1))
    like = [TopEntries.empty(2, k, [2.0, 5.0, 100.0][g % 3], capacity) for g in range(n_groups)]
    got = select_groups(key, -key, meta, groups.astype(np.int32), like)
    for g, e in enumerate(like):
        mine = torch.from_numpy(groups == g)
        want = TopEntries.select(key[mine], -key[mine], meta[mine], k, e.threshold, capacity)
        assert torch.equal(got[g].keys, want.keys) and torch.equal(got[g].values, want.values)
        assert torch.equal(got[g].meta, want.meta) and got[g].truncated == want.truncated


@pytest.mark.parametrize("seed", range(4))
def test_group_order_is_total_order_of_group_and_key(seed):
    # The compiled radix sort against the numpy path: groups ascending, keys descending, ties
    # (long runs too, which it sorts another way than short ones) by every metadata column.
    kernels = pytest.importorskip("tl_spikesink.probes.kernels")
    rng = np.random.default_rng(seed)
    n = 3000
    groups = rng.integers(0, 90, n).astype(np.int32)
    groups[:200] = 7  # one long run of equal keys in one group
    bits = (np.float32(2.0) ** rng.integers(-3, 4, n)).astype(np.float32).view(np.int32)
    meta = rng.integers(0, 3, (n, 5)).astype(np.int32)
    got = kernels.group_order(groups, bits, meta)
    if got is None:
        pytest.skip("numba is not installed")
    want = total_order(groups.astype(np.int64) << 32 | (0x7FFFFFFF - bits), meta, ascending=True)
    # Rows equal in group, key and every column may come in either order; nothing else may.
    assert np.array_equal(groups[got], groups[want]) and np.array_equal(bits[got], bits[want])
    assert np.array_equal(meta[got], meta[want])
    assert sorted(got) == list(range(n))


def test_merge_refuses_to_count_a_corpus_twice(planted):
    a = ts.scan(planted, TEXTS[:3], progress=False)
    with pytest.raises(ts.SpikeSinkError, match="twice"):
        a.merge(a)
    again = ts.scan(planted, TEXTS[:3], progress=False)  # the same corpus, scanned anew
    with pytest.raises(ts.SpikeSinkError, match="twice"):
        a.merge(again)
    corpus = ts.tokenize(planted, TEXTS)
    shard = ts.scan(planted, corpus.shard(0, 2), progress=False)
    with pytest.raises(ts.SpikeSinkError, match="twice"):
        shard.merge(shard)


@pytest.mark.parametrize("stage_bytes", [1, 4096])
def test_scan_does_not_depend_on_how_much_is_staged(planted, monkeypatch, stage_bytes):
    # The default stage holds every layer of these batches; 1 byte reduces one site at a time,
    # 4096 a few; under-filled layers (fewer than top_k entries above the cut) and overflowing
    # ones (max_candidates 8) take their own paths in each grouping.
    import tl_spikesink.probes.reducers as reducers

    settings = {"batch_size": 3, "progress": False, "top_k": 4, "max_candidates": 8}
    whole = ts.scan(planted, TEXTS, **settings)
    monkeypatch.setattr(reducers, "STAGE_BYTES", stage_bytes)
    assert_same_scan(ts.scan(planted, TEXTS, **settings), whole)
    got = ts.scan(planted, TEXTS, **settings)
    assert got.kurtosis.n_tokens == whole.kurtosis.n_tokens
    assert torch.allclose(got.kurtosis.total, whole.kurtosis.total)
    assert torch.equal(got.kurtosis.refs, whole.kurtosis.refs)
    assert torch.allclose(got.kurtosis.values, whole.kurtosis.values)


def test_scan_does_not_depend_on_when_slots_are_selected(planted):
    # With room for 8 entries, slots are selected while the scan runs, at other points for
    # each batch size; what they keep must not change.
    settings = {"top_k": 4, "max_candidates": 8, "abs_threshold": 0.5, "progress": False}
    one = ts.scan(planted, TEXTS, batch_size=1, **settings)
    whole = ts.scan(planted, TEXTS, batch_size=len(TEXTS), **settings)
    assert_same_scan(one, whole)
    for site in one.spikes.sites:
        for a, b in zip(one.spikes.entries[site], whole.spikes.entries[site], strict=True):
            assert torch.equal(a.keys, b.keys) and a.truncated == b.truncated
    assert sum(e.truncated for es in one.spikes.entries.values() for e in es) > 3
