"""Plotly views of training runs: emergence curves and the ablation table.

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


def _mean(group: list[TrainingRun], k: int, field: str) -> float:
    vals = [getattr(r.history[k], field) for r in group if k < len(r.history)]
    vals = [v for v in vals if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


__all__ = ["plot_ablation", "plot_emergence"]
