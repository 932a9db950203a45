"""Training variants: each forward pass matches its formula; runs are seeded and round-trip."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields, replace

import pytest
import torch

from tl_spikesink import mechanism as mech
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.training.ablation import AblationTable, SeedStat, ablation_study
from tl_spikesink.training.runs import (
    Snapshot,
    TrainConfig,
    first_token_profile,
    load_checkpoint,
    train,
)
from tl_spikesink.training.tasks import BigramBackcopy, probe_corpus
from tl_spikesink.training.variants import (
    VARIANTS,
    DynamicTanh,
    GatedAttention,
    PostNormBlock,
    Variant,
    build_model,
    model_config,
)

TASK = BigramBackcopy(vocab_size=12, n_triggers=2)
TINY = TrainConfig(
    n_layers=2,
    d_model=16,
    d_head=4,
    d_mlp=32,
    seq_len=16,
    batch_size=4,
    steps=4,
    warmup=1,
    log_every=2,
    probe_sequences=4,
)



def tiny_model(name: str, seed: int = 0):
    v = VARIANTS[name]
    cfg = model_config(
        v, n_layers=2, d_model=16, d_head=4, d_mlp=32, d_vocab=TASK.d_vocab, n_ctx=16, seed=seed
    )
    return build_model(v, cfg, TASK.tokenizer())


def tokens(n: int = 3, length: int = 16) -> torch.Tensor:
    return TASK.sample(n, length, torch.Generator().manual_seed(1))


def rms_norm(x: torch.Tensor, module) -> torch.Tensor:
    return x / (x.pow(2).mean(-1, keepdim=True) + module.eps).sqrt() * module.w


def test_dynamic_tanh_is_gamma_tanh_alpha_x_plus_beta():
    dyt = DynamicTanh(5, alpha=0.7)
    with torch.no_grad():
        dyt.w.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0, 1.5]))
        dyt.b.copy_(torch.tensor([0.1, 0.0, -0.3, 0.2, 1.0]))
    x = torch.randn(2, 3, 5) * 4
    expected = dyt.w * torch.tanh(0.7 * x) + dyt.b
    torch.testing.assert_close(dyt(x), expected)


def test_dyt_variant_replaces_every_norm():
    model = tiny_model("dyt")
    assert all(
        isinstance(b.ln1, DynamicTanh) and isinstance(b.ln2, DynamicTanh) for b in model.blocks
    )
    assert isinstance(model.ln_final, DynamicTanh)
    assert "blocks.0.ln1.hook_normalized" in model.hook_dict
    _, cache = model.run_with_cache(tokens())
    resid = cache["blocks.1.hook_resid_pre"]
    torch.testing.assert_close(cache["blocks.1.ln1.hook_normalized"], torch.tanh(0.5 * resid))


def test_sandwich_norm_normalizes_each_sublayer_output():
    model = tiny_model("sandwich")
    with torch.no_grad():
        model.blocks[0].ln1_post.w.copy_(torch.linspace(0.5, 2.0, 16))
    _, cache = model.run_with_cache(tokens())
    # hook_attn_out is ln1_post(attention output), the attention output being z W_O + b_O.
    attn = model.blocks[0].attn
    raw = torch.einsum("bqhd,hdm->bqm", cache["blocks.0.attn.hook_z"], attn.W_O) + attn.b_O
    expected = rms_norm(raw, model.blocks[0].ln1_post)
    torch.testing.assert_close(cache["blocks.0.hook_attn_out"], expected)
    assert "blocks.0.ln2_post.hook_scale" in model.hook_dict
    assert not hasattr(tiny_model("baseline").blocks[0], "ln1_post")


def test_post_norm_normalizes_the_residual_stream_after_each_add():
    model = tiny_model("post_norm")
    assert all(isinstance(b, PostNormBlock) for b in model.blocks)
    _, cache = model.run_with_cache(tokens())
    b = model.blocks[1]
    mid = rms_norm(cache["blocks.1.hook_resid_pre"] + cache["blocks.1.hook_attn_out"], b.ln1)
    torch.testing.assert_close(cache["blocks.1.hook_resid_mid"], mid)
    post = rms_norm(mid + cache["blocks.1.hook_mlp_out"], b.ln2)
    torch.testing.assert_close(cache["blocks.1.hook_resid_post"], post)


@pytest.mark.parametrize(
    ("name", "norm", "placement"),
    [
        ("baseline", "RMS", "pre"),
        ("sandwich", "RMS", "sandwich"),
        ("post_norm", "RMS", "post"),
        ("dyt", "DynamicTanh", "pre"),
    ],
)
def test_anatomy_sees_the_swapped_norms(name, norm, placement):
    from tl_spikesink.anatomy import Anatomy
    from tl_spikesink.interventions.norms import norm_swap

    model = tiny_model(name)
    anatomy = Anatomy.of(model)
    assert (anatomy.normalization_type, anatomy.norm_placement) == (norm, placement)
    if name in ("dyt", "post_norm"):
        # Analyses written for pre-norm RMSNorm refuse, naming what they found.
        with pytest.raises(SpikeSinkError, match=f"{norm}.*{placement}"):
            mech.representations(model, ["w5 w6 w7"])
    if name == "dyt":
        with pytest.raises(SpikeSinkError, match="DynamicTanh"):
            norm_swap("layernorm", model=model)


@pytest.mark.parametrize("name", ["gate_input", "gate_constant"])
def test_gate_multiplies_hook_z_per_head(name):
    model = tiny_model(name)
    attn = model.blocks[1].attn
    assert isinstance(attn, GatedAttention)
    with torch.no_grad():
        attn.b_gate.copy_(torch.tensor([-2.0, -0.5, 0.5, 2.0]))
    _, cache = model.run_with_cache(tokens())
    x_hat = model.blocks[1].ln1(cache["blocks.1.hook_resid_pre"])
    logits = attn.b_gate.expand(*x_hat.shape[:-1], -1)
    if name == "gate_input":
        logits = x_hat @ attn.W_gate + attn.b_gate
    gate = torch.sigmoid(logits)
    torch.testing.assert_close(cache["blocks.1.attn.hook_gate"], gate)
    ungated = torch.einsum(
        "bhqk,bkhd->bqhd", cache["blocks.1.attn.hook_pattern"], cache["blocks.1.attn.hook_v"]
    )
    torch.testing.assert_close(cache["blocks.1.attn.hook_z"], ungated * gate[..., None])
    if name == "gate_constant":  # the same gate for every token
        assert torch.allclose(gate, torch.sigmoid(attn.b_gate).expand_as(gate))


def test_head_dimension_sweep_keeps_width():
    for name, d_head in (("d_head_8", 8), ("d_head_32", 32), ("baseline", 16)):
        cfg = model_config(
            VARIANTS[name], n_layers=1, d_model=64, d_head=16, d_mlp=64, d_vocab=12, n_ctx=8, seed=0
        )
        assert (cfg.d_head, cfg.n_heads, cfg.d_model) == (d_head, 64 // d_head, 64)
    with pytest.raises(SpikeSinkError, match="divide"):
        model_config(Variant("x", d_head=24), n_layers=1, d_model=64, d_head=16, d_mlp=64,
                     d_vocab=12, n_ctx=8, seed=0)  # fmt: skip


def test_bad_variant_names_the_problem():
    with pytest.raises(SpikeSinkError, match="norm"):
        Variant("x", norm="layernorm")
    with pytest.raises(SpikeSinkError, match="unknown variant"):
        ablation_study(["nope"], seeds=1, config=TINY, task=TASK, progress=False)


def test_task_copy_rule_and_bos():
    task = BigramBackcopy(vocab_size=20, n_triggers=3, seed=5)
    x = task.sample(64, 48, torch.Generator().manual_seed(0))
    assert (x[:, 0] == 0).all() and (x[:, 1:] != 0).all()
    after_trigger = torch.isin(x[:, 1:-1], torch.tensor(task.triggers))
    n = int(after_trigger.sum())
    assert n > 50  # the rule is exercised
    assert torch.equal(x[:, 2:][after_trigger], x[:, :-2][after_trigger])
    # Elsewhere the next token follows the bigram table: never a zero-probability transition.
    free = ~after_trigger
    probs = task.transitions[x[:, 1:-1][free], x[:, 2:][free]]
    assert (probs > 0).all()
    again = task.sample(64, 48, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)
    boosted = BigramBackcopy(vocab_size=20, n_triggers=3, seed=5, trigger_rate=0.25).transitions
    torch.testing.assert_close(boosted.sum(-1), torch.ones(20))
    torch.testing.assert_close(boosted[1:, 1:4].sum(-1), torch.full((19,), 0.25))
    assert boosted[0, 1:4].sum() == 0 and (boosted[:, 0] == 0).all()
    corpus = probe_corpus(task, 4, 16, seed=0)
    assert corpus.n_tokens == 64 and all(c.tokens[0] == 0 for c in corpus.chunks)


def test_seeded_run_is_deterministic_and_history_holds_only_numbers():
    m1, run1 = train(VARIANTS["gate_input"], TINY, TASK, progress=False)
    m2, run2 = train(VARIANTS["gate_input"], TINY, TASK, progress=False)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert _without_time(run1.history) == _without_time(run2.history)
    assert [s.step for s in run1.history] == [0, 2, 4]
    for snap in run1.history:  # bounded memory: no tensor (or graph) kept per step
        assert all(isinstance(getattr(snap, f.name), (int, float)) for f in fields(Snapshot))
    assert not any(h.hook_dict[n].fwd_hooks for h in (m1,) for n in h.hook_dict)
    m3, _ = train(VARIANTS["gate_input"], replace(TINY, seed=1), TASK, progress=False)
    assert not torch.equal(m3.state_dict()["embed.W_E"], s1["embed.W_E"])


@pytest.mark.parametrize("planted_on", ["bos", "other"])
def test_first_token_profile_tells_a_bos_spike_from_an_ordinary_outlier(planted_on):
    model = tiny_model("baseline")
    probe = probe_corpus(TASK, 8, 16, seed=0)
    before = first_token_profile(model, probe)
    assert max(before.bos_spike_ratio, before.other_spike_ratio) < 30
    # The embedding of one token gets a value far above the rest in channel 3; the residual
    # stream carries it through every block (pre-norm blocks add to it, never rescale it).
    token = 0 if planted_on == "bos" else TASK.triggers[0]
    with torch.no_grad():
        model.embed.W_E[token, 3] = 1e4
    after = first_token_profile(model, probe)
    if planted_on == "bos":
        assert after.bos_spike_ratio > 1e3 and after.bos_norm_ratio > 100
        assert after.other_spike_ratio < 30
    else:
        assert after.other_spike_ratio > 1e3 and after.bos_spike_ratio < 30
        assert after.bos_norm_ratio < 5


def test_every_run_is_probed_on_the_same_batch():
    # The probe batch depends on probe_seed only, so seeds differ by their models alone.
    runs = [train(VARIANTS["baseline"], replace(TINY, steps=0, seed=s), TASK, progress=False)[1]
            for s in (0, 1)]  # fmt: skip
    model_0 = tiny_model("baseline", seed=0)
    probe = probe_corpus(TASK, TINY.probe_sequences, TINY.seq_len, seed=TINY.probe_seed)
    assert runs[0].final.bos_spike_ratio == first_token_profile(model_0, probe).bos_spike_ratio
    moved = train(VARIANTS["baseline"], replace(TINY, steps=0, probe_seed=7), TASK,
                  progress=False)[1]  # fmt: skip
    assert moved.final.loss != runs[0].final.loss


def _without_time(history) -> str:
    # As JSON text, so NaN (no training loss yet at step 0) compares equal to NaN.
    return json.dumps([{**asdict(s), "seconds": 0} for s in history])


@pytest.mark.parametrize("name", ["dyt", "post_norm", "gate_input", "sandwich"])
def test_checkpoint_round_trip(name, tmp_path):
    model, run = train(VARIANTS[name], replace(TINY, steps=2), TASK, out=tmp_path, progress=False)
    assert run.checkpoint == str(tmp_path)
    loaded = load_checkpoint(tmp_path)
    x = tokens()
    assert torch.equal(model(x), loaded(x))
    assert sorted(loaded.hook_dict) == sorted(model.hook_dict)
    assert loaded.training_run["variant"]["name"] == name
    assert json.loads((tmp_path / "meta.json").read_text())["history"][-1]["step"] == 2


def test_load_checkpoint_of_a_wrong_folder(tmp_path):
    with pytest.raises(SpikeSinkError, match="not a readable"):
        load_checkpoint(tmp_path)


def test_seed_stat():
    s = SeedStat((1.0, 2.0, math.nan, 3.0))
    assert s.mean == 2.0 and s.spread == 1.0 and s.present == (1.0, 2.0, 3.0)
    assert str(s) == "2.000 ± 1.000 (3/4)"
    assert str(SeedStat((math.nan,))) == "-"


def test_ablate_table_and_merge():
    config = replace(TINY, steps=2, n_layers=1)
    a = ablation_study(["baseline", "sandwich"], seeds=[0], config=config, task=TASK, progress=False)
    b = ablation_study(["baseline", "sandwich"], seeds=[1], config=replace(config, seed=1), task=TASK,
               progress=False)  # fmt: skip
    table = a.merge(b)
    assert isinstance(table, AblationTable)
    row = table.row("sandwich")
    assert [r.config.seed for r in row.runs] == [0, 1]
    assert row.stat("loss").values == (
        a.row("sandwich").runs[0].final.loss,
        b.row("sandwich").runs[0].final.loss,
    )
    text = str(table)
    assert "sandwich" in text and "±" in text and "spike/med" in text
    data = json.loads(table.to_json())
    assert [r["variant"]["name"] for r in data["rows"]] == ["baseline", "sandwich"]
    assert len(data["runs"]) == 4
    with pytest.raises(SpikeSinkError, match="disjoint"):
        a.merge(a)


def test_parallel_workers_give_the_serial_table(tmp_path):
    config = replace(TINY, steps=2, n_layers=1)
    kwargs = {"seeds": [0, 1], "config": config, "task": TASK, "progress": False}
    serial = ablation_study(["baseline", "dyt"], **kwargs)
    parallel = ablation_study(["baseline", "dyt"], **kwargs, workers=2, out=tmp_path)
    assert [r.name for r in parallel.rows] == ["baseline", "dyt"]
    for a, b in zip(serial.runs, parallel.runs, strict=True):
        assert (a.variant, a.config.seed) == (b.variant, b.config.seed)
        assert _without_time(a.history) == _without_time(b.history)
    assert load_checkpoint(tmp_path / "dyt" / "seed1").training_run["config"]["seed"] == 1
    with pytest.raises(SpikeSinkError, match="workers"):
        ablation_study(["baseline"], **kwargs, workers=0)


def test_plots_read_the_table():
    from tl_spikesink.views.training import plot_ablation, plot_emergence

    table = ablation_study(["baseline"], seeds=2, config=replace(TINY, steps=2, n_layers=1), task=TASK,
                   progress=False)  # fmt: skip
    fig = plot_emergence(table)
    means = [t for t in fig.data if t.name == "baseline"]
    assert [t.meta for t in means] == [
        "loss",
        "max_spike_ratio",
        "bos_spike_ratio",
        "sink_ratio",
        "max_sink_score",
    ]
    assert list(means[0].x) == [0, 2]
    assert list(means[2].y) == [
        sum(r.history[k].bos_spike_ratio for r in table.runs) / 2 for k in range(2)
    ]
    bars = plot_ablation(table)
    assert {t.name for t in bars.data} >= {"loss", "bos_spike_ratio", "sink_ratio", "loss seeds"}


def test_cli_ablate(tmp_path, capsys):
    from tl_spikesink.cli.commands import main

    out = tmp_path / "t.json"
    code = main(["ablate", "--variants", "baseline", "sandwich", "--seeds", "1", "--steps", "2",
                 "--layers", "1", "--d-model", "16", "--d-mlp", "16", "--no-progress",
                 "--json", str(out), "--out", str(tmp_path / "ck")])  # fmt: skip
    assert code == 0
    assert "baseline" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["rows"][0]["seeds"] == [0] and data["config"]["d_mlp"] == 16
    assert (tmp_path / "ck" / "sandwich" / "seed0" / "weights.pt").exists()


def test_cli_ablate_html_report(tmp_path):
    from tl_spikesink.cli.commands import main

    page = tmp_path / "ablation.html"
    args = ["--variants", "baseline", "dyt", "--seeds", "2", "--steps", "2", "--layers", "1"]
    code = main(["ablate", *args, "--d-model", "16", "--no-progress", "--html", str(page)])
    assert code == 0
    html = page.read_text()
    assert "Ablation (mean ± sd over seeds)" in html and "Emergence over training" in html
    assert html.count("<tr>") >= 3 and "dyt" in html and "BOS spike/med" in html
    assert "unpkg.com" not in html and "cdn.plot.ly/plotly" not in html  # offline page


def test_table_json_round_trip_and_cli_load(tmp_path, capsys):
    from tl_spikesink.cli.commands import main
    from tl_spikesink.training.ablation import load_table

    config = replace(TINY, steps=2, n_layers=1)
    table = ablation_study(["baseline", "dyt"], seeds=[0, 1], config=config, task=TASK, progress=False,
                   out=tmp_path / "ck")  # fmt: skip
    path = tmp_path / "t.json"
    table.to_json(path)
    loaded = load_table(path)
    assert loaded.to_json() == table.to_json() and str(loaded) == str(table)
    assert math.isnan(loaded.runs[0].history[0].train_loss)  # null in JSON, NaN again
    more = ablation_study(["baseline", "dyt"], seeds=[2], config=config, task=TASK, progress=False)
    assert [r.config.seed for r in loaded.merge(more).row("dyt").runs] == [0, 1, 2]
    assert main(["ablate", "--load", str(path), "--html", str(tmp_path / "t.html")]) == 0
    assert str(table) in capsys.readouterr().out and (tmp_path / "t.html").exists()
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SpikeSinkError, match="not an ablation table"):
        load_table(tmp_path / "bad.json")
    bare = ablation_study(["baseline"], seeds=1, config=config, task=TASK, progress=False)
    bare.to_json(tmp_path / "bare.json")
    code = main(
        ["ablate", "--load", str(tmp_path / "bare.json"), "--html", str(tmp_path / "b.html")]
    )
    assert code != 0 and not (tmp_path / "b.html").exists()


def test_functions_are_reached_from_the_package():
    import tl_spikesink as ts
    from tl_spikesink import training

    assert callable(training.train) and callable(training.ablate)
    assert ts.training.train is training.train and ts.training.ablation_study is training.ablate


def test_ablate_all_names_every_variant():
    config = replace(TINY, d_model=64, d_head=16, steps=0, n_layers=1)
    table = ablation_study("all", seeds=1, config=config, task=TASK, progress=False)
    assert [r.name for r in table.rows] == list(VARIANTS)


def test_workers_from_an_unguarded_script_fail_clearly(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(
        "import tl_spikesink as ts\n"
        "cfg = ts.training.TrainConfig(steps=1, log_every=1, d_model=16, d_mlp=16, n_layers=1, seq_len=16,"
        " batch_size=2, probe_sequences=2)\n"
        "ts.training.ablation_study(['baseline', 'dyt'], seeds=1, config=cfg, workers=2, progress=False)\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    assert "SpikeSinkError" in done.stderr and "if __name__ == '__main__'" in done.stderr
