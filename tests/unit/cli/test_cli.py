"""The command line, run in-process on the planted model."""

import json
import warnings

import pytest
from planted import SPIKE_CHANNEL, sentences

from tl_spikesink.cli import commands as cli
from tl_spikesink.cli import options


@pytest.fixture
def use_planted(planted, monkeypatch):
    monkeypatch.setattr(options, "load_model", lambda args: planted)


def test_scan_prints_summary_and_writes_the_documented_json(use_planted, tmp_path, capsys):
    text_file = tmp_path / "texts.txt"
    text_file.write_text("\n".join(sentences(6)) + "\n\n")
    out = tmp_path / "scan.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code = cli.main(
            [
                "scan",
                "--text-file",
                str(text_file),
                "--batch-size",
                "2",
                "--json",
                str(out),
                "--no-progress",
            ]
        )
    assert code == 0
    printed = capsys.readouterr().out
    assert "spike channels   7" in printed and "L0H0" in printed
    report = json.loads(out.read_text())
    for key in (
        "model",
        "prepend_bos",
        "n_layers",
        "n_heads",
        "n_tokens",
        "layers",
        "spikes",
        "sinks",
    ):
        assert key in report
    assert report["model"] == "planted" and report["prepend_bos"] is True
    assert len(report["layers"]) == report["n_layers"] == 3
    for row in report["layers"]:
        top = row["resid_post_top"]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        assert row["resid_post_median"] > 0
    spikes = report["spikes"]
    assert spikes["channels"] == [SPIKE_CHANNEL]
    assert spikes["step_up_layers"] == [1] and spikes["step_down_layers"] == [2]
    assert {"text_index", "position", "token"} <= set(spikes["tokens"][0])
    assert len({t["text_index"] for t in spikes["tokens"]}) == 6
    sinks = report["sinks"]
    assert sinks["epsilon"] == 0.3 and sinks["sink_heads"] == [[0, 0]]
    assert len(sinks["scores"]) == 3 and len(sinks["scores"][0]) == 2
    assert sinks["sink_ratio"] == pytest.approx(1 / 6)
    assert (
        report["corpus"][0]["name"] == str(text_file) and len(report["corpus"][0]["sha256"]) == 64
    )


def test_bad_text_file_is_a_clean_error(use_planted, tmp_path, capsys):
    code = cli.main(["scan", "--text-file", str(tmp_path / "nope.txt"), "--no-progress"])
    assert code == 2
    assert "cannot read text file" in capsys.readouterr().err


def test_unknown_model_name_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["scan", "--model", "no-such-model"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_claims_command_prints_and_writes_the_table(use_planted, tmp_path, capsys):
    text_file = tmp_path / "texts.txt"
    text_file.write_text("\n".join(sentences(8)))
    out = tmp_path / "claims.json"
    code = cli.main(["claims", "--text-file", str(text_file), "--json", str(out), "--no-progress"])
    assert code == 0
    assert "claims for planted" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    quadratic = [r for r in rows if r["link"] == "quadratic"]
    assert quadratic and all(r["verdict"] == "holds" for r in quadratic)
