"""A paper row as one offline HTML page: the model's rows under the paper's, verdicts coloured.

Plain HTML and CSS, no script and no network request, so the page opens anywhere and prints.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

VERDICT_COLOURS = {"holds": "#d8f0d8", "does not hold": "#f6d5d5", "not applicable": "#eeeeee"}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
tr.ours td { font-weight: 600; background: #eef4ff; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #555; font-size: 0.9em; }
"""


def _table(head: list[str], rows: list[list[Any]], ours_last: bool = True) -> str:
    def cell(x: Any) -> str:
        if isinstance(x, list):
            text = ", ".join(map(str, x)) or "none"
        else:
            text = "—" if x is None else str(x)
        cls = ' class="num"' if isinstance(x, int | float) else ""
        return f"<td{cls}>{html.escape(text)}</td>"

    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for i, row in enumerate(rows):
        cls = ' class="ours"' if ours_last and i == len(rows) - 1 else ""
        out.append(f"<tr{cls}>" + "".join(cell(x) for x in row) + "</tr>")
    return "\n".join([*out, "</table>"])


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f} %"


def paper_html(row: Any) -> str:
    """The page for a :class:`~tl_spikesink.mechanism.paper.PaperRow`, as a string."""
    d = row.to_dict()
    paper, t1, t2 = d["paper"], d["table1"], d["table2"]
    fw = t1["from_weights"]
    name = html.escape(d["model"])
    table1 = _table(
        ["Table 1", "blocks", "step-up", "step-down", "step-up (weights)", "step-down (weights)"],
        [[r["model"], r["blocks"], r["step_up"], r["step_down"], None, None]
         for r in paper["table1"]]
        + [[f"{d['model']} (ours)", d["n_blocks"], t1["step_up"], t1["step_down"],
            fw["step_up"], fw["step_down"]]],
    )  # fmt: skip
    table2 = _table(
        ["Table 2", "vocab", "spike tokens at position 0", "share"],
        [[r["model"], r["vocab"], r["spike_tokens_position0"],
          _pct(r["spike_tokens_position0"] / r["vocab"])] for r in paper["table2"]]
        + [[f"{d['model']} (ours)", t2["vocab"], t2["spike_tokens_position0"],
            _pct(t2["share_position0"])]],
    )  # fmt: skip
    base = paper["baseline"]
    scalars = _table(
        ["quantity", "ours", "paper's 7B baseline", "definition"],
        [
            ["sink ratio", _pct(d["sink_ratio"]), _pct(base["sink_ratio"]),
             "Eq. 27–28: T = min(n, 64), max over the first half of keys of α_k > 0.3, "
             "share of heads, mean over sequences"],
            ["first-token sink ratio", _pct(d["first_token_sink_ratio"]), None,
             "share of heads whose corpus-pooled first-token score exceeds 0.3 (Gu et al.)"],
            ["Spike", f"{d['spike']:.4g}", f"{base['spike']:.4g}",
             "largest |x| at resid_post in the spike channels over layers"],
        ],
        ours_last=False,
    )  # fmt: skip
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{name} beside the paper"
        f"</title><style>{STYLE}</style></head><body>",
        f"<h1>{name} beside Sun et al. (2026)</h1>",
        "<p class='note'>Blocks in the paper's numbering: 2L blocks, attention odd, FFN even, "
        "1-indexed (TransformerLens layer ℓ holds blocks 2ℓ+1 and 2ℓ+2).</p>",
        table1,
    ]
    if fw.get("reason"):
        parts.append(f"<p class='note'>From weights: {html.escape(fw['reason'])}</p>")
    parts.append(table2)
    if t2.get("reason"):
        parts.append(f"<p class='note'>Vocabulary probe: {html.escape(t2['reason'])}</p>")
    elif t2.get("share_position1") is not None:
        parts.append(
            f"<p class='note'>At position 1 after {html.escape(repr(t2['first_token']))}: "
            f"{t2['spike_tokens_position1']:,} ({_pct(t2['share_position1'])}).</p>"
        )
    parts.append(scalars)
    if d["claims"]:
        head = ("link", "claim", "measured", "threshold", "verdict", "reason")
        parts.append("<h2>Mechanism claims</h2><table><tr>"
                     + "".join(f"<th>{h}</th>" for h in head) + "</tr>")  # fmt: skip
        for c in d["claims"]:
            colour = VERDICT_COLOURS.get(c["verdict"], "#fff")
            measured = "—" if c["measured"] is None else f"{c['measured']:.4g}"
            parts.append(
                "<tr>" + "".join(
                    f"<td>{html.escape(str(x))}</td>"
                    for x in (c["link"], c["claim"], measured, c["threshold"])
                ) + f"<td style='background:{colour}'>{html.escape(c['verdict'])}</td>"
                f"<td class='note'>{html.escape(c['reason'] or '')}</td></tr>"
            )  # fmt: skip
        parts.append("</table>")
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in d["seconds"].items())
    corpus = "; ".join(
        f"{c.get('name', 'corpus')}: {c.get('n_tokens', '?')} tokens, "
        f"sha256 {str(c.get('sha256', '?'))[:16]}" for c in d["corpus"]
    )  # fmt: skip
    parts.append(f"<p class='note'>Corpus: {html.escape(corpus)}. Time: {seconds}.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_paper_html(row: Any, path: str | Path) -> Path:
    """Write :func:`paper_html` of `row` to `path`; returns the path."""
    path = Path(path)
    path.write_text(paper_html(row), encoding="utf-8")
    return path


__all__ = ["paper_html", "write_paper_html"]
