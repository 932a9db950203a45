"""Evaluation and the decoupling table on the planted model, checked against brute force."""

import importlib
import json
import math

import pytest
import torch
from checks import assert_untouched, state_snapshot
from planted import SINK_HEAD, SPIKE_CHANNEL, planted_model, sentences

import tl_spikesink as ts
from tl_spikesink.evaluation.decoupling import experiment, standard_interventions
from tl_spikesink.evaluation.scoring import evaluate
from tl_spikesink.interventions import attention_gate, sink_key_removal, spike_ablation
from tl_spikesink.interventions.norms import norm_swap
from tl_spikesink.probes.scan import ScanConfig

CONFIG = ScanConfig(batch_size=5)


@pytest.fixture(scope="module")
def model():
    """The planted model with an unembedding and a sink head that writes, so logits can change."""
    m = planted_model()
    gen = torch.Generator().manual_seed(1)
    noise = [4, 5, 6, 8, 9, 10]
    with torch.no_grad():
        m.unembed.W_U.copy_(torch.randn(m.unembed.W_U.shape, generator=gen))
        # Values read the constant channel 1, so the sink head's output depends on where it looks.
        m.blocks[0].attn.W_V[0, 1, :] = 0.3 * torch.randn(4, generator=gen)
        m.blocks[0].attn.W_O[0, :, noise] = 0.3 * torch.randn(4, len(noise), generator=gen)
    return m


@pytest.fixture(scope="module")
def texts():
    return sentences(11, seed=3)


@pytest.fixture(scope="module")
def calibration():
    return sentences(6, seed=4)


@pytest.fixture(scope="module")
def clean(model, texts):
    return evaluate(model, texts, config=CONFIG, progress=False)


@torch.no_grad()
def brute_force(model, texts, iv=None):
    """Loss, KL(clean || iv) and top-1 agreement, one unpadded sequence at a time."""
    n, loss, kl, agree = 0, 0.0, 0.0, 0
    for c in ts.tokenize(model, texts).chunks:
        tokens = torch.tensor([c.tokens])
        p = model(tokens)[0, :-1].double().log_softmax(-1)
        q = (
            p
            if iv is None
            else model.run_with_hooks(tokens, fwd_hooks=list(iv.fwd_hooks))[0, :-1]
            .double()
            .log_softmax(-1)
        )
        target = tokens[0, 1:]
        n += len(target)
        loss -= float(q.gather(-1, target[:, None]).sum())
        kl += float((p.exp() * (p - q)).sum())
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
    return n, loss / n, kl / n, agree / n


def test_clean_evaluation_matches_brute_force(model, texts, clean):
    n, loss, _, _ = brute_force(model, texts)
    assert clean.name == "clean" and clean.n_predicted == n
    assert clean.loss == pytest.approx(loss, rel=1e-5)
    assert clean.perplexity == pytest.approx(math.exp(loss), rel=1e-5)
    assert clean.kl == 0 and clean.top1_agreement == 1
    assert clean.sink_heads == (SINK_HEAD,) and clean.sink_ratio == pytest.approx(1 / 6)
    s = clean.scan.spikes
    assert clean.max_spike_ratio == pytest.approx(
        float((s.top("resid_post", 1)[:, 0] / s.median("resid_post")).max())
    )
    assert clean.max_spike_ratio > 1000


@pytest.mark.parametrize("kind", ["zero", "gate", "layernorm", "sink"])
def test_intervened_evaluation_matches_brute_force(model, texts, clean, kind):
    iv = {
        "zero": lambda: spike_ablation(clean.scan, mode="zero"),
        "gate": lambda: attention_gate(scan=clean.scan),
        "layernorm": lambda: norm_swap("layernorm", norms=("ln1", "ln2", "ln_final"), model=model),
        "sink": lambda: sink_key_removal(clean.scan, heads="sink"),
    }[kind]()
    ev = evaluate(model, texts, iv, config=CONFIG, progress=False)
    n, loss, kl, agree = brute_force(model, texts, iv)
    assert ev.name == iv.name and ev.settings == iv.settings and ev.n_predicted == n
    assert ev.loss == pytest.approx(loss, rel=1e-5)
    assert ev.kl == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert ev.top1_agreement == pytest.approx(agree)
    assert ev.kl > 0 and ev.loss != pytest.approx(clean.loss)  # each one changes the logits here
    # The distance columns follow the clean model's sink heads, found on the clean passes.
    assert ev.sink_heads == (SINK_HEAD,)


def test_scan_under_the_intervention(model, texts, clean):
    zero = evaluate(
        model, texts, spike_ablation(clean.scan, mode="zero"), config=CONFIG, progress=False
    )
    assert zero.scan.spikes.tokens == () and zero.max_spike_ratio < 100
    sink = evaluate(
        model, texts, sink_key_removal(clean.scan, heads="sink"), config=CONFIG, progress=False
    )
    assert sink.sink_ratio == 0.0
    # Key 0 removed, the sink head attends uniformly to keys 1..i: query i looks back (i - 1) / 2.
    lengths = [len(c.tokens) for c in ts.tokenize(model, texts).chunks]
    expected = sum(max(i - 1, 0) / 2 for t in lengths for i in range(t)) / sum(lengths)
    assert sink.sink_head_distance == pytest.approx(expected, rel=1e-4)
    assert clean.sink_head_distance == pytest.approx(
        sum(t * (t - 1) / 2 for t in lengths) / sum(lengths), rel=1e-4
    )


def test_padding_side_and_batch_size_do_not_matter(model, texts, clean):
    iv = norm_swap("dyt", calibration=sentences(4, seed=8), scan=clean.scan, model=model)
    a = evaluate(model, texts, iv, config=ScanConfig(batch_size=4), progress=False)
    b = evaluate(
        model, texts, iv, config=ScanConfig(batch_size=3, padding_side="left"), progress=False
    )
    assert a.n_predicted == b.n_predicted
    for f in ("loss", "kl", "top1_agreement", "sink_ratio"):
        assert getattr(a, f) == pytest.approx(getattr(b, f), rel=1e-4, abs=1e-6), f


def test_shards_merge_into_the_whole(model, texts, clean):
    iv = spike_ablation(clean.scan, mode="zero")
    corpus = ts.tokenize(model, texts)
    whole = evaluate(model, corpus, iv, config=CONFIG, sink_heads=[SINK_HEAD], progress=False)
    parts = [
        evaluate(
            model, corpus.shard(r, 2), iv, config=CONFIG, sink_heads=[SINK_HEAD], progress=False
        )
        for r in (0, 1)
    ]
    merged = parts[0].merge(parts[1])
    assert merged.n_predicted == whole.n_predicted and merged.agree_sum == whole.agree_sum
    assert merged.loss == pytest.approx(whole.loss, rel=1e-6) and merged.kl == pytest.approx(
        whole.kl, rel=1e-5
    )
    assert torch.allclose(merged.scan.sinks.scores, whole.scan.sinks.scores)
    other = evaluate(
        model,
        corpus.shard(1, 2),
        sink_key_removal(clean.scan),
        config=CONFIG,
        sink_heads=[SINK_HEAD],
        progress=False,
    )
    with pytest.raises(ts.SpikeSinkError, match="cannot merge"):
        parts[0].merge(other)


def test_evaluate_borrows_the_model_also_on_failure(model, texts, clean, monkeypatch):
    before = state_snapshot(model)
    iv = sink_key_removal(clean.scan, heads="sink")
    evaluate(model, texts[:3], iv, config=CONFIG, progress=False)
    assert_untouched(model, before)

    def boom(*args):
        raise RuntimeError("interrupted")

    # The module, not the function `tl_spikesink.evaluation.scoring` that shadows it on the package.
    monkeypatch.setattr(importlib.import_module("tl_spikesink.evaluation.scoring"), "kl", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        evaluate(model, texts[:3], iv, config=CONFIG, progress=False)
    assert_untouched(model, before)


# ---------------------------------------------------------------- the table


@pytest.fixture(scope="module")
def table(model, texts, calibration):
    return experiment(model, texts, calibration=calibration, config=CONFIG, progress=False)


def test_experiment_table(model, texts, calibration, table, clean):
    names = [r.name for r in table.rows]
    assert names == [
        "clean",
        "zero spikes",
        "mean spikes",
        "no sink key (all heads)",
        "no sink key (sink heads)",
        "norm: layernorm",
        "norm: dyt",
        "norm: fixed_scale",
        "norm: rms_no_spike",
    ]
    first = table.rows[0]
    assert (
        first.delta_loss == 0
        and first.kl == 0
        and first.loss == pytest.approx(clean.loss, rel=1e-6)
    )
    for r in table.rows[1:]:
        assert r.delta_loss == pytest.approx(r.loss - first.loss)
    assert table.row("zero spikes").n_spike_tokens == 0
    # Every planted spike has the same value, so setting the mean restores it almost exactly.
    assert table.row("mean spikes").kl < 1e-6 and table.row("mean spikes").max_spike_ratio > 1000
    assert table.row("no sink key (sink heads)").sink_ratio == 0.0
    assert table.sink_heads == (SINK_HEAD,) and table.spike_channels == (SPIKE_CHANNEL,)
    assert table.corpus["sha256"] == ts.tokenize(model, texts).sha256
    assert table.calibration["sha256"] == ts.tokenize(model, calibration).sha256

    data = json.loads(json.dumps(table.to_dict()))
    assert [r["name"] for r in data["rows"]] == names
    for row in data["rows"]:
        for key in (
            "name",
            "loss",
            "perplexity",
            "kl",
            "max_spike_ratio",
            "sink_ratio",
            "delta_loss",
            "top1_agreement",
            "sink_head_distance",
            "sink_head_distance_without_sink",
        ):
            assert key in row
    assert data["seed"] == 0 and data["config"]["batch_size"] == 5 and data["split"]
    assert data["rows"][2]["settings"]["mode"] == "mean"

    text = str(table)
    for name in names:
        assert name in text
    assert "KL" in text and "sink ratio" in text


def test_calibration_must_be_held_out(model, texts):
    with pytest.raises(ts.SpikeSinkError, match="share 2 sequence"):
        experiment(
            model,
            texts,
            calibration=texts[:2] + sentences(2, seed=9),
            config=CONFIG,
            progress=False,
        )


def test_standard_set_leaves_out_what_does_not_apply(texts, calibration):
    m = planted_model()
    with torch.no_grad():
        m.blocks[1].mlp.W_out.zero_()  # no spike
        m.blocks[0].attn.W_Q.zero_()  # no sink head
    scan = ts.scan(m, texts, progress=False)
    names = [iv.name for iv in standard_interventions(m, scan, calibration)]
    assert names == ["no sink key (all heads)", "norm: layernorm", "norm: dyt", "norm: fixed_scale"]


def test_cli_intervene(model, texts, calibration, tmp_path, capsys, monkeypatch):
    pytest.importorskip("tl_spikesink.models.loading")
    from tl_spikesink.cli import commands as cli
    from tl_spikesink.cli import options

    monkeypatch.setattr(options, "load_model", lambda args: model)
    text_file, cal_file, out = tmp_path / "t.txt", tmp_path / "c.txt", tmp_path / "table.json"
    text_file.write_text("\n".join(texts[:4]))
    cal_file.write_text("\n".join(calibration))
    code = cli.main(
        [
            "intervene",
            "--text-file",
            str(text_file),
            "--calibration-file",
            str(cal_file),
            "--batch-size",
            "3",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "zero spikes" in printed and "norm: rms_no_spike" in printed
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["name"] == "clean" and len(rows) == 9
    # A SpikeSinkError is a clean exit 2: here, calibration texts that are evaluation texts.
    code = cli.main(
        [
            "intervene",
            "--text-file",
            str(text_file),
            "--calibration-file",
            str(text_file),
            "--no-progress",
        ]
    )
    assert code == 2 and "calibrate on held-out text" in capsys.readouterr().err
