"""The committed ablation results agree with what the command would write from them."""

from __future__ import annotations

import json
from pathlib import Path

from tl_spikesink.training.ablation import load_table
from tl_spikesink.training.tables import compare

RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results"


def test_committed_summary_is_the_comparison_of_the_committed_table():
    table = load_table(RESULTS / "ablation.json")
    summary = json.loads((RESULTS / "ablation_summary.json").read_text())
    assert json.loads(compare(table).to_json()) == summary
    # Every run of the table is a paper row's own variant, full length, seeded as recorded.
    assert summary["skipped"] == []
    assert all(run.variant.context == "long" for run in table.runs)


def test_readme_quotes_the_committed_numbers():
    readme = (RESULTS.parents[1] / "README.md").read_text()
    summary = json.loads((RESULTS / "ablation_summary.json").read_text())
    for row in summary["rows"]:
        ppl = f"{row['perplexity'][0]:.1f}"
        assert f"| {ppl} |" in readme, (row["variant"], ppl)
    n = len(summary["rows"]) - 1  # the baseline is no comparison
    agreeing = round(summary["agreement"]["spike"] * n)
    assert f"in {agreeing} of {n} rows" in readme
