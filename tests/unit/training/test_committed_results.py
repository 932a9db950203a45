"""The committed ablation results agree with what the command would write from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tl_spikesink.training.ablation import load_table
from tl_spikesink.training.tables import compare

RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results"


TABLES = ("ablation", "ablation_dh4")
"""The committed tables: under the first baseline (``lr4e-2_wd0.3``, d_head 16) and under the
recipe that passes both bars (``lr4e-2_wd0.5_dh4``); each NAME.json with NAME_summary.json."""


@pytest.mark.parametrize("name", TABLES)
def test_committed_summary_is_the_comparison_of_the_committed_table(name):
    table = load_table(RESULTS / f"{name}.json")
    summary = json.loads((RESULTS / f"{name}_summary.json").read_text())
    assert json.loads(compare(table).to_json()) == summary
    # Every run of the table is a paper row's own variant, full length, seeded as recorded.
    assert summary["skipped"] == []
    assert all(run.variant.context == "long" for run in table.runs)


def test_readme_quotes_the_committed_numbers():
    readme = (RESULTS.parents[1] / "README.md").read_text()
    summary = json.loads((RESULTS / "ablation_summary.json").read_text())
    for row in summary["rows"]:  # the README shows each row's mean over its seeds
        ppl = f"{sum(row['perplexity']) / len(row['perplexity']):.1f}"
        assert f"| {ppl} |" in readme, (row["variant"], ppl)
        peak = f"{sum(row['peak_sink_ratio']) / len(row['peak_sink_ratio']):.3f}"
        assert f"| {peak} |" in readme, (row["variant"], peak)
    n = len(summary["rows"]) - 1  # the baseline is no comparison
    agreeing = round(summary["agreement"]["spike"] * n)
    assert f"in {agreeing} of {n} rows" in readme
    # Each row's verdicts, with how many of its seeds move as the mean does.
    from tl_spikesink.views.paper_table import to_markdown

    comparison = compare(load_table(RESULTS / "ablation.json"))
    for r in comparison.rows[1:]:
        marks = r.marks(" / ")
        assert f"| {marks['sink_ratio']} | {marks['spike']} |" in readme, r.row.name
    said = to_markdown(comparison).splitlines()
    assert next(x for x in said if x.startswith("The Spike moves")) in readme


def test_readme_shows_the_second_table_as_the_command_writes_it():
    from tl_spikesink.views.paper_table import to_markdown

    readme = (RESULTS.parents[1] / "README.md").read_text()
    markdown = to_markdown(compare(load_table(RESULTS / "ablation_dh4.json")))
    for line in markdown.splitlines():
        assert line in readme, line


@pytest.mark.parametrize("name", TABLES)
def test_the_readme_table_command_parses_to_the_committed_settings(name):
    import re
    import shlex

    from tl_spikesink.cli.commands import build_parser

    readme = (RESULTS.parents[1] / "README.md").read_text()
    blocks = re.findall(r"^tl-spikesink ablate --variants paper .*?(?=\n```)", readme, re.M | re.S)
    parsed = [build_parser().parse_args(shlex.split(b.replace("\\\n", " "))[1:]) for b in blocks]
    args = next(a for a in parsed if a.json == f"benchmarks/results/{name}.json")
    table = load_table(RESULTS / f"{name}.json")
    c = table.config
    assert (args.layers, args.d_model, args.d_head, args.d_mlp) == (
        c.n_layers, c.d_model, c.d_head, c.d_mlp)  # fmt: skip
    assert (args.seq_len, args.batch_size, args.steps, args.lr, args.warmup) == (
        c.seq_len, c.batch_size, c.steps, c.lr, c.warmup)  # fmt: skip
    assert args.weight_decay == c.weight_decay
    assert (args.source, args.vocab) == (table.task["source"], table.task["vocab_size"])


def test_readme_quotes_the_committed_recipe_search():
    readme = (RESULTS.parents[1] / "README.md").read_text()
    rows = json.loads((RESULTS / "recipe_search.json").read_text())["rows"]
    assert rows
    for r in rows:
        line = next(
            (x for x in readme.splitlines() if x.startswith(f"| `{r['name']}` |") and
             f"| {r['seed']} |" in x),
            None,
        )  # fmt: skip
        assert line is not None, (r["name"], r["seed"])
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[3:7] == [
            f"{r['perplexity']:.1f}",
            f"{r['sink_ratio']:.3f}",
            f"{r['first_token_spike_ratio']:.0f}",
            f"{r['max_first_token_score']:.2f}",
        ], r["name"]
