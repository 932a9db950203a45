"""Plotly views of training runs: emergence curves, the ablation table, the paper's beside it.

Pure views: they read :class:`TrainingRun` histories and :class:`AblationTable` rows, never a
model, and return figures without showing them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from tl_spikesink.training.ablation import COLUMNS, HEADER, AblationTable
from tl_spikesink.training.runs import TrainingRun
from tl_spikesink.training.tables import PAPER_BASELINE, PaperComparison, same_bar, seed_mean

_TEMPLATE = "plotly_white"
_PANELS = (
    ("loss", "probe loss (nats)", "linear"),
    ("max_spike_ratio", "max |x| / median |x|", "log"),
    ("bos_spike_ratio", "first token: max |x| / median |x|", "log"),
    ("sink_ratio", "sink ratio", "linear"),
    ("max_sink_score", "largest BOS sink score", "linear"),
)


def plot_emergence(runs: AblationTable | Sequence[TrainingRun]) -> go.Figure:
    """Loss, spike ratio, sink ratio and top sink score against training step.

    One trace per variant: the mean over its seeds at each logged step, with each seed's curve
    drawn faintly behind it.

    Args:
        runs: training runs, or an ablation table (all its runs).

    Returns:
        A figure with four panels; the mean traces are named after the variants.
    """
    runs = runs.runs if isinstance(runs, AblationTable) else tuple(runs)
    by_variant: dict[str, list[TrainingRun]] = {}
    for run in runs:
        by_variant.setdefault(run.variant.name, []).append(run)
    fig = make_subplots(rows=1, cols=len(_PANELS), subplot_titles=[t for _, t, _ in _PANELS])
    colors = qualitative.Plotly
    for i, (name, group) in enumerate(by_variant.items()):
        color = colors[i % len(colors)]
        steps = [s.step for s in group[0].history]
        for col, (field, _, _) in enumerate(_PANELS, start=1):
            for run in group:
                fig.add_trace(
                    go.Scatter(
                        x=[s.step for s in run.history],
                        y=[getattr(s, field) for s in run.history],
                        mode="lines",
                        line={"color": color, "width": 0.5},
                        opacity=0.35,
                        showlegend=False,
                        hoverinfo="skip",
                        meta=f"seed {run.config.seed}",
                    ),
                    row=1,
                    col=col,
                )
            fig.add_trace(
                go.Scatter(
                    x=steps,
                    y=[_mean(group, k, field) for k in range(len(steps))],
                    mode="lines+markers",
                    name=name,
                    legendgroup=name,
                    showlegend=col == 1,
                    line={"color": color, "width": 2},
                    meta=field,
                ),
                row=1,
                col=col,
            )
    for col, (_, _, scale) in enumerate(_PANELS, start=1):
        fig.update_xaxes(title_text="step", row=1, col=col)
        fig.update_yaxes(type=scale, row=1, col=col)
    fig.update_layout(template=_TEMPLATE, title="Emergence over training", height=380)
    return fig


def plot_ablation(table: AblationTable) -> go.Figure:
    """The ablation table as bars: one panel per column, mean ± sd over seeds, seeds as dots.

    Args:
        table: an ablation table.

    Returns:
        A figure with one bar trace per column (named after the column) and one dot trace of
        the per-seed values per column (named "<column> seeds").
    """
    cols = math.ceil(len(COLUMNS) / 2)
    fig = make_subplots(rows=2, cols=cols, subplot_titles=[HEADER[c] for c in COLUMNS])
    names = [r.name for r in table.rows]
    for i, column in enumerate(COLUMNS):
        row, col = i // cols + 1, i % cols + 1
        if column in ("max_spike_ratio", "bos_spike_ratio"):
            fig.update_yaxes(type="log", row=row, col=col)
        stats = [r.stat(column) for r in table.rows]
        fig.add_trace(
            go.Bar(
                x=names,
                y=[s.mean for s in stats],
                error_y={"type": "data", "array": [s.spread for s in stats]},
                name=column,
                showlegend=False,
                marker_color="#4c78a8",
            ),
            row=row,
            col=col,
        )
        xs = [n for n, s in zip(names, stats, strict=True) for _ in s.values]
        ys = [v for s in stats for v in s.values]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="markers",
                name=f"{column} seeds",
                showlegend=False,
                marker={"color": "#222", "size": 5},
            ),
            row=row,
            col=col,
        )
    fig.update_layout(template=_TEMPLATE, title="Ablation (mean ± sd over seeds)", height=640)
    return fig


_VERDICT_COLORS = {"agrees": "#2ca02c", "differs": "#d62728"}


def plot_comparison(comparison: PaperComparison) -> go.Figure:
    """Each row's change from its baseline, ours against the paper's, one point per row.

    Left, the sink ratio: our row's mean minus our baseline's mean, against the paper's row
    minus its baseline's 0.460. Right, the Spike as a multiple of the baseline's, both axes
    logarithmic. The shaded bands are the ≈ zones of the direction rule (a change of at most
    20 % of the baseline, for the sink ratio at least 0.02); a row agrees when both of its
    coordinates lie on the same side of zero (of 1), or both in a band. Large points: means
    over seeds, green where the directions agree, red where they differ (hover for the row);
    small dots: each seed on its own, at the paper's same coordinate.

    Args:
        comparison: what :func:`~tl_spikesink.training.tables.compare` returns.

    Returns:
        A two-panel figure; its traces are named "sink_ratio agrees", "sink_ratio differs",
        "sink_ratio seeds" and the same for "spike".
    """
    base = next(r for r in comparison.rows if r.row.name == "baseline")
    rows = comparison.compared
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=["sink ratio: change from the baseline", "Spike: × the baseline's"],
        horizontal_spacing=0.12,
    )
    for col, quantity in enumerate(("sink_ratio", "spike"), start=1):
        ours_base = seed_mean(getattr(base, quantity))
        paper_base = PAPER_BASELINE[quantity]
        x0, x1 = _same_band(quantity, paper_base)
        y0, y1 = _same_band(quantity, ours_base)
        shade = {"fillcolor": "#999", "opacity": 0.15, "line_width": 0, "row": 1, "col": col}
        # Drawn before the points: plotly leaves shapes out of subplots that have no trace yet.
        fig.add_vrect(x0=x0, x1=x1, exclude_empty_subplots=False, **shade)
        fig.add_hrect(y0=y0, y1=y1, exclude_empty_subplots=False, **shade)
        paper = {r.row.name: _change(quantity, getattr(r.row, quantity), paper_base) for r in rows}
        for verdict, color in _VERDICT_COLORS.items():
            chosen = [r for r in rows if r.agrees[quantity] == (verdict == "agrees")]
            means = [seed_mean(getattr(r, quantity)) for r in chosen]
            fig.add_trace(
                go.Scatter(
                    x=[paper[r.row.name] for r in chosen],
                    y=[_change(quantity, m, ours_base) for m in means],
                    mode="markers",
                    name=f"{quantity} {verdict}",
                    legendgroup=verdict,
                    showlegend=col == 1,
                    marker={"color": color, "size": 10},
                    hovertext=[f"{r.row.label} ({r.marks()[quantity]})" for r in chosen],
                    hoverinfo="text+x+y",
                ),
                row=1,
                col=col,
            )
        fig.add_trace(
            go.Scatter(
                x=[paper[r.row.name] for r in rows for _ in r.seeds],
                y=[_change(quantity, v, ours_base) for r in rows for v in getattr(r, quantity)],
                mode="markers",
                name=f"{quantity} seeds",
                legendgroup="seeds",
                showlegend=col == 1,
                marker={"color": "#222", "size": 4},
                hovertext=[f"{r.row.label}, seed {s}" for r in rows for s in r.seeds],
                hoverinfo="text+y",
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text="the paper", row=1, col=col)
        fig.update_yaxes(title_text="ours", row=1, col=col)
    fig.update_xaxes(type="log", row=1, col=2)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(
        template=_TEMPLATE,
        title=f"The paper's Tables 3-8 beside ours ({comparison.settings})",
        height=520,
    )
    return fig


def _change(quantity: str, value: float, baseline: float) -> float | None:
    """The sink ratio's difference from the baseline, the Spike's multiple of it (None: NaN)."""
    if quantity == "sink_ratio":
        change = value - baseline
    else:
        change = value / baseline if baseline else math.nan
    return None if math.isnan(change) else change


def _same_band(quantity: str, baseline: float) -> tuple[float | None, float | None]:
    """The ≈ zone of the direction rule around `baseline`, in :func:`_change`'s units."""
    bar = same_bar(baseline, quantity)
    return _change(quantity, baseline - bar, baseline), _change(quantity, baseline + bar, baseline)


def _mean(group: list[TrainingRun], k: int, field: str) -> float:
    vals = [getattr(r.history[k], field) for r in group if k < len(r.history)]
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


__all__ = ["plot_ablation", "plot_comparison", "plot_emergence"]
