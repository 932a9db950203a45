"""The paper's quantities on planted models, where each answer is known exactly."""

import json

import pytest
import torch
from planted import SPIKE, SPIKE_CHANNEL, VOCAB, planted_model, planted_steps, sentences

import tl_spikesink as ts
from tl_spikesink.mechanism.paper import TABLE1, TABLE2, paper_row
from tl_spikesink.mechanism.vocab import vocab_probe
from tl_spikesink.mechanism.weights import read_weights, u_frobenius, u_matrix

SPIKING = {VOCAB.index("<bos>"), VOCAB.index(".")}  # the planted trigger tokens


@pytest.fixture(scope="module")
def scan(planted, texts):
    return ts.scan(planted, texts, progress=False)


def test_frobenius_closed_form_equals_the_matrix(planted):
    norms = u_frobenius(planted)
    for layer, channel in ((1, SPIKE_CHANNEL), (2, SPIKE_CHANNEL), (1, 3)):
        full = u_matrix(planted, layer, channel).norm()
        assert float(norms[layer, channel]) == pytest.approx(float(full), rel=1e-4, abs=1e-6)


def test_weights_find_the_planted_step_up_and_step_down(planted, scan):
    w = read_weights(planted, scan)
    assert w.step_up == (1,) and w.step_down == (2,)
    assert w.channels == (SPIKE_CHANNEL,)
    assert w.agrees_step_up and w.agrees_step_down


def test_vocabulary_probe_counts_exactly_the_trigger_tokens(planted, scan):
    v = vocab_probe(planted, scan, progress=False)
    assert v.n_items == len(VOCAB)
    assert set(v.spike_position0.nonzero()[:, 0].tolist()) == SPIKING
    assert v.count_position0 == 2 and v.share_position0 == pytest.approx(2 / len(VOCAB))
    assert set(v.exceptions) == set(range(len(VOCAB))) - SPIKING
    json.loads(json.dumps(v.to_dict(), allow_nan=False))


def test_paper_row_holds_the_issue_keys_and_the_published_rows(planted, texts, scan):
    row = paper_row(planted, texts, scan=scan, progress=False)
    d = json.loads(row.to_json())
    assert d["table1"]["step_up"] == [4] and d["table1"]["step_down"] == [6]  # MLP of layers 1, 2
    assert d["table1"]["from_weights"] == {
        "step_up": [4],
        "step_down": [6],
        "channels": [SPIKE_CHANNEL],
        "reason": "",
    }
    assert d["table2"]["vocab"] == len(VOCAB) and d["table2"]["spike_tokens_position0"] == 2
    assert d["spike"] == pytest.approx(SPIKE, rel=1e-3)
    assert d["sink_ratio"] == pytest.approx(scan.sinks.sink_ratio)
    assert d["first_token_sink_ratio"] == pytest.approx(1 / 6)  # one sink head of six
    assert {r["verdict"] for r in d["claims"]} <= {"holds", "does not hold", "not applicable"}
    assert len(d["paper"]["table1"]) == len(TABLE1) and len(d["paper"]["table2"]) == len(TABLE2)
    text = str(row)
    assert "Llama-2-7B" in text and "planted (ours)" in text and len(repr(row)) <= 2048


def test_gradual_spike_makes_the_vocabulary_probe_not_applicable(texts):
    model = planted_steps([40.0] * 6)
    row = paper_row(model, texts, claims=False, progress=False)
    assert row.vocab is None and "no step-up block" in row.vocab_reason
    assert row.step_up == ()
    assert json.loads(row.to_json())["table2"]["vocab"] is None


def test_paper_command(planted, tmp_path, monkeypatch, capsys):
    from tl_spikesink.cli import commands as cli
    from tl_spikesink.cli import options

    monkeypatch.setattr(options, "load_model", lambda args: planted)
    text_file = tmp_path / "texts.txt"
    text_file.write_text("\n".join(sentences(8)))
    out = tmp_path / "paper.json"
    argv = ["paper", "--text-file", str(text_file), "--json", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    assert "beside Sun et al." in capsys.readouterr().out
    assert json.loads(out.read_text())["table1"]["step_up"] == [4]


def test_the_model_is_left_as_found(texts):
    model = planted_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    paper_row(model, texts, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not [n for n, h in model.hook_dict.items() if h.fwd_hooks]


def test_the_paper_page_is_offline_and_holds_our_rows(planted, texts, scan, tmp_path):
    from tl_spikesink.views.paper import write_paper_html

    row = paper_row(planted, texts, scan=scan, progress=False)
    page = write_paper_html(row, tmp_path / "paper.html").read_text()
    assert "planted (ours)" in page and "Llama-2-7B" in page and "Qwen3-8B" in page
    assert page.count("<tr") >= len(TABLE1) + len(TABLE2) + len(row.claims.rows)
    assert "Eq. 22" in page and "not applicable" in page  # the first-token and window rows
    assert "http" not in page and "<script" not in page  # opens offline, requests nothing
    assert row._repr_html_() == page
