"""What a newcomer meets first: bad input refused by name, progress on long calls, labelled
summaries, outputs checked before any work, and a README whose commands and snippets are whole."""

import importlib.util
import math
import re
from pathlib import Path

import pytest
import tqdm as tqdm_package

import tl_spikesink as ts
from tl_spikesink.cli import commands

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


# ---------------------------------------------------------------- settings and texts


@pytest.mark.parametrize(
    "setting, match",
    [
        ({"abs_threshold": -1.0}, "abs_threshold must be at least 0"),
        ({"abs_threshold": math.nan}, "abs_threshold must be finite"),
        ({"rel_threshold": math.inf}, "rel_threshold must be finite"),
        ({"rel_threshold": 0.5}, "rel_threshold must be at least 1"),
        ({"epsilon": math.nan}, "epsilon must be finite"),
        ({"epsilon": 1.5}, r"epsilon must lie in \(0, 1\)"),
        ({"sink_token_share": 1.5}, r"sink_token_share .* \(0, 1\]"),
        ({"long_texts": "bogus"}, "long_texts must be one of"),
        ({"padding_side": "middle"}, "padding_side must be one of"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"batch_size": 2.5}, "batch_size must be an integer"),
        ({"batch_size": True}, "batch_size must be an integer"),
        ({"max_tokens": -5}, "max_tokens must be at least 1"),
        ({"prepend_bos": "yes"}, "prepend_bos must be True or False"),
        ({"spike_sites": ("mlp_out",)}, "must include 'resid_post'"),
    ],
)
def test_every_bad_setting_is_refused_by_name(setting, match):
    with pytest.raises(ts.SpikeSinkError, match=match):
        ts.ScanConfig(**setting)


def test_scan_refuses_a_bad_setting_before_reading(planted, texts):
    with pytest.raises(ts.SpikeSinkError, match="padding_side must be one of"):
        ts.scan(planted, texts, padding_side="middle", progress=False)


@pytest.mark.parametrize(
    "texts, match",
    [
        ({"a": "The cat sat on the mat.", "b": "Hello world."}, "texts is a dict"),
        ({"The cat sat on the mat.", "Hello world."}, "texts is a set"),
        (["ok", 3], "text 1 is a int, not a string"),
        (["ok", None], "text 1 is a NoneType"),
        (["ok", "  "], "text 1 is empty"),
    ],
)
def test_texts_must_be_a_list_of_strings(planted, texts, match):
    with pytest.raises(ts.SpikeSinkError, match=match):
        ts.tokenize(planted, texts)


def test_tokenize_checks_its_own_settings(planted, texts):
    with pytest.raises(ts.SpikeSinkError, match="long_texts must be one of"):
        ts.tokenize(planted, texts, long_texts="bogus")
    with pytest.raises(ts.SpikeSinkError, match="max_tokens must be an integer"):
        ts.tokenize(planted, texts, max_tokens=math.nan)
    corpus = ts.tokenize(planted, texts)
    with pytest.raises(ts.SpikeSinkError, match="padding_side must be one of"):
        next(corpus.batches(4, "middle"))


def test_evaluation_with_nothing_to_score_is_refused(planted, texts):
    one_token = ["a", "b"]
    config = ts.ScanConfig(prepend_bos=False)
    corpus = ts.tokenize(planted, one_token, prepend_bos=False)
    assert all(len(c.tokens) == 1 for c in corpus.chunks)
    with pytest.raises(ts.SpikeSinkError, match="nothing to score"):
        ts.evaluate(planted, one_token, config=config, progress=False)


# ---------------------------------------------------------------- progress


class _Spy(tqdm_package.tqdm):
    shown: list = []

    def __init__(self, *args, **kwargs):
        if not kwargs.get("disable"):
            _Spy.shown.append(kwargs.get("desc"))
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


@pytest.fixture
def bars(monkeypatch):
    import tqdm.auto

    import tl_spikesink.probes.engine as engine

    monkeypatch.setattr(engine, "tqdm", _Spy)
    monkeypatch.setattr(tqdm.auto, "tqdm", _Spy)
    _Spy.shown = []
    return _Spy.shown


LONG_CALLS = {
    "scan": lambda m, t, r: ts.scan(m, t),
    "evaluate": lambda m, t, r: ts.evaluate(m, t, ts.spike_ablation(r, mode="zero")),
    "spike_ablation": lambda m, t, r: ts.spike_ablation(r, mode="mean", calibration=t, model=m),
    "norm_swap": lambda m, t, r: ts.norm_swap("dyt", calibration=t, scan=r, model=m),
    "claims": lambda m, t, r: ts.claims(m, t, r),
    "paper_row": lambda m, t, r: ts.paper_row(m, t, vocab=True, claims=False),
    "streaming": lambda m, t, r: ts.streaming(m, t, windows=(8,), sinks=(0, 2), seq_len=32),
    "super_weights": lambda m, t, r: ts.super_weights(m, t, r, threshold=5.0),  # 1 candidate
    "quantization": lambda m, t, r: ts.evaluation.quantization(
        m, t, r, bits=(8,), keeps=("none",), weight_bits=()
    ),
    "valleys": lambda m, t, r: ts.mechanism.compression_valleys(m, t, r, logit_lens="none"),
    "bos_audit": lambda m, t, r: ts.evaluation.bos_audit(m, t, delimiter="."),
}


@pytest.fixture(scope="module")
def small(planted, texts):
    few = texts[:6]
    return few, ts.scan(planted, few, progress=False)


@pytest.mark.parametrize("name", sorted(LONG_CALLS))
def test_every_long_call_shows_a_progress_bar(name, planted, small, bars):
    few, scan = small
    LONG_CALLS[name](planted, few, scan)
    assert bars, f"{name} ran without a progress bar"


def test_experiment_names_each_stage_and_row(planted, texts, bars):
    ts.experiment(planted, texts[:4], calibration=texts[20:24])
    stages = " | ".join(map(str, bars))
    for part in ("calibrate: spike means", "calibrate: norm scales", "zero spikes", "norm: dyt"):
        assert part in stages, stages


def test_progress_false_shows_none(planted, small, bars):
    few, scan = small
    ts.claims(planted, few, scan, progress=False)
    ts.super_weights(planted, few, scan, progress=False)
    assert not bars


# ---------------------------------------------------------------- labelled summaries


def test_every_count_of_the_summary_is_labelled(planted, small):
    from tl_spikesink.views.html import render_html

    _, scan = small
    text = str(scan)
    assert re.search(r"step-up blocks   layer \d+ \w+ = paper block \d+ \(created \d+ token", text)
    assert "events" not in text
    assert text.count("a first token that is a delimiter counts in both") == 2
    page = render_html(scan)
    assert not re.search(r"\((mlp|attn), \d+\)", page), "unlabelled step-up/down counts"
    assert "first-token sink ratio" in page and "sink ratio (Eq. 28)" in page


# ---------------------------------------------------------------- outputs checked first


def _never_run(monkeypatch):
    real = commands.build_parser

    def guarded():
        parser = real()
        parse = parser.parse_args

        def parse_args(argv=None):
            args = parse(argv)
            args.run = lambda _: pytest.fail("the command ran before its outputs were checked")
            return args

        parser.parse_args = parse_args
        return parser

    monkeypatch.setattr(commands, "build_parser", guarded)


JSON_COMMANDS = ["scan", "claims", "intervene", "paper", "detect", "kurtosis", "streaming",
                 "superweights", "quantize", "valleys", "bos", "ablate"]  # fmt: skip


@pytest.mark.parametrize("command", JSON_COMMANDS)
def test_json_into_a_missing_folder_fails_before_any_work(command, tmp_path, monkeypatch, capsys):
    _never_run(monkeypatch)
    assert commands.main([command, "--json", str(tmp_path / "missing" / "out.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_outputs_into_a_read_only_folder_or_onto_a_folder_fail_first(tmp_path, monkeypatch, capsys):
    import os

    _never_run(monkeypatch)
    assert commands.main(["report", "--html", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a read-only mount answers
    assert commands.main(["scan", "--json", str(tmp_path / "out.json")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_write_html_checks_the_folder_before_rendering(small, tmp_path, monkeypatch):
    from tl_spikesink.views import html

    _, scan = small
    monkeypatch.setattr(html, "render_html", lambda *a, **k: pytest.fail("rendered first"))
    with pytest.raises(ts.SpikeSinkError, match="does not exist"):
        html.write_html(scan, tmp_path / "missing" / "report.html")


# ---------------------------------------------------------------- the README


def test_readme_lists_every_subcommand():
    parser = commands.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    listed = set(re.findall(r"^tl-spikesink (\w+)", README, re.M))
    assert set(sub.choices) <= listed, set(sub.choices) - listed


def test_readme_documents_the_unit_run_the_slow_tests_and_plot_renderers():
    assert 'python -m pytest -q -m "not integration"' in README
    assert "--durations=15" in README
    assert "pio.renderers.default" in README
    assert "progress=False" in README and "stderr" in README


def test_the_readme_test_runs_every_python_block_in_one_namespace():
    spec = importlib.util.spec_from_file_location(
        "readme_test", ROOT / "tests" / "integration" / "test_readme.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    blocks = module.python_blocks()
    assert len(blocks) == README.count("```python") >= 5
    for i, code in enumerate(blocks, start=1):
        compile(code, f"README.md python block {i}", "exec")
    # Names a later block uses were bound by an earlier one (not pasted from nowhere).
    assert "texts =" in blocks[1] and "model = ts.load" in blocks[0]


def test_every_result_with_a_table_keeps_the_result_contract():
    import inspect
    import pkgutil

    from tl_spikesink.results import Result

    loose = []
    for info in pkgutil.walk_packages(ts.__path__, "tl_spikesink."):
        if info.name.startswith(("tl_spikesink.cli", "tl_spikesink.__main__")):
            continue
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and "__str__" in cls.__dict__:
                if not issubclass(cls, Result) and name != "SeedStat":  # a cell, "mean ± sd"
                    loose.append(f"{info.name}.{name}")
    assert not loose, f"results without a short repr and an HTML table: {loose}"


# ---------------------------------------------------------------- a tiny run of each README line


@pytest.mark.parametrize(
    "argv",
    [
        ["streaming", "--window", "8", "--sinks", "0", "2", "--seq-len", "32"],
        ["superweights", "--no-eval"],  # no candidate on the planted model: an empty table
        ["superweights", "--scales", "0"],
    ],
)
def test_commands_without_another_tiny_run(argv, planted, tmp_path, monkeypatch, capsys):
    """The other subcommands' tiny runs live beside their modules' tests; with bars shown, the
    summary alone is on stdout and the bars on stderr."""
    from planted import sentences

    from tl_spikesink.cli import options
    from tl_spikesink.corpus import read_text_file

    monkeypatch.setattr(options, "load_model", lambda args: planted)
    text_file = tmp_path / "texts.txt"
    text_file.write_text("\n".join(sentences(8)) + "\n")
    assert len(read_text_file(str(text_file))) == 8
    out = tmp_path / "out.json"
    code = commands.main([*argv, "--text-file", str(text_file), "--json", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert out.is_file() and printed.out.strip()
    assert "%|" not in printed.out and "wrote" not in printed.out


def test_every_built_in_model_says_what_it_is_in_the_registry_and_the_readme():
    from tl_spikesink.models.registry import ENCODERS, MODELS

    for name, spec in {**MODELS, **ENCODERS}.items():
        assert re.search(r"\d+ MB download", spec.about), (name, spec.about)
        row = next((r for r in README.splitlines() if r.startswith(f"| `{name}`")), None)
        assert row and re.search(r"\d+ MB \| [\d.]+ [GM]B \|$", row), (name, row)
    assert "Coder" in MODELS["qwen2.5-0.5b"].about and "Instruct" in MODELS["smollm2-135m"].about
