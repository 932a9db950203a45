"""Plotly figures of the mechanism checks: SiLU regime, quadratic form, representations, heads.

Every function is a pure view of one result of :mod:`tl_spikesink.mechanism` (or of a
:class:`~tl_spikesink.ClaimsTable`) and returns a `plotly.graph_objects.Figure`; nothing reruns
the model and nothing is shown. Figure numbers refer to the seed paper.

    >>> fig = plot_silu_regime(mech.silu_regime(model, texts))  # doctest: +SKIP
    >>> fig.write_html("silu.html")  # doctest: +SKIP

Traces carry the names a legend shows ("spike tokens", "other tokens", "sink heads"), so a
figure can be read back as data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import plotly.graph_objects as go
import torch

from tl_spikesink.views.plots import finish_figure, plot_values

if TYPE_CHECKING:
    from tl_spikesink.mechanism import (
        HeadDecomposition,
        QuadraticForm,
        Representations,
        SiluRegime,
    )
    from tl_spikesink.mechanism.claims import ClaimsTable

_SPIKE, _OTHER = "#d62728", "#1f77b4"
_VERDICT_COLORS = {"holds": "#d9f2d9", "does not hold": "#f8d7d7", "not applicable": "#eeeeee"}


def plot_silu_regime(result: SiluRegime) -> go.Figure:
    """Per token, cos(z, act(z)) against ‖act(z)‖/‖z‖ in the spike layer's MLP (Fig. 2).

    Spike tokens near (1, 1) see the activation as the identity; ordinary tokens lose the
    negative half of z.

    Returns:
        A figure with traces "spike tokens" and "other tokens" (x: norm ratio, y: cosine) and the
        marker "identity" at (1, 1).
    """
    fig = go.Figure()
    for name, mask, color in (
        ("other tokens", ~result.is_spike, _OTHER),
        ("spike tokens", result.is_spike, _SPIKE),
    ):
        fig.add_trace(
            go.Scatter(
                x=plot_values(result.norm_ratio[mask]), y=plot_values(result.cosine[mask]),
                name=name, mode="markers",
                marker={
                    "color": color,
                    "size": 9 if name == "spike tokens" else 5,
                    "opacity": 0.9 if name == "spike tokens" else 0.4,
                },
                hovertemplate="‖act z‖/‖z‖ %{x:.3f}<br>cos %{y:.3f}<extra>" + name + "</extra>",
            )
        )  # fmt: skip
    fig.add_trace(
        go.Scatter(
            x=[1.0],
            y=[1.0],
            name="identity",
            mode="markers",
            marker={"symbol": "x", "size": 12, "color": "#333333"},
        )
    )
    fig.update_xaxes(title_text="‖act(z)‖ / ‖z‖")
    fig.update_yaxes(title_text="cos(z, act(z))")
    return finish_figure(fig, f"SiLU regime of block {result.layer}'s MLP, per token", height=420)


def plot_quadratic_norms(result: QuadraticForm) -> go.Figure:
    """‖S_k‖_F of every output channel k of the spike layer's MLP, spike channels marked (Fig. 3).

    Returns:
        A figure with traces "channels" (all d_model channels) and "spike channels".
    """
    norms = result.all_frobenius
    spike = list(result.channels)
    fig = go.Figure(
        [
            go.Scatter(
                x=list(range(norms.numel())),
                y=plot_values(norms),
                name="channels",
                mode="markers",
                marker={"color": _OTHER, "size": 4},
                hovertemplate="channel %{x}: %{y:.4g}<extra></extra>",
            ),
            go.Scatter(
                x=spike,
                y=plot_values(norms[spike]),
                name="spike channels",
                mode="markers+text",
                text=[str(k) for k in spike],
                textposition="top center",
                marker={"color": _SPIKE, "size": 11},
                hovertemplate="channel %{x}: %{y:.4g}<extra>spike channel</extra>",
            ),
        ]
    )
    fig.update_xaxes(title_text="output channel k")
    fig.update_yaxes(title_text="‖S_k‖_F", type="log")
    title = f"SwiGLU quadratic form of block {result.layer}'s MLP: size per output channel"
    return finish_figure(fig, title, height=400)


def plot_quadratic_spectrum(result: QuadraticForm) -> go.Figure:
    """Eigenvalues of S_k for each spike channel, ascending, with the dominant λ* (Fig. 4).

    Returns:
        A figure with one trace "S_k" per spike channel k (x: eigenvalue rank, y: eigenvalue; its
        `meta` is k) and one trace "λ*" holding every channel's dominant eigenvalue.
    """
    fig = go.Figure()
    stars_x, stars_y = [], []
    for i, k in enumerate(result.channels):
        vals = result.eigenvalues[i]
        fig.add_trace(
            go.Scatter(
                x=list(range(vals.numel())),
                y=plot_values(vals),
                name=f"S_{k}",
                meta=k,
                mode="lines+markers",
                marker={"size": 3},
                hovertemplate="rank %{x}: λ = %{y:.4g}<extra>" + f"S_{k}</extra>",
            )
        )
        star = int(vals.abs().argmax())
        stars_x.append(star)
        stars_y.append(float(vals[star]))
    fig.add_trace(
        go.Scatter(
            x=stars_x,
            y=stars_y,
            name="λ*",
            mode="markers+text",
            text=[f"λ* = {y:.3g}" for y in stars_y],
            textposition="middle left",
            marker={"symbol": "star", "size": 14, "color": _SPIKE},
        )
    )
    fig.update_xaxes(title_text="eigenvalue rank (ascending)")
    fig.update_yaxes(title_text="eigenvalue λ")
    return finish_figure(fig, f"Spectrum of S_k, block {result.layer}, spike channels", height=400)


def plot_representations(result: Representations) -> go.Figure:
    """Mean pairwise cosine of spike tokens' residual stream at every layer (Fig. 5).

    Returns:
        A figure with traces "spike tokens" and "other tokens" (x: layer) and a dashed vertical
        line at the spike layer.
    """
    layers = list(range(result.resid_cosine.numel()))
    fig = go.Figure(
        [
            go.Scatter(
                x=layers,
                y=plot_values(values),
                name=name,
                mode="lines+markers",
                line={"color": color},
                hovertemplate="layer %{x}: cos %{y:.3f}<extra>" + name + "</extra>",
            )
            for name, values, color in (
                ("spike tokens", result.resid_cosine, _SPIKE),
                ("other tokens", result.other_resid_cosine, _OTHER),
            )
        ]
    )
    fig.add_vline(
        x=result.layer,
        line_dash="dash",
        line_color="#2ca02c",
        annotation_text=f"spike layer {result.layer}",
    )
    fig.update_xaxes(title_text="layer (resid_post)")
    fig.update_yaxes(title_text="mean pairwise cosine", range=[-0.05, 1.05])
    return finish_figure(fig, "How alike spike tokens become across depth", height=400)


def plot_head_decomposition(result: HeadDecomposition) -> go.Figure:
    """Per head: attention given to the sink tokens vs how much the head writes (Thm 2.1).

    Sink heads should sit to the right (they attend to the sink tokens) and low (they write
    little, since the sink tokens' values are small).

    Returns:
        A figure with traces "sink heads" and "other heads": x the mean attention on the sink
        tokens at ordinary queries, y the head's ‖output‖ over its layer's mean head; each point's
        `customdata` is (layer, head, sink part, rest part, value ratio).
    """
    n_layers, n_heads = result.head_norm.shape
    grid = torch.stack(
        torch.meshgrid(torch.arange(n_layers), torch.arange(n_heads), indexing="ij"), -1
    )
    fields = (result.sink_part, result.rest_part, result.value_ratio)
    fig = go.Figure()
    for name, mask, color in (
        ("other heads", ~result.is_sink, _OTHER),
        ("sink heads", result.is_sink, _SPIKE),
    ):
        custom = torch.cat([grid[mask].double(), *(f[mask].double()[:, None] for f in fields)], 1)
        fig.add_trace(
            go.Scatter(
                x=plot_values(result.sink_attention[mask]), y=plot_values(result.relative_norm[mask]),
                name=name, mode="markers",
                marker={"color": color, "size": 7, "opacity": 0.75},
                customdata=[plot_values(row) for row in custom],
                hovertemplate=(
                    "L%{customdata[0]}H%{customdata[1]}<br>attention on sinks %{x:.3f}"
                    "<br>‖output‖ / layer mean %{y:.3f}<br>from sink values %{customdata[2]:.3g},"
                    " from others %{customdata[3]:.3g}<br>‖v W_O‖ sink / other tokens "
                    "%{customdata[4]:.3g}<extra>" + name + "</extra>"
                ),
            )
        )  # fmt: skip
    fig.add_hline(y=1.0, line_dash="dot", line_color="#7f7f7f")
    fig.update_xaxes(title_text="attention on sink tokens (ordinary queries)", range=[-0.02, 1.02])
    fig.update_yaxes(title_text="‖head output‖ / layer's mean head")
    return finish_figure(fig, "What each head writes at ordinary tokens", height=440)


def plot_claims(table: ClaimsTable) -> go.Figure:
    """The claims table as a figure, each row coloured by its verdict.

    Returns:
        A figure holding one `go.Table` with columns link, claim, measured, threshold, verdict,
        note.
    """
    rows = table.rows
    measured = ["—" if r.measured is None else f"{r.measured:.4g}" for r in rows]
    colors = [_VERDICT_COLORS[r.verdict] for r in rows]
    columns = [
        [r.link for r in rows],
        [r.claim for r in rows],
        measured,
        [r.threshold for r in rows],
        [r.verdict for r in rows],
        [r.note for r in rows],
    ]
    fig = go.Figure(
        go.Table(
            columnwidth=[70, 380, 70, 120, 90, 260],
            header={
                "values": ["link", "claim", "measured", "threshold", "verdict", "note"],
                "fill_color": "#dddddd",
                "align": "left",
            },
            cells={"values": columns, "fill_color": [colors] * 6, "align": "left"},
        )
    )
    title = (
        f"Claims for {table.model} ({table.n_tokens} tokens, {table.n_spike_tokens} spike tokens)"
    )
    return finish_figure(fig, title, height=min(1200, 120 + 48 * len(rows)))


__all__ = [
    "plot_claims",
    "plot_head_decomposition",
    "plot_quadratic_norms",
    "plot_quadratic_spectrum",
    "plot_representations",
    "plot_silu_regime",
]
