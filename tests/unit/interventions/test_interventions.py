"""Interventions on the planted model, where every effect is known in advance."""

import math

import pytest
import torch
from checks import assert_untouched, state_snapshot
from planted import SPIKE, SPIKE_CHANNEL, VOCAB, planted_model, sentences
from transformer_lens import HookedTransformer, HookedTransformerConfig

import tl_spikesink as ts
from tl_spikesink.interventions import (
    Intervention,
    attention_gate,
    compose,
    sink_key_removal,
    spike_ablation,
)
from tl_spikesink.interventions.norms import NormScales, norm_scales, norm_swap
from tl_spikesink.probes.scan import ScanConfig, scan_corpus

TRIGGERS = {VOCAB.index("<bos>"), VOCAB.index(".")}


@pytest.fixture(scope="module")
def clean(planted, texts):
    return ts.scan(planted, texts, batch_size=5, progress=False)


@pytest.fixture(scope="module")
def corpus(planted, texts):
    return ts.tokenize(planted, texts)


@pytest.fixture(scope="module")
def calibration():
    return sentences(8, seed=5)  # disjoint from the `texts` fixture (seed 0)


def run(model, iv, corpus, **settings):
    return scan_corpus(
        model, corpus, ScanConfig(**settings), fwd_hooks=iv.fwd_hooks, progress=False
    )


def cache_under(model, iv, tokens, names):
    """Activations at `names` with `iv` applied (captured after the intervention's hooks)."""
    got = {}
    capture = [(n, lambda x, hook: got.__setitem__(hook.name, x.detach().clone())) for n in names]
    with iv.applied(model), model.hooks(fwd_hooks=capture):
        model(tokens)
    return got


def one_text(model, text="the cat sat . on the mat and it was big"):
    return model.to_tokens(text)


# ---------------------------------------------------------------- every intervention is borrowed


def all_interventions(model, scan, calibration):
    return {
        "zero": spike_ablation(scan, mode="zero"),
        "mean": spike_ablation(scan, mode="mean", calibration=calibration, model=model),
        "clamp": spike_ablation(scan, mode="clamp", value=50.0),
        "sink_all": sink_key_removal(scan),
        "sink_heads": sink_key_removal(scan, heads="sink"),
        "gate": attention_gate(scan=scan),
        **{
            kind: norm_swap(
                kind,
                norms=("ln1", "ln2", "ln_final"),
                calibration=calibration,
                scan=scan,
                model=model,
            )
            for kind in ("layernorm", "dyt", "fixed_scale", "rms_no_spike")
        },
        "compose": compose(spike_ablation(scan, mode="zero"), sink_key_removal(scan)),
    }


KINDS = [
    "zero",
    "mean",
    "clamp",
    "sink_all",
    "sink_heads",
    "gate",
    "layernorm",
    "dyt",
    "fixed_scale",
    "rms_no_spike",
    "compose",
]


@pytest.fixture(scope="module")
def interventions(planted, clean, calibration):
    return all_interventions(planted, clean, calibration)


@pytest.mark.parametrize("kind", KINDS)
def test_model_is_borrowed_also_on_exception(planted, interventions, kind):
    iv = interventions[kind]
    assert isinstance(iv, Intervention) and iv.fwd_hooks
    assert all(
        isinstance(n, str) and n in planted.hook_dict and callable(f) for n, f in iv.fwd_hooks
    )
    before = state_snapshot(planted)
    tokens = one_text(planted)
    clean_logits = planted(tokens)
    with iv.applied(planted) as m:
        assert m is planted
        assert any(hp.fwd_hooks for hp in planted.hook_dict.values())
        planted(tokens)
    assert_untouched(planted, before)
    with pytest.raises(RuntimeError, match="boom"), iv.applied(planted):
        planted(tokens)
        raise RuntimeError("boom")
    assert_untouched(planted, before)
    # run_with_hooks takes the same pairs; the clean model is back afterwards.
    planted.run_with_hooks(tokens, fwd_hooks=list(iv.fwd_hooks))
    assert_untouched(planted, before)
    assert torch.equal(planted(tokens), clean_logits)


@pytest.mark.parametrize("kind", KINDS)
def test_hooks_never_write_into_the_tensor_they_are_handed(planted, interventions, kind):
    iv = interventions[kind]
    seen = []

    def keep(x, hook):
        seen.append((hook.name, x, x.detach().clone()))

    # `keep` runs first at each hook point, so it holds the very tensor the intervention gets.
    with (
        planted.hooks(fwd_hooks=[(n, keep) for n in dict.fromkeys(n for n, _ in iv.fwd_hooks)]),
        iv.applied(planted),
    ):
        planted(one_text(planted))
    assert seen
    for name, handed, copy in seen:
        assert torch.equal(handed, copy), f"{kind} wrote into its input at {name}"


def test_users_own_hooks_survive(planted, interventions):
    calls = []
    planted.blocks[1].hook_resid_post.add_hook(lambda x, hook: calls.append(1))
    try:
        with interventions["zero"].applied(planted):
            planted(one_text(planted))
        assert planted.blocks[1].hook_resid_post.fwd_hooks and calls
    finally:
        planted.reset_hooks()


def test_applied_refuses_a_model_without_the_hook(planted):
    iv = sink_key_removal(heads=[(5, 0)])  # no scan, no model: checked when applied
    with pytest.raises(ts.SpikeSinkError, match="blocks.5.attn.hook_attn_scores"):
        with iv.applied(planted):
            pass


# ---------------------------------------------------------------- spikes


def test_zero_ablation_removes_the_planted_spike(planted, clean, corpus):
    iv = spike_ablation(clean, mode="zero")
    assert iv.settings["layers"] == [1] and iv.settings["channels"] == [SPIKE_CHANNEL]
    assert iv.fwd_hooks[0][0] == "blocks.1.hook_resid_post"
    r = run(planted, iv, corpus)
    # The probes see the ablated residual: no spike token is left anywhere ...
    assert r.spikes.tokens == () and r.spikes.top("resid_post", 1).max() < 10
    # ... although layer 1's MLP still writes it (the ablation acts after the block) ...
    assert r.spikes.top("mlp_out", 1)[1, 0] == pytest.approx(SPIKE, abs=1)
    # ... and layer 2's step-down neuron, with nothing to cancel, now writes nothing.
    assert r.spikes.top("mlp_out", 1)[2, 0] < 1e-3


def test_default_layer_is_the_spike_site(planted, clean, texts):
    from planted import planted_steps

    from tl_spikesink.probes.site import NoStepUpBlock, spike_site

    iv = spike_ablation(clean, mode="zero")
    site = iv.settings["site"]
    assert iv.settings["layers"] == [spike_site(clean).layer] == [1]
    assert (site["layer"], site["component"], site["paper_block"]) == (1, "mlp", 4)
    assert "paper block 4" in site["reason"]
    # Two step-up blocks: the one carrying the largest spike, not the first or the busiest.
    two = ts.scan(planted_steps([500.0, 0.0, 5000.0, 0.0], bos_only=(2,)), texts, progress=False)
    assert spike_ablation(two, mode="zero").settings["layers"] == [2]
    # Layers given: the settings say so.
    given = spike_ablation(clean, mode="zero", layers=[2])
    assert given.settings["site"] == {"reason": "layers given by the caller"}
    gradual = ts.scan(planted_steps([40.0] * 6), texts[:6], progress=False)
    with pytest.raises(NoStepUpBlock, match="blocks 2–5.*layers="):
        spike_ablation(gradual, mode="zero")


def test_zero_ablation_changes_only_spike_channel_at_spike_tokens(planted, clean):
    tokens = one_text(planted)
    names = ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out", "blocks.2.hook_resid_post"]
    _, cache = planted.run_with_cache(tokens)
    after = cache_under(planted, spike_ablation(clean, mode="zero"), tokens, names)
    spike = torch.tensor([t in TRIGGERS for t in tokens[0].tolist()])
    before = cache["blocks.1.hook_resid_post"][0]
    got = after["blocks.1.hook_resid_post"][0]
    assert (before[spike, SPIKE_CHANNEL].abs() > 2900).all()
    assert (got[spike, SPIKE_CHANNEL] == 0).all()
    expected = before.clone()
    expected[spike, SPIKE_CHANNEL] = 0
    assert torch.equal(got, expected)
    assert after["blocks.2.hook_mlp_out"][0].abs().max() < 1e-3
    # Clean, the step-down cancels the spike (to a small remainder); ablated, there is none.
    assert (cache["blocks.2.hook_resid_post"][0][spike, SPIKE_CHANNEL].abs() < 5).all()
    assert after["blocks.2.hook_resid_post"][0][:, SPIKE_CHANNEL].abs().max() < 1e-6


def test_mean_ablation_uses_the_calibration_mean(planted, clean, corpus, calibration):
    iv = spike_ablation(clean, mode="mean", calibration=calibration, model=planted)
    # Every planted spike is the same value, so the mean is that value ...
    cal = ts.tokenize(planted, calibration)
    values = []
    for c in cal.chunks:
        _, cache = planted.run_with_cache(torch.tensor([c.tokens]))
        x = cache["blocks.1.hook_resid_post"][0, :, SPIKE_CHANNEL]
        values.append(x[x.abs() > 100])
    assert iv.settings["means"]["1"][0] == pytest.approx(
        float(torch.cat(values).double().mean()), rel=1e-6
    )
    assert iv.settings["calibration"]["n_tokens"] == cal.n_tokens
    # ... and setting it changes (almost) nothing: the spike is back at full size.
    r = run(planted, iv, corpus)
    assert r.spikes.top("resid_post", 1)[1, 0] == pytest.approx(SPIKE, abs=1)
    assert len(r.spikes.tokens) == len(ts.scan(planted, corpus, progress=False).spikes.tokens)


def test_clamp_bounds_the_spike(planted, clean):
    tokens = one_text(planted)
    got = cache_under(
        planted,
        spike_ablation(clean, mode="clamp", value=500.0),
        tokens,
        ["blocks.1.hook_resid_post"],
    )["blocks.1.hook_resid_post"][0]
    spike = torch.tensor([t in TRIGGERS for t in tokens[0].tolist()])
    assert torch.allclose(got[spike, SPIKE_CHANNEL], torch.full((int(spike.sum()),), 500.0))


def test_spike_tokens_are_found_in_each_activation(planted, clean):
    """New texts put spike tokens at new positions; the hook finds them where they are."""
    iv = spike_ablation(clean, mode="zero")
    for text in ["the . . cat", "a dog ran on the rug . then it sat"]:
        tokens = one_text(planted, text)
        got = cache_under(planted, iv, tokens, ["blocks.1.hook_resid_post"])[
            "blocks.1.hook_resid_post"
        ]
        assert got[0, :, SPIKE_CHANNEL].abs().max() == 0


def test_threshold_and_overrides(planted, clean):
    iv = spike_ablation(clean, mode="zero", threshold=5000.0)  # above the spike: nothing to ablate
    tokens = one_text(planted)
    got = cache_under(planted, iv, tokens, ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"]
    assert got[0, 0, SPIKE_CHANNEL] == pytest.approx(SPIKE, abs=1)
    iv = spike_ablation(mode="zero", layers=[0, 2], channels=[3])
    assert [n for n, _ in iv.fwd_hooks] == ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]


def test_spike_ablation_errors(planted, clean):
    no_spikes = ts.tokenize(
        planted, ["the cat sat on the mat and it was big"], prepend_bos=False, name="no-dots"
    )
    with pytest.raises(ts.SpikeSinkError, match="no-dots"):
        spike_ablation(clean, mode="mean", calibration=no_spikes, model=planted)
    with pytest.raises(ts.SpikeSinkError, match="layer 3 is out of range"):
        spike_ablation(clean, mode="zero", layers=[3])
    with pytest.raises(ts.SpikeSinkError, match="channel 16 is out of range"):
        spike_ablation(clean, mode="zero", channels=[16])
    with pytest.raises(ts.SpikeSinkError, match="channel -1"):
        spike_ablation(clean, mode="zero", channels=[-1])
    with pytest.raises(ts.SpikeSinkError, match="clamp"):
        spike_ablation(clean, mode="clamp")
    with pytest.raises(ts.SpikeSinkError, match="calibration"):
        spike_ablation(clean, mode="mean")
    with pytest.raises(ts.SpikeSinkError, match="model="):
        spike_ablation(clean, mode="mean", calibration=["the cat ."])
    with pytest.raises(ts.SpikeSinkError, match="mode"):
        spike_ablation(clean, mode="halve")
    with pytest.raises(ts.SpikeSinkError, match="scan result or layers"):
        spike_ablation(mode="zero")
    # Without a scan or model, a channel out of range is caught when the hook runs.
    iv = spike_ablation(mode="zero", layers=[1], channels=[99])
    with pytest.raises(ts.SpikeSinkError, match="channel 99"), iv.applied(planted):
        planted(one_text(planted))


def test_no_spike_scan_gives_a_clear_error(texts):
    model = planted_model()
    with torch.no_grad():
        model.blocks[1].mlp.W_out.zero_()
    r = ts.scan(model, texts[:4], progress=False)
    with pytest.raises(ts.SpikeSinkError, match="no massive activation"):
        spike_ablation(r, mode="zero")


# ---------------------------------------------------------------- sinks


def test_sink_key_removal_in_the_sink_head(planted, clean, corpus):
    lengths = [len(c.tokens) for c in corpus.chunks]
    iv = sink_key_removal(clean, heads="sink")
    assert [n for n, _ in iv.fwd_hooks] == ["blocks.0.attn.hook_attn_scores"]
    r = run(planted, iv, corpus)
    # Only query 0 still attends to key 0: pooled α_0 = (one query per text) / Σ T.
    assert r.sinks.scores[0, 0] == pytest.approx(len(lengths) / sum(lengths), abs=1e-6)
    assert torch.allclose(r.sinks.scores[1:], clean.sinks.scores[1:].to(r.sinks.scores), atol=1e-6)
    assert r.sinks.sink_ratio == 0.0 and r.sinks.sink_heads == ()


def test_sink_head_pattern_becomes_uniform_over_later_keys(planted, clean):
    tokens = one_text(planted)
    t = tokens.shape[1]
    pattern = cache_under(
        planted, sink_key_removal(clean, heads=[(0, 0)]), tokens, ["blocks.0.attn.hook_pattern"]
    )["blocks.0.attn.hook_pattern"][0]
    expected = torch.zeros(t, t)
    expected[0, 0] = 1.0
    for i in range(1, t):
        expected[i, 1 : i + 1] = 1.0 / i
    assert torch.allclose(pattern[0], expected, atol=1e-6)
    _, cache = planted.run_with_cache(tokens)
    assert torch.equal(
        pattern[1], cache["blocks.0.attn.hook_pattern"][0, 1]
    )  # other head untouched


def test_several_positions_keep_each_querys_own_key(planted):
    tokens = one_text(planted)
    t = tokens.shape[1]
    iv = sink_key_removal(positions=(0, 1, 2), heads=[(0, 1)])
    pattern = cache_under(planted, iv, tokens, ["blocks.0.attn.hook_pattern"])[
        "blocks.0.attn.hook_pattern"
    ][0, 1]
    assert torch.isfinite(pattern).all() and torch.allclose(pattern.sum(-1), torch.ones(t))
    for i in range(
        t
    ):  # head (0, 1) is uniform: query i now spreads over max(i, 3)..i, own key kept
        lo = min(i, 3)
        assert torch.allclose(pattern[i, lo : i + 1], torch.full((i + 1 - lo,), 1 / (i + 1 - lo)))


def test_all_heads_and_left_padding(planted, clean, corpus):
    lengths = [len(c.tokens) for c in corpus.chunks]
    iv = sink_key_removal(clean)
    assert len(iv.fwd_hooks) == 3
    right = run(planted, iv, corpus, batch_size=5)
    left = run(planted, iv, corpus, batch_size=5, padding_side="left")
    first_only = torch.full_like(right.sinks.scores, len(lengths) / sum(lengths))
    assert torch.allclose(right.sinks.scores, first_only, atol=1e-6)
    # Positions count from the first real token, so left padding gives the same result.
    assert torch.allclose(left.sinks.scores, first_only, atol=1e-6)
    assert right.sinks.sink_ratio == 0.0


def test_sink_key_removal_errors(clean):
    with pytest.raises(ts.SpikeSinkError, match="needs a scan"):
        sink_key_removal(heads="sink")
    with pytest.raises(ts.SpikeSinkError, match="out of range"):
        sink_key_removal(clean, heads=[(0, 2)])
    with pytest.raises(ts.SpikeSinkError, match="layer 3"):
        sink_key_removal(clean, layers=[3])
    with pytest.raises(ts.SpikeSinkError, match="non-negative"):
        sink_key_removal(clean, positions=(-1,))
    with pytest.raises(ts.SpikeSinkError, match="no head selected"):
        sink_key_removal(clean, heads="sink", layers=[1])
    with pytest.raises(ts.SpikeSinkError, match="model's size"):
        sink_key_removal()


def test_attention_gate(planted, clean):
    tokens = one_text(planted)
    _, cache = planted.run_with_cache(tokens)
    iv = attention_gate(scan=clean)
    assert iv.settings["gates"] == [[0, 0, 0.0]]
    z = cache_under(planted, iv, tokens, ["blocks.0.attn.hook_z"])["blocks.0.attn.hook_z"][0]
    assert (z[:, 0] == 0).all() and torch.equal(z[:, 1], cache["blocks.0.attn.hook_z"][0, :, 1])
    half = attention_gate({(2, 1): 0.5}, model=planted)
    z = cache_under(planted, half, tokens, ["blocks.2.attn.hook_z"])["blocks.2.attn.hook_z"][0]
    assert torch.allclose(z[:, 1], 0.5 * cache["blocks.2.attn.hook_z"][0, :, 1])
    with pytest.raises(ts.SpikeSinkError, match="out of range"):
        attention_gate({(0, 5): 0.0}, scan=clean)
    with pytest.raises(ts.SpikeSinkError, match="gates= or a scan"):
        attention_gate()


# ---------------------------------------------------------------- norms


def ln1_input_and_output(model, iv, layer=1):
    tokens = one_text(model)
    got = cache_under(
        model, iv, tokens, [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.ln1.hook_normalized"]
    )
    return got[f"blocks.{layer}.hook_resid_pre"][0], got[f"blocks.{layer}.ln1.hook_normalized"][0]


def test_layernorm_swap_matches_the_formula(planted):
    x, out = ln1_input_and_output(planted, norm_swap("layernorm", model=planted))
    eps = planted.cfg.eps
    expected = (x - x.mean(-1, keepdim=True)) / (
        x.var(-1, unbiased=False, keepdim=True) + eps
    ).sqrt()
    assert torch.allclose(out, expected, atol=1e-5)


def reference_median_rms(model, texts, module):
    """Median over non-spike tokens (all but BOS and ".") of sqrt(mean x² + eps) at `module`."""
    inputs = {"ln1": "hook_resid_pre", "ln2": "hook_resid_mid"}
    _, layer, norm = module.split(".")
    values = []
    for c in ts.tokenize(model, texts).chunks:
        _, cache = model.run_with_cache(torch.tensor([c.tokens]))
        x = cache[f"blocks.{layer}.{inputs[norm]}"][0]
        keep = torch.tensor([t not in TRIGGERS for t in c.tokens])
        values.append((x[keep].pow(2).mean(-1) + model.cfg.eps).sqrt())
    return float(torch.cat(values).double().median())


def test_dyt_and_fixed_scale_fit_the_median_rms_of_non_spike_tokens(planted, clean, calibration):
    scales = norm_scales(planted, calibration, norms=("ln1", "ln2"), scan=clean)
    n_triggers = sum(
        t in TRIGGERS for c in ts.tokenize(planted, calibration).chunks for t in c.tokens
    )
    assert scales.n_spike_tokens == n_triggers
    for module in ("blocks.1.ln1", "blocks.2.ln1", "blocks.2.ln2"):
        assert scales.medians[module] == pytest.approx(
            reference_median_rms(planted, calibration, module), rel=1e-5
        )
    s = scales.medians["blocks.1.ln1"]
    fixed = norm_swap("fixed_scale", calibration=calibration, scan=clean, model=planted)
    dyt = norm_swap("dyt", calibration=scales, scan=clean, model=planted)
    assert fixed.settings["scale"]["blocks.1.ln1"] == pytest.approx(s, rel=1e-6)
    assert dyt.settings["alpha"]["blocks.1.ln1"] == pytest.approx(1 / s, rel=1e-6)
    x, out = ln1_input_and_output(planted, fixed)
    assert torch.allclose(out, x / s, rtol=1e-5, atol=1e-6)
    x, out = ln1_input_and_output(planted, dyt)
    assert torch.allclose(out, torch.tanh(x / s), atol=1e-5)
    # Spike tokens are no longer compressed by fixed_scale: the MLP of layer 2 sees a huge input.
    assert out.abs().max() <= 1.0


def test_rms_without_spike_channels(planted, clean):
    x, out = ln1_input_and_output(
        planted, norm_swap("rms_no_spike", scan=clean, model=planted), layer=2
    )
    rest = torch.cat([x[:, :SPIKE_CHANNEL], x[:, SPIKE_CHANNEL + 1 :]], -1)
    assert torch.allclose(
        out, x / (rest.pow(2).mean(-1, keepdim=True) + planted.cfg.eps).sqrt(), rtol=1e-5
    )
    assert out[0, SPIKE_CHANNEL] > 1000  # BOS keeps its spike after the norm


def test_norm_swap_errors(planted, clean, calibration):
    with pytest.raises(ts.SpikeSinkError, match="model="):
        norm_swap("layernorm")
    with pytest.raises(ts.SpikeSinkError, match="sandwich"):
        norm_swap("layernorm", norms=("ln1_post",), model=planted)
    with pytest.raises(ts.SpikeSinkError, match="unknown norm swap"):
        norm_swap("batchnorm", model=planted)
    with pytest.raises(ts.SpikeSinkError, match="calibration"):
        norm_swap("dyt", model=planted)
    with pytest.raises(ts.SpikeSinkError, match="spike channels"):
        norm_swap("rms_no_spike", model=planted)
    with pytest.raises(ts.SpikeSinkError, match="layer 7"):
        norm_swap("layernorm", layers=[7], model=planted)
    partial = norm_scales(planted, calibration, norms=("ln1",), scan=clean)
    assert isinstance(partial, NormScales) and math.isfinite(partial.medians["blocks.0.ln1"])
    with pytest.raises(ts.SpikeSinkError, match="no median for blocks.0.ln2"):
        norm_swap("fixed_scale", norms=("ln2",), calibration=partial, model=planted)


@pytest.mark.parametrize("norm", ["LN", None])
def test_norm_swap_needs_rmsnorm(norm):
    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=8,
        n_heads=2,
        d_head=4,
        d_mlp=16,
        d_vocab=10,
        n_ctx=16,
        act_fn="gelu",
        normalization_type=norm,
    )
    with pytest.raises(ts.SpikeSinkError, match="RMSNorm"):
        norm_swap("layernorm", model=HookedTransformer(cfg))


# ---------------------------------------------------------------- compose


def test_compose_applies_both_in_order(planted, clean, corpus):
    zero, sink = spike_ablation(clean, mode="zero"), sink_key_removal(clean, heads="sink")
    both = compose(zero, sink)
    assert both.name == "zero spikes + no sink key (sink heads)"
    assert both.fwd_hooks == zero.fwd_hooks + sink.fwd_hooks
    assert [p["kind"] for p in both.settings["parts"]] == ["spike_ablation", "sink_key_removal"]
    r = run(planted, both, corpus)
    assert r.spikes.tokens == () and r.sinks.sink_ratio == 0.0
    with pytest.raises(ts.SpikeSinkError):
        compose()
