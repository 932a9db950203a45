"""Massive-activation detectors on planted models whose answer is known, and the sink-logit check."""

import dataclasses
import json
import types
import warnings

import numpy as np
import pytest
import torch
from planted import SPIKE_CHANNEL, VOCAB, planted_model, planted_steps, sentences
from transformer_lens import HookedTransformer, HookedTransformerConfig

import tl_spikesink as ts
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.probes.detectors import (
    MAD_SCALE,
    check_sink_logits,
    compare_detectors,
    default_min_layers,
    detect,
    histogram_mad,
    mad_outliers,
)
from tl_spikesink.probes.reducers import BIN_SHIFT, N_BINS, abs_bits

TEXTS = sentences(8, seed=1, min_words=6, max_words=20)


def spike_tokens(model, texts):
    """Where BOS and "." sit in each text: the planted spike tokens, by hand."""
    dot, out = VOCAB.index("."), set()
    for i, text in enumerate(texts):
        for pos, tok in enumerate(model.to_tokens(text)[0].tolist()):
            if pos == 0 or tok == dot:
                out.add((i, pos))
    return out


def where(d):
    return {(t.text_index, t.position) for t in d.tokens}


@pytest.fixture(scope="module")
def blip():
    """The planted model: a spike at layer 1 only (written by MLP 1, cancelled by MLP 2)."""
    model = planted_model()
    return model, ts.scan(model, TEXTS, progress=False)


@pytest.fixture(scope="module")
def lasting():
    """BOS and "." spike from layer 1 on; MLP 2 cancels the spike at BOS only (a BOS blip)."""
    model = planted_steps([0, 3000.0, -3000.0, 0, 0], bos_only=(2,))
    return model, ts.scan(model, TEXTS, progress=False)


def test_sun_flags_the_planted_spike(blip):
    model, scan = blip
    d = detect(scan, rule="sun")
    assert d.layer_channels == ((1, SPIKE_CHANNEL),)
    assert where(d) == spike_tokens(model, TEXTS)
    assert {a.token for a in d.flags} == {t.token for t in scan.spikes.tokens}
    assert d.complete and torch.equal(d.cuts, scan.spikes.cut)


def test_mad_flags_the_planted_spike_and_its_cut_is_median_plus_z_mad(blip):
    model, scan = blip
    d = detect(scan, rule="mad", z=1000.0)
    assert d.layer_channels == ((1, SPIKE_CHANNEL),)
    assert where(d) == spike_tokens(model, TEXTS)
    s = scan.spikes
    hist = s.histograms[s.sites.index("resid_post")]
    expected = (s.median() + 1000.0 * MAD_SCALE * histogram_mad(hist)).clamp(min=100.0)
    torch.testing.assert_close(d.cuts, expected)
    # A z so large that the cut passes the 3000 spike: nothing is flagged.
    assert detect(scan, rule="mad", z=1e6).flags == ()


def test_mad_finds_a_known_outlier_exactly():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1001, generator=gen)
    x[417] = -40.0
    idx, cut = mad_outliers(x, z=10.0)
    assert idx.tolist() == [417]
    a = np.abs(x.double().numpy())
    med = np.median(a)
    assert cut == pytest.approx(med + 10 * 1.4826 * np.median(np.abs(a - med)))


def test_histogram_mad_is_within_a_few_percent_of_the_exact_one():
    gen = torch.Generator().manual_seed(1)
    for x in (torch.randn(20000, generator=gen), torch.randn(20000, generator=gen).exp()):
        bins = abs_bits(x) >> BIN_SHIFT
        counts = torch.bincount(bins, minlength=N_BINS)[None]
        a = np.abs(x.double().numpy())
        exact = np.median(np.abs(a - np.median(a)))
        assert float(histogram_mad(counts)[0]) == pytest.approx(exact, rel=0.04)


def test_persistence_rejects_a_one_layer_blip(blip):
    _, scan = blip
    assert detect(scan, rule="sun").flags  # the blip is massive ...
    assert detect(scan, rule="persistent", min_layers=2).flags == ()  # ... but lasts one layer
    assert detect(scan, rule="persistent", min_layers=1).flags == detect(scan, rule="sun").flags


def test_persistence_keeps_the_lasting_spike_only(lasting):
    model, scan = lasting
    sun = detect(scan, rule="sun")
    dots = {(i, p) for i, p in spike_tokens(model, TEXTS) if p > 0}
    assert where(sun) == spike_tokens(model, TEXTS)  # BOS at layer 1 and "." at layers 1-4
    keep = detect(scan, rule="persistent", min_layers=3)
    assert where(keep) == dots
    assert keep.layer_channels == tuple((layer, SPIKE_CHANNEL) for layer in range(1, 5))
    assert detect(scan, rule="persistent", min_layers=5).flags == ()  # runs are 4 layers long


def test_default_run_length_is_heretics():
    assert default_min_layers(3) == 2 and default_min_layers(30) == 8


def test_comparison_table(lasting):
    model, scan = lasting
    c = compare_detectors(scan, min_layers=3)
    assert c.rules == ("sun", "mad", "persistent")
    assert c.agreement("sun", "sun") == 1.0
    n_sun, n_keep = len(c.get("sun").flags), len(c.get("persistent").flags)
    assert c.agreement("sun", "persistent") == pytest.approx(n_keep / n_sun)
    text = str(c)
    assert "persistent" in text and "agree w/ sun" in text
    for r in (c, c.get("mad")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            r.model = "x"
        assert repr(r).startswith(type(r).__name__) and len(repr(r)) <= 2048
        assert "NaN" not in r.to_json()
        json.loads(r.to_json())
        assert str(r)
    d = json.loads(c.to_json())
    assert d["agreement"]["sun"] == 1.0 and len(d["detections"]) == 3


def test_detect_scans_a_model_itself(blip):
    model, scan = blip
    d = detect(model, TEXTS, rule="sun", batch_size=3)
    assert d.flags == detect(scan, rule="sun").flags


def test_bad_input_is_refused(blip):
    model, scan = blip
    with pytest.raises(SpikeSinkError, match="rule must be one of"):
        detect(scan, rule="median")
    with pytest.raises(SpikeSinkError, match="min_layers"):
        detect(scan, rule="persistent", min_layers=9)
    with pytest.raises(SpikeSinkError, match="z must be"):
        detect(scan, rule="mad", z=float("nan"))
    with pytest.raises(SpikeSinkError, match="ScanResult and texts"):
        detect(scan, TEXTS)
    with pytest.raises(SpikeSinkError, match="TransformerLens model"):
        detect("gpt2")


def fake(architecture, params=(), model_name="m", **cfg):
    cfg = types.SimpleNamespace(original_architecture=architecture, model_name=model_name, **cfg)
    return types.SimpleNamespace(cfg=cfg, named_parameters=lambda: iter(params))


def test_sink_logit_check_warns_for_gpt_oss_without_sinks():
    with pytest.warns(UserWarning, match="learned per-head sink logit"):
        assert check_sink_logits(fake("GptOssForCausalLM"))
    with pytest.warns(UserWarning, match="no learned attention-sink"):
        check_sink_logits(fake(None, model_name="openai/gpt-oss-20b"))
    with pytest.warns(UserWarning, match="no learned attention-sink"):
        check_sink_logits(fake("Custom", use_attention_sinks=True))
    zeros = [("blocks.0.attn.sinks", torch.zeros(4))]
    with pytest.warns(UserWarning, match="all zero"):
        check_sink_logits(fake("GptOssForCausalLM", zeros))


def test_sink_logit_check_is_silent_when_sinks_are_there_or_not_expected(planted):
    learned = [("blocks.0.attn.sinks", torch.tensor([0.5, -1.0]))]
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=8, n_heads=2, d_head=4, n_ctx=8, d_vocab=10, act_fn="relu",
        use_attention_sinks=True,
    )  # fmt: skip
    # A model of its own with sinks (zero-initialised, not a gpt-oss): nothing to warn about.
    own = HookedTransformer(cfg)
    assert [n for n, _ in own.named_parameters() if n.endswith("sinks")] == ["blocks.0.attn.sinks"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not check_sink_logits(fake("GptOssForCausalLM", learned))
        assert not check_sink_logits(fake("LlamaForCausalLM"))
        assert not check_sink_logits(planted)
        assert not check_sink_logits(own)
