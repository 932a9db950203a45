"""The neighbours' subcommands (detect, kurtosis, quantize, valleys, bos) on planted models."""

import json

import pytest
from planted import SINK_HEAD, SPIKE_CHANNEL, planted_model, sentences
from plotly.offline import get_plotlyjs

from tl_spikesink.cli import commands as cli
from tl_spikesink.cli import options


@pytest.fixture
def use_planted(planted, monkeypatch):
    monkeypatch.setattr(options, "load_model", lambda args: planted)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(sentences(8)) + "\n")
    return str(path)


def _run(capsys, *argv: str) -> str:
    code = cli.main([*argv, "--no-progress"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def _offline_page(path) -> str:
    page = path.read_text()
    assert "Plotly.newPlot(" in page and get_plotlyjs()[:300] in page  # plotly.js embedded
    assert "<script src=" not in page
    return page


def test_detect_compares_the_three_rules(use_planted, text_file, tmp_path, capsys):
    out = tmp_path / "detect.json"
    printed = _run(capsys, "detect", "--text-file", text_file, "--min-layers", "1",
                   "--json", str(out))  # fmt: skip
    assert "persistent" in printed and "agree w/ sun" in printed
    d = json.loads(out.read_text())
    assert [x["rule"] for x in d["detections"]] == ["sun", "mad", "persistent"]
    for x in d["detections"]:  # the planted spike, at resid_post of block 1 only
        assert x["layer_channels"] == [[1, SPIKE_CHANNEL]]


def test_kurtosis_prints_both_curves_and_writes_an_offline_figure(
    use_planted, text_file, tmp_path, capsys
):
    out, page = tmp_path / "kurtosis.json", tmp_path / "kurtosis.html"
    printed = _run(capsys, "kurtosis", "--text-file", text_file, "--json", str(out),
                   "--html", str(page))  # fmt: skip
    assert "without spike tokens" in printed
    d = json.loads(out.read_text())
    k, k_without = d["per_layer"], d["per_layer_without_spikes"]
    assert len(k) == 3 and max(range(3), key=k.__getitem__) == 1  # the spike's layer
    assert k_without[1] < 0.5 * k[1]  # most of layer 1's kurtosis is the spike tokens'
    assert "Excess kurtosis" in _offline_page(page)


def test_quantize_passes_its_settings_to_the_library(planted, use_planted, text_file, tmp_path,
                                                     capsys):
    from tl_spikesink.corpus import read_text_file
    from tl_spikesink.evaluation.quantization import quantization

    out = tmp_path / "quantize.json"
    printed = _run(capsys, "quantize", "--text-file", text_file, "--bits", "4", "--granularity",
                   "tensor", "--keep", "none", "spike", "--sites", "resid", "--weight-bits",
                   "--json", str(out))  # fmt: skip
    assert "A INT4 per-tensor, spike kept" in printed
    rows = json.loads(out.read_text())["rows"]
    assert [r["setting"] for r in rows] == ["A INT4 per-tensor", "A INT4 per-tensor, spike kept"]
    direct = quantization(planted, read_text_file(text_file), bits=(4,), granularities=("tensor",),
                          keeps=("none", "spike"), sites=("resid",), weight_bits=(),
                          progress=False)  # fmt: skip
    assert rows == json.loads(direct.to_json())["rows"]
    assert rows[1]["error"]["spike"] == 0.0  # kept exact


def test_valleys_find_the_spike_layer_and_write_the_figure(
    use_planted, text_file, tmp_path, capsys
):
    out, page = tmp_path / "valleys.json", tmp_path / "valleys.html"
    _run(capsys, "valleys", "--text-file", text_file, "--ablations", "zero", "--logit-lens",
         "none", "--json", str(out), "--html", str(page))  # fmt: skip
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"clean", "zero"}
    assert runs["clean"]["valley_layer"] == 1
    assert runs["zero"]["depth"] < 0.5 * runs["clean"]["depth"]
    _offline_page(page)


def test_bos_audit_table(monkeypatch, text_file, tmp_path, capsys):
    monkeypatch.setattr(options, "load_model", lambda args: planted_model())
    out = tmp_path / "bos.json"
    printed = _run(capsys, "bos", "--text-file", text_file, "--texts", "6", "--delimiter", ".",
                   "--json", str(out))  # fmt: skip
    assert "packed" in printed
    rows = {r["condition"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["with_bos"]["sink_heads"] == [list(SINK_HEAD)]
    assert rows["no_bos"]["lost"] == [list(SINK_HEAD)]


def test_bos_refuses_no_texts(use_planted, capsys):
    assert cli.main(["bos", "--texts", "0", "--no-progress"]) == 2
    assert "--texts must be at least 1" in capsys.readouterr().err
