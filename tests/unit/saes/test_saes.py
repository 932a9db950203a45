"""SAE masks, splicing and reports on the planted model, with SAEs whose errors are known.

The planted model's spike is 3000 in channel 7 of `blocks.1.hook_resid_post` at BOS and "."
(layers 1-2), and head (0, 0) sinks on BOS. The SAEs are built by hand:

* `identity_sae()`: latents [I, -I] and a ReLU, so x̂ = relu(x) - relu(-x) = x exactly;
* `identity_sae(drop=(7,))`: the same without channel 7, so x̂ = x with channel 7 zeroed: the
  error is exactly the spike (3000² per spike token) and lies entirely in the spike channel.
"""

import copy

import pytest
import torch
from checks import assert_untouched, state_snapshot
from planted import SPIKE, SPIKE_CHANNEL, VOCAB, planted_model, sentences

import tl_spikesink as ts
from tl_spikesink.saes import (
    GROUPS,
    SpikeRule,
    bypassed,
    collect_activations,
    compare_reports,
    sae_report,
    sae_splice,
    scan_mask,
    train_sae,
)

sae_lens = pytest.importorskip("sae_lens")
HOOK = "blocks.1.hook_resid_post"
D = 16


def identity_sae(drop=(), hook=HOOK, d=D):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=2 * d, metadata=SAEMetadata(hook_name=hook)))
    eye = torch.eye(d)
    for c in drop:
        eye[c, c] = 0.0
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@pytest.fixture(scope="module")
def scored_model():
    """The planted model with a seeded random unembedding, so the loss depends on the residual."""
    model = planted_model()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        model.unembed.W_U.copy_(torch.randn(model.unembed.W_U.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def corpus(planted, texts):
    return ts.tokenize(planted, texts)


@pytest.fixture(scope="module")
def clean_scan(planted, corpus):
    return ts.scan(planted, corpus, progress=False)


@pytest.fixture(scope="module")
def drop7_report(scored_model, corpus):
    return sae_report(scored_model, identity_sae(drop=(SPIKE_CHANNEL,)), corpus, progress=False)


def _planted_spikes(batch):
    ids = batch.tokens
    return batch.mask & ((ids == VOCAB.index("<bos>")) | (ids == VOCAB.index(".")))


def _resid(model, batch, hook=HOOK):
    _, cache = model.run_with_cache(
        batch.tokens, attention_mask=batch.mask.long(), names_filter=hook
    )
    return cache[hook]


# ---------------------------------------------------------------- masks


def test_masks_are_the_planted_positions(planted, corpus, clean_scan):
    for batch in corpus.batches(8):
        expected = _planted_spikes(batch)
        assert expected.sum() > batch.tokens.shape[0]  # BOS and at least one "." per text
        assert torch.equal(scan_mask(clean_scan, batch, "spike"), expected)
        bos = batch.mask & (batch.tokens == VOCAB.index("<bos>"))
        assert torch.equal(scan_mask(clean_scan, batch, "sink"), bos)
        x = _resid(planted, batch)
        assert torch.equal(SpikeRule().mask(x, batch.mask), expected)
        rule = SpikeRule.from_scan(clean_scan, 1)
        assert rule.channels == (SPIKE_CHANNEL,) and rule.cut < SPIKE
        assert torch.equal(rule.mask(x, batch.mask), expected)


def test_spike_rule_errors(clean_scan):
    with pytest.raises(ts.SpikeSinkError, match="needs a test"):
        SpikeRule(norm_ratio=None)
    with pytest.raises(ts.SpikeSinkError, match="exceed 1"):
        SpikeRule(norm_ratio=0.5)
    with pytest.raises(ts.SpikeSinkError, match="cut"):
        SpikeRule(channels=(7,))
    with pytest.raises(ts.SpikeSinkError, match="out of range"):
        SpikeRule(norm_ratio=None, channels=(99,), cut=1.0).mask(torch.ones(1, 2, D))
    with pytest.raises(ts.SpikeSinkError, match="out of range"):
        SpikeRule.from_scan(clean_scan, 7)


# ---------------------------------------------------------------- the report


def test_report_numbers_known_by_construction(scored_model, corpus, drop7_report):
    r = drop7_report
    n_spike = sum(int(_planted_spikes(b).sum()) for b in corpus.batches(8))
    assert r.n("spike") == n_spike
    assert r.n("all") == corpus.n_tokens
    assert r.n("sink") == 0  # the only sink token (BOS) is a spike token
    assert r.n_sink_spike == len(corpus.chunks)
    # The error is the spike, exactly, and nothing else.
    x7 = torch.cat(
        [_resid(scored_model, b)[..., SPIKE_CHANNEL][_planted_spikes(b)] for b in corpus.batches(8)]
    )
    assert r.mse("spike") == pytest.approx(float(x7.double().pow(2).mean()) / D, rel=1e-6)
    assert r.mse("other") == 0.0 and r.explained_variance("other") == 1.0
    assert r.spike_channel_error_share("spike") == pytest.approx(1.0)
    # L0 = non-zero coordinates (channel 7 excluded): each is one active latent.
    nonzero = {"spike": 0, "other": 0}
    for b in corpus.batches(8):
        x = _resid(scored_model, b)
        x[..., SPIKE_CHANNEL] = 0
        count = (x != 0).sum(-1)
        spike = _planted_spikes(b)
        nonzero["spike"] += int(count[spike].sum())
        nonzero["other"] += int(count[b.mask & ~spike].sum())
    assert r.l0("spike") == pytest.approx(nonzero["spike"] / r.n("spike"))
    assert r.l0("other") == pytest.approx(nonzero["other"] / r.n("other"))
    # Bypassing spike and sink tokens is exact here: every other token is reconstructed exactly.
    assert r.delta_loss("bypass") == 0.0
    assert r.loss_recovered("bypass") == 1.0
    assert r.loss("sae") == pytest.approx(r.loss("spike_only"), abs=1e-9)


def test_class_split_sums_to_total(drop7_report):
    r = drop7_report
    for field in ("n_tokens", "sq_error", "l0_sum", "n_predicted"):
        total = r._sum(getattr(r, field), "all")
        parts = sum(r._sum(getattr(r, field), c) for c in ("spike", "sink", "delimiter", "other"))
        assert float(total) == pytest.approx(float(parts))
    for run in r.runs:
        n = {g: int(r._sum(r.n_predicted, g)) for g in GROUPS}
        whole = r.loss(run, "all") * n["all"]
        split = sum(r.loss(run, c) * n[c] for c in ("spike", "other") if n[c])
        assert whole == pytest.approx(split)


def test_identity_sae_is_free(scored_model, corpus):
    r = sae_report(scored_model, identity_sae(), corpus, progress=False)
    assert r.mse("all") == 0.0 and r.explained_variance("all") == 1.0
    for run in ("sae", "spike_only", "bypass"):
        assert r.delta_loss(run) == 0.0
        assert r.loss_recovered(run) == 1.0
    assert abs(r.loss("zero") - r.loss("clean")) > 0.1  # so "recovered" is a real ratio
    # Latents 0..15 copy positive coordinates, 16..31 negative ones; channel 7's positive latent
    # fires on exactly the spike tokens.
    assert r.latent_frequency("spike")[SPIKE_CHANNEL] == 1.0
    assert r.latent_frequency("normal")[SPIKE_CHANNEL] == 0.0
    assert (SPIKE_CHANNEL, 1.0, 0.0) in r.firing_latents("spike", 16)


def test_report_is_printable_and_jsonable(drop7_report):
    text = str(drop7_report)
    for word in ("spike", "sink", "delimiter", "other", "normal", "dead", "loss recovered"):
        assert word in text
    d = drop7_report.to_dict()
    assert d["groups"]["spike"]["spike_channel_error_share"] == pytest.approx(1.0)
    assert d["hook"] == HOOK and d["sae"]["d_sae"] == 2 * D
    assert "groups" in drop7_report.to_json()
    table = compare_reports({"a": drop7_report, "b": drop7_report})
    assert table.count("\n") > 3 and "EV normal" in table


def test_merge_equals_report_of_both(planted):
    a, b = sentences(10, seed=3), sentences(10, seed=4)
    sae = identity_sae(drop=(SPIKE_CHANNEL,))
    kw = {"progress": False, "runs": ("sae",)}
    merged = sae_report(planted, sae, a, **kw).merge(sae_report(planted, sae, b, **kw))
    both = sae_report(planted, sae, a + b, **kw)
    for field in ("n_tokens", "fires", "n_predicted"):
        assert torch.equal(getattr(merged, field), getattr(both, field))
    for field in ("sq_error", "sum_x", "sum_sq_x", "loss_sum"):
        assert torch.allclose(getattr(merged, field), getattr(both, field), rtol=1e-9)


def test_saved_folder_gives_the_same_report(planted, texts, tmp_path):
    sae = identity_sae(drop=(SPIKE_CHANNEL,))
    sae.save_model(tmp_path / "sae")
    kw = {"progress": False, "runs": ()}
    a = sae_report(planted, sae, texts[:6], **kw)
    b = sae_report(planted, str(tmp_path / "sae"), texts[:6], **kw)
    assert torch.equal(a.sq_error, b.sq_error)


# ---------------------------------------------------------------- errors and borrowing


def test_mismatches_get_clear_errors(planted, texts, clean_scan):
    with pytest.raises(ts.SpikeSinkError, match="reads 8 channels"):
        sae_report(planted, identity_sae(d=8), texts[:2], progress=False)
    with pytest.raises(
        ts.SpikeSinkError, match="no hook point 'blocks.9.hook_resid_post'.*3 blocks"
    ):
        sae_report(planted, identity_sae(hook="blocks.9.hook_resid_post"), texts[:2])
    with pytest.raises(ts.SpikeSinkError, match="trained on"):
        sae_report(planted, identity_sae(), texts[:2], hook="blocks.0.hook_resid_post")
    with pytest.raises(ts.SpikeSinkError, match="not a saved SAE folder"):
        sae_report(planted, "/nonexistent/sae", texts[:2])
    with pytest.raises(ts.SpikeSinkError, match="not an sae-lens SAE"):
        sae_report(planted, object(), texts[:2])
    with pytest.raises(ts.SpikeSinkError, match="scan of the texts being evaluated"):
        sae_report(planted, identity_sae(), texts[:2], scan=clean_scan)
    with pytest.raises(ts.SpikeSinkError, match="unknown run"):
        sae_report(planted, identity_sae(), texts[:2], runs=("nope",))


def test_model_left_unchanged(planted, texts):
    before = state_snapshot(planted)
    sae_report(
        planted, identity_sae(drop=(SPIKE_CHANNEL,)), texts[:4], runs=("sae",), progress=False
    )
    iv = sae_splice(identity_sae(), model=planted)
    with pytest.raises(RuntimeError, match="boom"), iv.applied(planted):
        raise RuntimeError("boom")
    assert_untouched(planted, before)


# ---------------------------------------------------------------- splicing and bypassing


def test_splice_with_bypass_keeps_spikes(planted, corpus):
    batch = next(corpus.batches(8))
    clean, spike, real = _resid(planted, batch), _planted_spikes(batch), batch.mask
    drop7 = identity_sae(drop=(SPIKE_CHANNEL,))
    with sae_splice(drop7, model=planted).applied(planted):
        spliced = _resid(planted, batch)
    assert (spliced[..., SPIKE_CHANNEL][spike] == 0).all()
    assert torch.equal(spliced[real & ~spike], clean[real & ~spike])
    with sae_splice(drop7, bypass=SpikeRule(), model=planted).applied(planted):
        bypassed_spikes = _resid(planted, batch)
    assert torch.equal(bypassed_spikes[real], clean[real])


def test_bypassed_in_hooked_sae_transformer(planted, corpus):
    from sae_lens import HookedSAETransformer

    model = HookedSAETransformer(copy.deepcopy(planted.cfg), planted.tokenizer)
    model.load_state_dict(planted.state_dict())
    before = state_snapshot(model)
    batch = next(corpus.batches(8))
    clean = _resid(model, batch)
    spike = _planted_spikes(batch)
    out = f"{HOOK}.hook_sae_output"
    with model.saes(saes=[identity_sae(drop=(SPIKE_CHANNEL,))]):
        with pytest.raises(ts.SpikeSinkError, match="already attached"):
            sae_report(model, identity_sae(), ["the cat sat"])
        with pytest.raises(ts.SpikeSinkError, match="an SAE is attached there"):
            ts.scan(model, ["the cat sat"], progress=False)
        raw = _resid(model, batch, out)
        with bypassed(model, SpikeRule()):
            kept = _resid(model, batch, out)
        with bypassed(model, spike):  # a fixed [batch, pos] mask works the same
            kept_fixed = _resid(model, batch, out)
        with pytest.raises(RuntimeError, match="boom"), bypassed(model, spike):
            raise RuntimeError("boom")
    assert (raw[..., SPIKE_CHANNEL][spike] == 0).all()
    assert torch.equal(kept[batch.mask], clean[batch.mask])
    assert torch.equal(kept_fixed[batch.mask], kept[batch.mask])
    with pytest.raises(ts.SpikeSinkError, match="no SAE is attached"):
        with bypassed(model, spike):
            pass
    assert not model.acts_to_saes
    assert_untouched(model, before)


# ---------------------------------------------------------------- training


def test_collect_and_train_drop_spikes(planted, texts):
    acts = collect_activations(planted, HOOK, texts, progress=False)
    n_spike = sum(int(_planted_spikes(b).sum()) for b in ts.tokenize(planted, texts).batches(8))
    assert int(acts.spike.sum()) == n_spike
    assert (acts.x[acts.spike, SPIKE_CHANNEL].abs() > SPIKE / 2).all()
    assert len(acts.drop_spikes()) == len(acts) - n_spike
    kw = {"activations": acts, "steps": 30, "batch_size": 64, "progress": False}
    with_spikes = train_sae(planted, HOOK, exclude=None, **kw)
    without = train_sae(planted, HOOK, exclude="spikes", **kw)
    again = train_sae(planted, HOOK, exclude="spikes", **kw)
    assert torch.equal(without.W_enc, again.W_enc)  # seeded
    meta = without.cfg.metadata
    assert meta.hook_name == HOOK and without.cfg.d_sae == 4 * D
    assert meta.tl_spikesink_training["n_train_activations"] == len(acts) - n_spike
    assert with_spikes.cfg.metadata.tl_spikesink_training["n_train_activations"] == len(acts)
    with pytest.raises(ts.SpikeSinkError, match="only"):
        train_sae(planted, HOOK, activations=acts, batch_size=10**6, progress=False)
    with pytest.raises(ts.SpikeSinkError, match="exclude"):
        train_sae(planted, HOOK, exclude="sinks", **kw)


def test_cli_sae_command(planted, texts, tmp_path, monkeypatch, capsys):
    from tl_spikesink.cli import commands as cli
    from tl_spikesink.cli import options

    monkeypatch.setattr(options, "load_model", lambda args: planted)
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(texts[:6]))
    for name, drop in (("exact", ()), ("drop7", (SPIKE_CHANNEL,))):
        identity_sae(drop=drop).save_model(tmp_path / name)
    folders = [str(tmp_path / "exact"), str(tmp_path / "drop7")]
    out = tmp_path / "r.json"
    argv = ["sae", *folders, "--text-file", str(path), "--no-progress", "--json", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("SAE report") == 2 and "EV normal" in printed
    import json

    data = json.loads(out.read_text())
    assert data[folders[0]]["groups"]["all"]["mse"] == 0.0
    assert data[folders[1]]["groups"]["spike"]["spike_channel_error_share"] == pytest.approx(1.0)
    assert cli.main(["sae", str(tmp_path / "nope"), "--text-file", str(path)]) == 2
