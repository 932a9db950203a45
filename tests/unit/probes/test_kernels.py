"""The compiled CPU kernels give the torch reductions' numbers: the spike probe's bit for bit,
the kurtosis and sink sums to float32 rounding."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from planted import sentences

import tl_spikesink as ts
from tl_spikesink.probes import kernels
from tl_spikesink.probes.kurtosis import token_kurtosis
from tl_spikesink.probes.reducers import BIN_SHIFT, N_BINS, abs_bits

pytestmark = pytest.mark.skipif(
    not kernels.available(torch.zeros(1)), reason="numba is not installed"
)

TEXTS = sentences(10, seed=11, min_words=3, max_words=30)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"batch_size": 1},
        # few entries above the cut (top_k decides) and overflowing layers (capacity decides)
        {"batch_size": 3, "top_k": 4, "max_candidates": 8},
        {"batch_size": 4, "padding_side": "left", "top_k": 50, "max_candidates": 60},
    ],
)
def test_fused_scan_equals_torch_scan(planted, settings):
    fused = ts.scan(planted, TEXTS, progress=False, **settings)
    with kernels.switched_off():
        plain = ts.scan(planted, TEXTS, progress=False, **settings)
    assert kernels.available(torch.zeros(1))
    assert torch.equal(fused.spikes.histograms, plain.spikes.histograms)
    assert fused.spikes.histograms.sum() > 0
    for site in plain.spikes.sites:
        for a, b in zip(fused.spikes.entries[site], plain.spikes.entries[site], strict=True):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            assert torch.equal(a.meta, b.meta) and a.truncated == b.truncated
    assert fused.spikes.tokens == plain.spikes.tokens and fused.spikes.tokens
    assert fused.kurtosis.n_tokens == plain.kurtosis.n_tokens
    assert torch.allclose(fused.kurtosis.total, plain.kurtosis.total, rtol=1e-5)
    assert torch.equal(fused.kurtosis.refs, plain.kurtosis.refs)
    assert torch.allclose(fused.kurtosis.values, plain.kurtosis.values, rtol=1e-5, atol=1e-6)
    # The sink sums: float32 in another order than torch's products.
    for name in ("alpha_sum", "mass_sum", "distance_sum", "distance_nosink_sum"):
        a, b = getattr(fused.sinks, name), getattr(plain.sinks, name)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), name
    assert torch.equal(fused.sinks.alpha_count, plain.sinks.alpha_count)
    assert torch.equal(fused.sinks.distance_nosink_count, plain.sinks.distance_nosink_count)
    assert torch.equal(fused.sinks.sink_head_count, plain.sinks.sink_head_count)
    assert fused.sinks.sink_head_count.sum() > 0
    assert torch.equal(fused.sinks.candidates.meta, plain.sinks.candidates.meta)


def _reference(x, pads, threshold, top_k, capacity):
    """The rule spelled out over every real entry: above the threshold, unless fewer than top_k
    or more than capacity are; then down to the top_k-th / capacity-th largest, ties included."""
    real = x.abs()[~pads]
    rows = torch.arange(len(x))[~pads]
    keys = real.flatten()
    n_above = int((keys > threshold).sum())
    if top_k <= n_above <= capacity:
        keep = real > threshold
    else:
        m = top_k if n_above < top_k else capacity
        positive = keys[keys > 0]
        floor = positive.sort(descending=True).values[m - 1] if len(positive) > m else 0.0
        keep = (real >= floor) & (real > 0)
    r, c = keep.nonzero(as_tuple=True)
    return rows[r], c, n_above


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 12),
    d=st.integers(1, 9),
    seed=st.integers(0, 2**16),
    n_spikes=st.integers(0, 30),
    threshold=st.sampled_from([0.5, 2.0, 100.0]),
    top_k=st.integers(1, 6),
    capacity=st.integers(6, 12),
    ties=st.booleans(),
)
def test_kernel_follows_the_rule(n, d, seed, n_spikes, threshold, top_k, capacity, ties):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if ties:  # few distinct values, exact zeros among them
        x = x.round()
    spots = torch.randint(0, n * d, (n_spikes,), generator=g)
    x.view(-1)[spots] = 500.0 * torch.sign(torch.randn(n_spikes, generator=g))
    pads = torch.rand(n, generator=g) < 0.3
    hist = np.zeros(N_BINS, np.int64)
    where = torch.stack(
        [torch.arange(n), -torch.arange(n), 2 * torch.arange(n), 7 + torch.arange(n)]
    )
    keys, values, meta, n_above = kernels.spike_entries(
        x,
        pads.numpy(),
        where.T.int().contiguous().numpy(),
        hist,
        threshold,
        top_k,
        capacity,
        BIN_SHIFT,
    )
    rows, channels = meta[:, 0].long(), meta[:, 3].long()
    assert torch.equal(meta[:, [1, 2, 4]], where.T[rows][:, 1:].int())
    expected = torch.bincount((abs_bits(x[~pads]) >> BIN_SHIFT).flatten(), minlength=N_BINS)
    assert torch.equal(torch.from_numpy(hist), expected)
    want_rows, want_channels, want_above = _reference(x, pads, threshold, top_k, capacity)
    assert n_above == want_above
    assert torch.equal(rows, want_rows) and torch.equal(channels, want_channels)
    assert torch.equal(values, x[rows, channels]) and torch.equal(keys, values.abs())


def test_kurtosis_kernel_equals_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 576, generator=g) * 3 + 0.5
    x[::7, 11] = 800.0  # spike tokens: the large fourth moment is where float32 rounding shows
    x[3] = 2.0  # a constant row: std 0 counts 0
    x[5, :] = 0.0
    k, peak = kernels.token_kurtosis(x)
    assert torch.allclose(k, token_kurtosis(x), rtol=1e-5, atol=1e-6)
    assert k[3] == 0 and k[5] == 0 and k[0] > 100
    assert torch.equal(peak, x.abs().amax(-1))


def test_kurtosis_kernel_variance_does_not_cancel():
    # One pass of sums (shifted by each row's first entry) must keep the variance where
    # E[x^2] - E[x]^2 would cancel: a large common offset with a tiny spread, and a row whose
    # first entry is its spike.
    g = torch.Generator().manual_seed(1)
    x = 30000.0 + torch.randn(6, 576, generator=g) * 0.01
    x[1, 0] = 5000.0
    x[2] = torch.randn(576, generator=g)
    x[2, 0] = -3000.0
    k, _ = kernels.token_kurtosis(x)
    want = token_kurtosis(x.double()).float()
    assert torch.allclose(k, want, rtol=1e-4)
    assert k[1] > 100 and k[2] > 100


def test_kernels_can_be_switched_off():
    # The variable is read once per process: ask a fresh one.
    code = "import torch; from tl_spikesink.probes import kernels; "
    code += "print(kernels.available(torch.zeros(1)), kernels.warm_up())"
    env = {**os.environ, "TL_SPIKESINK_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False False", out.stderr
    assert kernels.warm_up()


def test_kernels_refuse_arrays_that_do_not_fit():
    # The hooks call the kernels through C with raw addresses: arrays of the wrong type, or too
    # small for the activation, must be refused before anything is written, never overrun.
    from tl_spikesink.errors import SpikeSinkError

    rows, d = 5, 4
    hist = np.zeros((1, N_BINS), np.int64)
    settings = np.array([2, 8, BIN_SHIFT], np.int64)
    thresholds = np.array([kernels.float_bits(1.0)], np.int32)
    probe = (thresholds, settings, np.zeros(3, bool), np.zeros((3, 4), np.int32), hist)
    with pytest.raises(SpikeSinkError, match=r"spike kernel's arrays do not fit .*\(1, 5, 4\)"):
        kernels.SpikeKernel(probe, kernels.Arena(1))(torch.ones(1, rows, d), 0)
    assert not hist.any()
    fits = (thresholds, settings, np.zeros(rows, bool), np.zeros((rows, 4), np.int32), hist)
    with pytest.raises(SpikeSinkError, match="do not fit"):  # no such histogram row
        kernels.SpikeKernel(fits, kernels.Arena(1))(torch.ones(rows, d), 1)
    kurtosis = (np.zeros((2, rows), np.float32), np.zeros((2, rows), np.int32), np.zeros(2, bool))
    with pytest.raises(SpikeSinkError, match="do not fit"):  # no such kurtosis layer
        kernels.SpikeKernel(fits, kernels.Arena(1), kurtosis)(torch.ones(rows, d), 0, 2)
    assert not hist.any() and not kurtosis[2].any()
    kernels.SpikeKernel(fits, kernels.Arena(1), kurtosis)(torch.ones(rows, d), 0, 1)
    assert hist.sum() == rows * d and kurtosis[2].tolist() == [False, True]
    with pytest.raises(TypeError, match="kernel array 0: .* int32 array with 1 dimensions"):
        kernels.SpikeKernel((thresholds.astype(np.int64), *fits[1:]), kernels.Arena(1))

    b, h, t, layers = 1, 2, 3, 2
    batch = (
        np.ones((b, 2, t), np.float32), np.arange(t, dtype=np.float32), np.ones((b, t)),
        np.ones((b, t), bool), np.full(b, t, np.float32), np.ones((b, 1), bool),
        np.ones((b, t), np.float32),
    )  # fmt: skip
    sums = (
        np.zeros((layers, h, t)), np.zeros((layers, h)), np.zeros((b, t), np.float32),
        *(np.zeros((layers, h)) for _ in range(4)),
    )  # fmt: skip
    kernel = kernels.SinkKernel(batch, 0.3, True, sums)
    pattern = torch.tril(torch.ones(b, h, t, t)) / torch.arange(1, t + 1)[:, None]
    with pytest.raises(SpikeSinkError, match=r"sink kernel's arrays do not fit .*\(2,\)"):
        kernel(pattern, layers)
    with pytest.raises(SpikeSinkError, match="do not fit"):  # a longer pattern than the batch's
        kernel(torch.ones(b, h, t + 1, t + 1), 0)
    assert not any(s.any() for s in sums)
    kernel(pattern, 1)
    assert sums[0][1].sum() > 0 and not sums[0][0].any()
