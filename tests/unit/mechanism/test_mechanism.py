"""Mechanism analyses on the planted model, where every answer is known by construction."""

import dataclasses
import math

import pytest
import torch
from checks import assert_untouched, state_snapshot
from planted import SINK_HEAD, SPIKE_CHANNEL, VOCAB, planted_model, tokenizer
from transformer_lens import HookedTransformer, HookedTransformerConfig

import tl_spikesink as ts
from tl_spikesink import mechanism as mech
from tl_spikesink.errors import SpikeSinkError


@pytest.fixture(scope="module")
def scan(planted, texts):
    return ts.scan(planted, texts, progress=False)


def n_spike_tokens(planted, texts):
    """BOS and every "." are spike tokens (the planted trigger)."""
    corpus = ts.tokenize(planted, texts)
    dot, bos = VOCAB.index("."), VOCAB.index("<bos>")
    return sum(t in (dot, bos) for c in corpus.chunks for t in c.tokens)


def test_spike_site_reads_the_scan(scan):
    site = mech.spike_site(scan)
    assert site.layer == 1
    assert site.channels == (SPIKE_CHANNEL,)
    assert site.step_down == 2
    assert 100 <= site.cut < 3000


def test_silu_regime_spike_tokens_are_linear(planted, texts, scan):
    r = mech.silu_regime(planted, texts, scan)
    assert r.layer == 1
    assert int(r.is_spike.sum()) == n_spike_tokens(planted, texts)
    # Only gate neuron 0 fires on spike tokens, with z = x̂_2 > 0, so act(z) ∥ z exactly.
    assert r.spike_cosine == pytest.approx(1.0, abs=1e-5)
    x2 = 1 / (3 / 16) ** 0.5
    assert r.spike_norm_ratio == pytest.approx(float(torch.sigmoid(torch.tensor(x2))), rel=1e-4)
    assert r.other_cosine == 0.0  # ordinary tokens have a zero gate vector
    # σ(x̂_2) ≈ 0.91 ≥ 0.9: the one neuron writing channel 7 is (just) in the linear regime.
    assert r.channel == SPIKE_CHANNEL
    assert r.spike_linear_share == pytest.approx(1.0)
    assert r.other_linear_share == 0.0
    assert r.cosine.shape == r.is_spike.shape


def test_quadratic_matrix_is_rank_one_on_the_trigger(planted):
    s = mech.quadratic_matrix(planted, 1, SPIKE_CHANNEL)
    w = float(planted.blocks[1].mlp.W_out[0, SPIKE_CHANNEL].detach())
    expected = torch.zeros(16, 16)
    expected[2, 2] = w
    torch.testing.assert_close(s, expected)


def test_quadratic_form_on_planted(planted, texts, scan):
    q = mech.quadratic_form(planted, texts, scan)
    assert q.channels == (SPIKE_CHANNEL,)
    w = float(planted.blocks[1].mlp.W_out[0, SPIKE_CHANNEL].detach())
    assert float(q.lambda_star[0]) == pytest.approx(w, rel=1e-5)
    assert float(q.lambda_share[0]) == pytest.approx(1.0)
    assert float(q.trigger[0].abs().argmax()) == 2
    assert float(q.trigger[0, 2].abs()) == pytest.approx(1.0)
    # BOS and "." normalize to (1, 1, 1) on channels (1, 2, marker) times √(16/3): cos = 1/√3.
    assert q.spike_alignment == pytest.approx(1 / math.sqrt(3), rel=1e-4)
    assert q.other_alignment == 0.0
    # SiLU(z) = z·σ(z): the quadratic form overshoots by 1/σ(x̂_2) − 1 ≈ 0.099, reported as is.
    x2 = 1 / (3 / 16) ** 0.5
    assert q.spike_relative_error == pytest.approx(
        1 / float(torch.sigmoid(torch.tensor(x2))) - 1, rel=1e-3
    )
    assert q.frobenius_ratio == math.inf  # every other output channel of that MLP is zero
    assert q.alignment.shape == q.predicted.shape == q.actual.shape == (1, q.is_spike.numel())


def test_quadratic_matrix_folds_the_norm_weight(planted):
    """Without fold_ln, S_k includes γ on both sides; with it γ is already in W_gate / W_in."""
    model = planted_model()
    with torch.no_grad():
        model.blocks[1].ln2.w[2] = 2.0
    s = mech.quadratic_matrix(model, 1, SPIKE_CHANNEL)
    w = float(model.blocks[1].mlp.W_out[0, SPIKE_CHANNEL].detach())
    assert float(s[2, 2]) == pytest.approx(4 * w, rel=1e-5)


def test_representations_on_planted(planted, texts, scan):
    r = mech.representations(planted, texts, scan)
    assert r.bound_holds
    # The spike saturates the bound: x̂_7 ≈ √d on spike tokens.
    assert r.spike_bound_ratio == pytest.approx(1.0, abs=1e-4)
    assert r.spike_energy == pytest.approx(1.0, abs=1e-4)
    assert r.other_energy == 0.0
    assert r.normalized_cosine == pytest.approx(1.0, abs=1e-5)
    assert r.other_normalized_cosine < 0.9
    # BOS and "." differ before the spike (marker channels 0 vs 3) and are alike after it.
    assert r.resid_pre_cosine < 0.9
    assert float(r.resid_cosine[1]) == pytest.approx(1.0, abs=1e-5)
    assert r.resid_cosine.shape == (3,)


def test_sink_geometry_on_planted(planted, texts, scan):
    g = mech.sink_geometry(planted, texts, scan)
    assert g.sink_heads == (SINK_HEAD,)
    # Query channel 1 (=1 on every token, normalized ≈ √(16/3) or less) times the BOS key.
    assert float(g.logit_gap[SINK_HEAD]) > 100
    assert g.other_gap == 0.0  # every other head has zero weights
    assert float(g.key_share_spike[SINK_HEAD]) == pytest.approx(1.0)
    assert g.logit_gap.shape == g.key_share_spike.shape == (3, 2)


def test_short_range_reads_the_scan(scan):
    r = mech.short_range(scan)
    assert r.sink_heads == (SINK_HEAD,)
    # The planted sink head sends ~all attention to BOS, so it has no distance without it.
    assert math.isnan(r.sink_distance_without_sink)
    assert r.other_distance_without_sink > 0


def test_model_is_borrowed(planted, texts, scan):
    before = state_snapshot(planted)
    mech.silu_regime(planted, texts, scan)
    mech.quadratic_form(planted, texts, scan)
    mech.representations(planted, texts, scan)
    mech.sink_geometry(planted, texts, scan)
    assert_untouched(planted, before)


def test_runs_its_own_scan_when_none_given(planted, texts):
    r = mech.silu_regime(planted, texts[:6])
    assert r.spike_cosine == pytest.approx(1.0, abs=1e-5)


def test_results_are_frozen(planted, texts, scan):
    r = mech.silu_regime(planted, texts, scan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.layer = 0


def _plain_model(**overrides):
    cfg = dict(
        n_layers=2, d_model=16, n_heads=2, d_head=4, d_mlp=8, d_vocab=len(VOCAB), n_ctx=64,
        act_fn="gelu", normalization_type="LN", model_name="plain",
    )  # fmt: skip
    return HookedTransformer(HookedTransformerConfig(**{**cfg, **overrides}), tokenizer())


def test_missing_components_raise_clear_errors(planted, texts, scan):
    plain = _plain_model()
    with pytest.raises(SpikeSinkError, match="gated"):
        mech.quadratic_form(plain, texts, scan)
    with pytest.raises(SpikeSinkError, match="RMSNorm"):
        mech.representations(plain, texts, scan)
    with pytest.raises(SpikeSinkError, match="no massive activation"):
        mech.silu_regime(plain, texts[:4])


def test_all_frobenius_equals_the_norm_of_each_matrix():
    """The closed form ½ wᵀ(GᵀG ∘ UᵀU + M ∘ Mᵀ)w against ‖S_k‖_F built one channel at a time."""
    model = _plain_model(act_fn="silu", gated_mlp=True, normalization_type="RMS", d_mlp=20)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    expected = torch.stack([mech.quadratic_matrix(model, 1, k).double().norm() for k in range(16)])
    torch.testing.assert_close(mech.all_frobenius(model, 1).double(), expected, rtol=1e-5, atol=0)


def test_quadratic_form_holds_every_channel_and_the_spectrum(planted, texts, scan):
    q = mech.quadratic_form(planted, texts, scan)
    w = float(planted.blocks[1].mlp.W_out[0, SPIKE_CHANNEL].detach())
    # Only channel 7 has a form; it is rank one, λ* = w and every other eigenvalue 0.
    expected = torch.zeros(16)
    expected[SPIKE_CHANNEL] = abs(w)
    torch.testing.assert_close(q.all_frobenius, expected, rtol=1e-5, atol=1e-6)
    assert q.eigenvalues.shape == (1, 16)
    torch.testing.assert_close(q.eigenvalues[0].abs().sort().values[:-1], torch.zeros(15))
    assert float(q.eigenvalues[0].abs().max()) == pytest.approx(abs(w), rel=1e-5)
