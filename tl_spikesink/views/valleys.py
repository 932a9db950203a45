"""Plotly figure of a compression-valley measurement: four curves per run, one shared layer axis.

A pure view of :class:`~tl_spikesink.mechanism.valleys.Valleys`; nothing reruns the model.

    >>> fig = plot_valleys(compression_valleys(model, texts, scan=result))  # doctest: +SKIP
    >>> fig.write_html("valleys.html")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tl_spikesink.views.format import num
from tl_spikesink.views.plots import finish_figure, plot_values

if TYPE_CHECKING:
    from tl_spikesink.mechanism.valleys import Valleys

_RUN_COLORS = {"clean": "#1f77b4", "mean": "#ff7f0e", "zero": "#d62728"}
_PANELS = (
    ("entropy", "entropy", "matrix entropy / log min(n, D)", False),
    ("norm_ratio", "‖x₀‖/median", "‖x₀‖ / median ‖x_t‖ (log)", True),
    ("sink_ratio", "sink ratio", "Eq. 28 sink ratio", False),
    ("lens_loss", "logit-lens loss", "logit-lens NLL (nats)", False),
)


def plot_valleys(valleys: Valleys) -> go.Figure:
    """Entropy, first-token norm ratio, sink ratio and logit-lens loss against the layer.

    One row per quantity, sharing the layer axis (−1 is the embedding); one line per run (clean,
    then each spike ablation). The title gives the clean valley and the depth of every run.

    Returns:
        A figure whose traces are named "<quantity> · <run>", e.g. "entropy · clean".
    """
    v = valleys
    fig = make_subplots(
        rows=len(_PANELS),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.04,
        subplot_titles=[p[1] for p in _PANELS],
    )
    for row, (field, label, axis, log) in enumerate(_PANELS, start=1):
        for i, run in enumerate(v.runs):
            fig.add_trace(
                go.Scatter(
                    x=list(v.layers),
                    y=plot_values(getattr(v, field)[i]),
                    name=f"{label} · {run}",
                    legendgroup=run,
                    showlegend=row == 1,
                    mode="lines+markers",
                    line={"color": _RUN_COLORS.get(run, "#7f7f7f")},
                    hovertemplate=f"{run}<br>layer %{{x}}: %{{y:.4g}}<extra>{label}</extra>",
                ),
                row=row,
                col=1,
            )
        fig.update_yaxes(title_text=axis, type="log" if log else "linear", row=row, col=1)
    fig.update_xaxes(title_text="layer (−1: embedding)", row=len(_PANELS), col=1)
    depths = ", ".join(f"{run} {num(v.depth(run))}" for run in v.runs)
    title = (
        f"Compression valley of {v.model}: clean minimum at layer {v.valley_layer()}, "
        f"r(entropy, log norm ratio) {num(v.entropy_vs_norm())}; depth {depths}"
    )
    return finish_figure(fig, title, height=900)


__all__ = ["plot_valleys"]
