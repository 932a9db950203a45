"""Excess kurtosis per layer (OSP's formula) on a planted model whose ordinary tokens are Gaussian."""

import contextlib
import dataclasses
import json

import numpy as np
import pytest
import torch
from planted import VOCAB, sentences, tokenizer
from transformer_lens import HookedTransformer, HookedTransformerConfig

import tl_spikesink as ts
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.probes.engine import run
from tl_spikesink.probes.kurtosis import KurtosisProbe, excess_kurtosis, token_kurtosis
from tl_spikesink.tokens import TokenRef

D_MODEL, SPIKE_CHANNEL, SPIKE = 256, 7, 2000.0
TEXTS = sentences(10, seed=3, min_words=4, max_words=30)


@pytest.fixture(scope="module")
def gaussian():
    """3 layers; every residual is N(0, 1) on channels 1.. (word + position embeddings).

    BOS alone carries marker channel 0, which layer 1's MLP turns into a SPIKE in channel 7;
    nothing cancels it, so BOS spikes at layers 1 and 2 and nowhere else is there a spike.
    """
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=D_MODEL, n_heads=2, d_head=4, d_mlp=8, d_vocab=len(VOCAB), n_ctx=64,
        act_fn="silu", gated_mlp=True, normalization_type="RMS", default_prepend_bos=True,
        model_name="planted-gaussian", seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg, tokenizer())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith(".w") else p.zero_()
        scale = 0.5**0.5
        model.embed.W_E[:, 1:] = scale * torch.randn(len(VOCAB), D_MODEL - 1, generator=gen)
        model.pos_embed.W_pos[:, 1:] = scale * torch.randn(64, D_MODEL - 1, generator=gen)
        bos = VOCAB.index("<bos>")
        model.embed.W_E[bos, 0] = 1.0
        resid = model.embed.W_E[bos] + model.pos_embed.W_pos[0]
        a = float(1.0 / (resid.square().mean() + cfg.eps).sqrt())  # normalized marker at BOS
        mlp = model.blocks[1].mlp
        mlp.W_gate[0, 0] = mlp.W_in[0, 0] = 1.0
        mlp.W_out[0, SPIKE_CHANNEL] = SPIKE / (float(torch.nn.functional.silu(torch.tensor(a))) * a)
    return model


@pytest.fixture(scope="module")
def scanned(gaussian):
    return ts.scan(gaussian, TEXTS, batch_size=3, progress=False)


def brute_force(model, corpus):
    """OSP's formula in float64 numpy, one unpadded sequence at a time."""
    per_layer = [[] for _ in range(model.cfg.n_layers)]
    for chunk in corpus.chunks:
        _, cache = model.run_with_cache(torch.tensor([chunk.tokens]))
        for layer in range(model.cfg.n_layers):
            x = cache["resid_post", layer][0].double().numpy()
            k = np.mean(x**4, -1) / x.std(-1, ddof=1) ** 4 - 3
            per_layer[layer].append(np.maximum(k, 0))
    return [np.concatenate(v) for v in per_layer]


def test_one_hot_vector_has_kurtosis_d_minus_3():
    # A one-hot vector in d dims: mean(x^4) = 1/d and var (n - 1) = 1/d, so k = d - 3.
    x = torch.zeros(2, 5, 64)
    x[..., 3] = 7.0
    torch.testing.assert_close(token_kurtosis(x), torch.full((2, 5), 61.0))
    assert float(token_kurtosis(torch.ones(8))) == 0.0  # std 0 counts 0, not inf


def test_matches_brute_force_numpy_and_the_spike_drives_it(gaussian, scanned):
    corpus = ts.tokenize(gaussian, TEXTS)
    truth = brute_force(gaussian, corpus)
    k = excess_kurtosis(scanned)
    expected = torch.tensor([v.mean() for v in truth], dtype=torch.float32)
    torch.testing.assert_close(k.per_layer, expected, rtol=1e-5, atol=1e-6)
    assert k.n_tokens == corpus.n_tokens == len(truth[0])
    # BOS (position 0) is the only spike token, one per text.
    assert {t.token.position for t in scanned.spikes.tokens} == {0}
    assert k.n_spike_tokens == len(TEXTS)
    bos = np.cumsum([0] + [len(c.tokens) for c in corpus.chunks])[:-1]
    without = [np.delete(v, bos).mean() for v in truth]
    torch.testing.assert_close(
        k.per_layer_without_spikes, torch.tensor(without, dtype=torch.float32), rtol=1e-5, atol=1e-6
    )
    # One 2000 among 255 N(0, 1) values: BOS's own k is about d - 3; diluted over the corpus
    # it is still far above a Gaussian's, and leaving BOS out gives the Gaussian's ~0.
    assert float(truth[1][bos].min()) > 0.9 * (D_MODEL - 3)
    assert float(k.per_layer[1]) > 10 and float(k.per_layer[2]) > 10
    assert float(k.per_layer[0]) < 0.3
    assert float(k.per_layer_without_spikes.max()) < 0.3
    assert k.peak_layer in (1, 2)


def test_merge_of_two_halves_equals_the_whole(gaussian, scanned):
    a = ts.scan(gaussian, TEXTS[:4], batch_size=2, progress=False)
    b = ts.scan(gaussian, TEXTS[4:], batch_size=2, progress=False)
    merged = a.merge(b)
    whole = excess_kurtosis(scanned)
    both = excess_kurtosis(merged)
    torch.testing.assert_close(both.per_layer, whole.per_layer)
    torch.testing.assert_close(both.per_layer_without_spikes, whole.per_layer_without_spikes)
    assert merged.kurtosis.n_tokens == scanned.kurtosis.n_tokens
    assert torch.equal(merged.kurtosis.refs, scanned.kurtosis.refs)  # text indices moved on
    torch.testing.assert_close(merged.kurtosis.total, scanned.kurtosis.total, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kernels_on", [True, False])
def test_read_in_the_spike_probes_hooks_or_in_its_own(gaussian, scanned, kernels_on):
    # A scan's spike probe reads the kurtosis in its resid_post hooks; a kurtosis probe on its
    # own hooks in by itself. Both give the same numbers.
    from tl_spikesink.probes import kernels
    from tl_spikesink.probes.scan import ScanProbes

    hosted = ScanProbes(gaussian, ts.ScanConfig())
    assert hosted.kurtosis.hosted and hosted.kurtosis.hooks() == []
    off = contextlib.nullcontext() if kernels_on else kernels.switched_off()
    corpus = ts.tokenize(gaussian, TEXTS)
    alone = KurtosisProbe(3, 100.0, 4096)
    with off:
        run(gaussian, corpus, [alone], batch_size=3, progress=False)
        both = ts.scan(gaussian, corpus, batch_size=3, progress=False).kurtosis
    own = alone.result()
    assert len(alone.hooks()) == 3
    for r in (own, both):
        torch.testing.assert_close(r.total, scanned.kurtosis.total, rtol=1e-6, atol=0)
        assert torch.equal(r.refs, scanned.kurtosis.refs)
        torch.testing.assert_close(r.values, scanned.kurtosis.values, rtol=1e-5, atol=0)


def test_a_hosted_kurtosis_probe_must_run_in_the_pass(gaussian):
    # The spike probe writes the kurtosis into its host's arrays of this batch; without them it
    # says so rather than writing into arrays of no batch.
    from tl_spikesink.probes import kernels
    from tl_spikesink.probes.scan import ScanProbes

    if not kernels.available(torch.zeros(1)):
        pytest.skip("numba is not installed")
    probes = ScanProbes(gaussian, ts.ScanConfig())
    corpus = ts.tokenize(gaussian, TEXTS)
    with pytest.raises(SpikeSinkError, match="kurtosis probe.s layers, but that probe has not started this batch"):
        run(gaussian, corpus, [probes.spikes], batch_size=3, progress=False)


def test_merge_refuses_different_settings(gaussian):
    a = KurtosisProbe(3, 100.0, 16).result()
    with pytest.raises(SpikeSinkError, match="abs_threshold"):
        a.merge(KurtosisProbe(3, 50.0, 16).result())


@pytest.mark.parametrize("side", ["left", "right"])
def test_pads_are_ignored(gaussian, scanned, side):
    padded = ts.scan(gaussian, TEXTS, batch_size=4, padding_side=side, progress=False)
    single = ts.scan(gaussian, TEXTS, batch_size=1, progress=False)  # no pads at all
    for r in (padded, scanned):
        torch.testing.assert_close(r.kurtosis.total, single.kurtosis.total, rtol=1e-9, atol=0)
        assert r.kurtosis.n_tokens == single.kurtosis.n_tokens
        assert torch.equal(r.kurtosis.refs, single.kurtosis.refs)


def test_capacity_keeps_the_largest_peaks_and_says_so(gaussian):
    corpus = ts.tokenize(gaussian, TEXTS)
    probe = KurtosisProbe(3, 1.0, capacity=5)  # every token is a candidate at this threshold
    run(gaussian, corpus, [probe], batch_size=3, progress=False)
    stats = probe.result()
    assert stats.truncated and len(stats.peak) == 5
    assert stats.peak[0] > 1000  # a spiking BOS beats every ordinary token
    assert bool(stats.without([TokenRef(99, 0, 1)]).isnan().all())  # dropped: unknown, not wrong


def test_a_token_that_cannot_be_a_spike_token_is_refused(scanned):
    with pytest.raises(SpikeSinkError, match="never exceeded"):
        scanned.kurtosis.without([TokenRef(0, 0, 1)])


def test_results_keep_the_contract(scanned):
    k = excess_kurtosis(scanned)
    for r in (k, scanned.kurtosis):
        with pytest.raises(dataclasses.FrozenInstanceError):
            r.n_tokens = 0
        assert repr(r).startswith(type(r).__name__) and len(repr(r)) <= 2048
        text = r.to_json()
        assert "NaN" not in text
        json.loads(text)
        assert str(r)
    d = json.loads(k.to_json())
    assert len(d["per_layer"]) == 3 and d["n_spike_tokens"] == len(TEXTS)
    assert "relu(mean(x^4)" in d["definition"]
    assert "without spike tokens" in str(k)


def test_the_scan_reports_it(scanned):
    d = json.loads(scanned.to_json())
    assert len(d["kurtosis"]["per_layer"]) == 3
    assert d["kurtosis"]["per_layer_without_spikes"][1] < 0.3
    assert "kurtosis" in str(scanned)


def test_plot_has_both_curves(scanned):
    from tl_spikesink.views.kurtosis import plot_kurtosis

    fig = plot_kurtosis(scanned)
    names = [t.name for t in fig.data]
    assert names == ["all tokens", "without spike tokens"]
    k = excess_kurtosis(scanned)
    assert list(fig.data[1].y) == pytest.approx(k.per_layer_without_spikes.tolist())
    assert fig.layout.xaxis.title.text == "layer"


def test_a_scan_without_kurtosis_says_how_to_get_it(scanned):
    old = dataclasses.replace(scanned, kurtosis=None)
    with pytest.raises(SpikeSinkError, match="rerun"):
        excess_kurtosis(old)
