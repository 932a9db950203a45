"""Plotly figures of a scan: spikes across depth, sink ratio, α by position, sink scores, distance.

Every function is a pure view of a :class:`ScanResult` (or, for :func:`plot_interventions`, of
an :class:`ExperimentTable`; nothing reruns the model) and returns a
`plotly.graph_objects.Figure`; nothing is shown. `fig.show()` in a notebook, `fig.write_html(...)`
for one figure, or :func:`tl_spikesink.views.html.write_html` for all of them on one offline page.

    >>> fig = plot_massive_activations(result)  # doctest: +SKIP
    >>> fig.show()  # doctest: +SKIP

Axes carry names ("layer", "head", "key position"); traces carry the name a legend shows
("top 1", "median", "sink heads"), so a figure can also be read back as data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

if TYPE_CHECKING:
    from tl_spikesink.evaluation.decoupling import ExperimentTable
    from tl_spikesink.probes.scan import ScanResult

_TEMPLATE = "plotly_white"
_TOP_COLORS = ("#d62728", "#ff7f0e", "#bcbd22")
_STEP_COLORS = {"step-up": "#2ca02c", "step-down": "#9467bd"}
_TINY = torch.finfo(torch.float32).tiny
_MAX_CELL_TEXT = 400
"""Heatmaps with more cells than this show values on hover only (text would not fit)."""


def plot_massive_activations(result: ScanResult) -> go.Figure:
    """Top-3 |x| and median |x| of every layer, for each scanned site (log y; Sun et al. Fig. 1).

    One panel per site: the residual stream (`resid_post`) and, when scanned, the attention and
    MLP outputs. The residual panel also shows the massive-activation cut of each layer,
    max(abs_threshold, rel_threshold × median); vertical lines mark step-up and step-down blocks.

    Args:
        result: a scan.

    Returns:
        A figure with traces "top 1", "top 2", "top 3", "median" per panel (their `meta` is the
        site) and "massive cut" on the residual panel; step-up and step-down blocks are dashed
        vertical line shapes named "step-up block" / "step-down block".
    """
    s = result.spikes
    fig = make_subplots(
        rows=1,
        cols=len(s.sites),
        shared_yaxes=True,
        horizontal_spacing=0.04,
        subplot_titles=[_SITE_TITLES.get(site, site) for site in s.sites],
    )
    layers = list(range(s.n_layers))
    for col, site in enumerate(s.sites, start=1):
        top, median = s.top(site, 3), s.median(site)
        for i in range(3):
            fig.add_trace(
                _line(layers, top[:, i], f"top {i + 1}", _TOP_COLORS[i], site, col == 1),
                row=1,
                col=col,
            )
        fig.add_trace(_line(layers, median, "median", "#1f77b4", site, col == 1), row=1, col=col)
        if site == "resid_post":
            cut = torch.clamp(s.rel_threshold * median, min=s.abs_threshold)
            fig.add_trace(
                _line(layers, cut, "massive cut", "#7f7f7f", site, True, dash="dot"), row=1, col=col
            )
    for kind, marked in (("step-up", s.step_up_layers), ("step-down", s.step_down_layers)):
        for i, layer in enumerate(marked):
            for col in range(1, len(s.sites) + 1):
                # Shapes in the legend (one entry per kind) keep the panel titles readable.
                fig.add_vline(
                    x=layer,
                    line_dash="dash",
                    line_color=_STEP_COLORS[kind],
                    name=f"{kind} block",
                    legendgroup=kind,
                    showlegend=i == 0 and col == 1,
                    row=1,
                    col=col,
                )
    fig.update_yaxes(type="log")
    fig.update_yaxes(title_text="|activation|", row=1, col=1)
    # Three narrow panels: fewer ticks, and no autorange padding past the first and last layer.
    ticks = _dtick(s.n_layers, max_ticks=32 // len(s.sites))
    fig.update_xaxes(title_text="layer", dtick=ticks, range=[-0.5, s.n_layers - 0.5])
    title = (
        f"Massive activations across depth — {result.model} "
        f"(step-up {_layer_list(s.step_up_layers)}; step-down {_layer_list(s.step_down_layers)})"
    )
    return finish_figure(fig, title, height=440)


def plot_sink_ratio(result: ScanResult) -> go.Figure:
    """The paper's sink ratio (Eq. 28) per layer, with the first-token sink ratio beside it.

    Each bar is the mean over sequences of the share of that layer's heads that are Eq. 28 sink
    heads in the sequence (some key k < ⌊T/2⌋ gets α_k > ε from the first T = min(n, 64)
    queries); hover also gives the layer's first-token sink ratio (corpus-pooled α₀ > ε).

    Args:
        result: a scan.

    Returns:
        A bar figure (trace "sink ratio", one bar per layer) with the overall Eq. 28 ratio as a
        dashed line shape named in the legend ("all layers 0.760 (Eq. 28)"), not as a label on
        the bars; the title names both ratios.
    """
    k = result.sinks
    ratio = k.sink_ratio_per_layer
    n_sink = (k.scores > k.epsilon).sum(-1).tolist()
    fig = go.Figure(
        go.Bar(
            x=list(range(k.n_layers)),
            y=ratio.tolist(),
            name="sink ratio",
            marker_color="#1f77b4",
            customdata=[[n, k.n_heads] for n in n_sink],
            hovertemplate="layer %{x}: Eq. 28 sink ratio %{y:.3f}; first-token sink heads "
            "%{customdata[0]} of %{customdata[1]}<extra></extra>",
        )
    )
    # The overall ratio goes in the legend: a label on the line sat on the bars of full layers.
    fig.add_hline(
        y=k.sink_ratio,
        line_dash="dash",
        line_color="#333",
        name=f"all layers {k.sink_ratio:.3f} (Eq. 28)",
        showlegend=True,
    )
    fig.data[0].showlegend = True
    fig.update_xaxes(title_text="layer", dtick=_dtick(k.n_layers))
    fig.update_yaxes(title_text="share of sink heads", range=[0, 1.05])
    title = (
        f"Sink ratio per layer (Eq. 28, ε = {k.epsilon}, {k.n_ratio_sequences} sequences); "
        f"first-token sink ratio (pooled α₀ > ε) {k.first_token_sink_ratio:.3f}"
        f"<br><sup>a head is a sink head in a sequence when some key k < T/2 gets α_k > ε from "
        f"the first T = min(n, {k.probe_len}) queries; bars are means over sequences</sup>"
    )
    return finish_figure(fig, title, height=400)


def plot_alpha(result: ScanResult, *, max_position: int = 64, max_heads: int = 8) -> go.Figure:
    """α_k against key position k: the mean over all heads and the strongest sink heads.

    Args:
        result: a scan.
        max_position: show key positions 0 .. max_position − 1 (Gu et al. probe 64 tokens).
        max_heads: most sink heads drawn one by one (highest first-token score first).

    Returns:
        A line figure: trace "mean over heads", one trace per sink head named like "L5H3".
    """
    k = result.sinks
    alpha = k.alpha[:, :, :max_position]
    positions = list(range(alpha.shape[-1]))
    fig = go.Figure(
        go.Scatter(
            x=positions,
            y=plot_values(alpha.mean((0, 1))),
            name="mean over heads",
            mode="lines",
            line={"color": "black", "width": 3},
        )
    )
    heads = sorted(k.sink_heads, key=lambda lh: -float(k.scores[lh]))[:max_heads]
    for layer, head in heads:
        fig.add_trace(
            go.Scatter(
                x=positions,
                y=plot_values(alpha[layer, head]),
                name=f"L{layer}H{head}",
                mode="lines",
            )
        )
    fig.add_hline(y=k.epsilon, line_dash="dot", annotation_text=f"ε = {k.epsilon}")
    fig.update_xaxes(title_text="key position k")
    fig.update_yaxes(title_text="α_k = Σᵢ A_ik / (T − k)", range=[0, 1.05])
    shown = (
        f"top {len(heads)} of {len(k.sink_heads)} sink heads" if k.sink_heads else "no sink heads"
    )
    return finish_figure(fig, f"Attention received by key position ({shown})", height=400)


def plot_sink_scores(result: ScanResult) -> go.Figure:
    """Layers × heads heatmap of the first-token sink score α_0, sink heads outlined.

    Args:
        result: a scan.

    Returns:
        A figure with a heatmap trace "sink score"; sink heads are outlined by rectangle shapes
        named "sink heads (α₀ > ε)".
    """
    k = result.sinks
    title = (
        f"First-token sink score per head, α₀ pooled over the corpus ({result.model}); "
        f"first-token sink ratio {k.first_token_sink_ratio:.3f}, Eq. 28 sink ratio "
        f"{k.sink_ratio:.3f}"
    )
    return score_heatmap(k.scores, k.epsilon, title)


def plot_attention_distance(result: ScanResult) -> go.Figure:
    """How far back each head looks, with the sink key and without it; sink heads against the rest.

    Each head is a point: x is its mean attention distance Σ_j A_ij (i − j), y the same with the
    first-token key removed and the rest renormalized. Points below the diagonal got their
    distance from the sink: without it they look local.

    Args:
        result: a scan.

    Returns:
        A scatter figure with traces "sink heads" and "other heads" (hover names the head).
    """
    k = result.sinks
    with_sink, without = k.attention_distance, k.attention_distance_without_sink
    is_sink = k.scores > k.epsilon
    fig = go.Figure()
    summary = []
    for name, mask, color in (
        ("sink heads", is_sink, "#d62728"),
        ("other heads", ~is_sink, "#1f77b4"),
    ):
        idx = mask.nonzero().tolist()
        x = [float(with_sink[lh]) for lh in map(tuple, idx)]
        y = [float(without[lh]) for lh in map(tuple, idx)]
        fig.add_trace(
            go.Scatter(
                x=x, y=y, mode="markers", name=name,
                marker={"color": color, "size": 8, "opacity": 0.8},
                text=[
                    f"L{layer}H{head} (score {float(k.scores[layer, head]):.2f})"
                    for layer, head in idx
                ],
                hovertemplate="%{text}<br>with sink %{x:.2f}<br>without %{y:.2f}<extra></extra>",
            )
        )  # fmt: skip
        if x:
            summary.append(f"{name} {sum(x) / len(x):.1f} → {sum(y) / len(y):.1f}")
    top = max([float(with_sink.max()), float(without.max()), 1.0])
    fig.add_trace(
        go.Scatter(
            x=[0, top],
            y=[0, top],
            mode="lines",
            name="same",
            line={"dash": "dot", "color": "#7f7f7f"},
        )
    )
    fig.update_xaxes(title_text="attention distance (tokens), with the sink key")
    fig.update_yaxes(title_text="without the sink key (renormalized)")
    return finish_figure(fig, "Attention distance: " + "; ".join(summary), height=440)


_KIND_COLORS = {
    "clean": "#7f7f7f",
    "spike_ablation": "#d62728",
    "sink_key_removal": "#1f77b4",
    "norm_swap": "#9467bd",
    "attention_gate": "#2ca02c",
}
_OTHER_KIND_COLOR = "#ff7f0e"
_INTERVENTION_PANELS = (
    # (ExperimentRow field, trace name, axis title, axis type)
    ("perplexity", "perplexity", "perplexity", "log"),
    ("kl", "KL", "KL(clean ‖ intervened), nats/token", "log"),
    ("max_spike_ratio", "spike/median", "max top-1 / median |x|", "log"),
    ("sink_ratio", "sink ratio", "sink ratio", "linear"),
)


def plot_interventions(table: ExperimentTable) -> go.Figure:
    """The decoupling table as bars: cost to the model, and what is left of spikes and sinks.

    One bar per intervention in each of four panels, the clean model on top: perplexity (log
    axis; the clean model's is a dashed line), mean KL(clean ‖ intervened) per token (log; the
    clean model's 0 has no bar), the largest resid_post top-1 / median |x| over layers (log; the
    massive-activation ratio of the scan settings is a dotted line: bars left of it have no
    spike) and the sink ratio (the clean model's is dashed). Bars are colored by the
    intervention's kind (spike ablation, sink-key removal, norm swap, ...). A value that is not
    finite (the forward overflowed) or not positive on a log axis has no bar; rows with
    overflowing positions say so in their label.

    Args:
        table: a decoupling table from :func:`tl_spikesink.evaluation.decoupling`.

    Returns:
        A figure with one horizontal bar trace per panel, named "perplexity", "KL",
        "spike/median" and "sink ratio" (y: the row labels, top to bottom; x: the values, None
        where there is no bar); reference lines are shapes named "clean perplexity",
        "massive ratio" and "clean sink ratio".
    """
    rows = table.rows
    labels = [f"{r.name} (overflow)" if r.n_nonfinite else r.name for r in rows]
    kinds = [str(r.settings.get("kind", "other")) if r.settings else "clean" for r in rows]
    fig = make_subplots(
        rows=1,
        cols=len(_INTERVENTION_PANELS),
        shared_yaxes=True,
        horizontal_spacing=0.025,
        subplot_titles=[name for _, name, _, _ in _INTERVENTION_PANELS],
    )
    for col, (field, name, title, axis) in enumerate(_INTERVENTION_PANELS, start=1):
        x = [_bar_value(getattr(r, field), log=axis == "log") for r in rows]
        fig.add_trace(
            go.Bar(
                x=x,
                y=labels,
                orientation="h",
                name=name,
                showlegend=False,
                marker_color=[_KIND_COLORS.get(k, _OTHER_KIND_COLOR) for k in kinds],
                customdata=kinds,
                texttemplate="%{x:.3g}",
                textposition="auto",
                hovertemplate=f"%{{y}}<br>{name}: %{{x:.4g}}<br>%{{customdata}}<extra></extra>",
            ),
            row=1,
            col=col,
        )
        # Log axes: one tick per decade (minor ticks crowd these narrow panels); ratios in [0, 1].
        ticks = {"dtick": 1} if axis == "log" else {"range": [0, 1.05]}
        fig.update_xaxes(type=axis, title_text=title, row=1, col=col, **ticks)
    clean = rows[0]
    for col, value, name, dash in (
        (1, clean.perplexity, "clean perplexity", "dash"),
        (3, table.config.rel_threshold, "massive ratio", "dot"),
        (4, clean.sink_ratio, "clean sink ratio", "dash"),
    ):
        if _bar_value(value, log=col != 4) is not None:
            fig.add_vline(x=value, line_dash=dash, line_color="#555", name=name, row=1, col=col)
    # Legend entries for the kinds present; the bars themselves stay one trace per panel.
    for kind in dict.fromkeys(kinds):
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                marker={"color": _KIND_COLORS.get(kind, _OTHER_KIND_COLOR), "symbol": "square"},
                name=kind.replace("_", " "),
                meta="legend",
            )
        )
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    c = table.corpus
    title = (
        f"Decoupling experiment — {table.model} ({c.get('n_tokens', 0):,} tokens of "
        f"{c.get('name', 'the evaluation corpus')})"
    )
    fig = finish_figure(fig, title, height=max(360, 30 * len(rows) + 210))
    return fig.update_layout(legend={"y": -0.3}, margin={"b": 100})


def _bar_value(x: float, log: bool) -> float | None:
    """A bar's length; None (no bar) when not finite, or not positive on a log axis."""
    if x != x or x in (float("inf"), float("-inf")) or (log and x <= 0):
        return None
    return float(x)


def score_heatmap(scores: torch.Tensor, epsilon: float, title: str) -> go.Figure:
    """A [layer, head] score heatmap in [0, 1] with heads above ε outlined."""
    n_layers, n_heads = scores.shape
    z = [plot_values(row) for row in scores]
    show_text = n_layers * n_heads <= _MAX_CELL_TEXT
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(n_heads)),
            y=list(range(n_layers)),
            zmin=0.0,
            zmax=1.0,
            colorscale="Blues",
            name="sink score",
            colorbar={"title": {"text": "α₀"}},
            texttemplate="%{z:.2f}" if show_text else None,
            hovertemplate="L%{y}H%{x}: %{z:.3f}<extra></extra>",
        )
    )
    # One assignment, not add_shape per head: plotly revalidates every shape on each add, which
    # took 7.6 s for 200 sink heads (SmolLM2 has ~200) where this takes 0.3 s.
    fig.layout.shapes = [
        {
            "type": "rect",
            "x0": head - 0.5,
            "x1": head + 0.5,
            "y0": layer - 0.5,
            "y1": layer + 0.5,
            "line": {"color": "#d62728", "width": 3},
            "name": f"sink heads (α₀ > {epsilon})",
            "showlegend": i == 0,
        }
        for i, (layer, head) in enumerate((scores > epsilon).nonzero().tolist())
    ]
    fig.update_xaxes(title_text="head", dtick=1)
    fig.update_yaxes(title_text="layer", dtick=_dtick(n_layers), autorange="reversed")
    height = min(900, max(320, 22 * n_layers + 140))
    return finish_figure(fig, title, height=height)


_SITE_TITLES = {
    "resid_post": "residual stream",
    "attn_out": "attention output",
    "mlp_out": "MLP output",
}


def _line(
    x: list[int],
    y: torch.Tensor,
    name: str,
    color: str,
    site: str,
    legend: bool,
    dash: str = "solid",
) -> go.Scatter:
    return go.Scatter(
        x=x,
        # Zeros have no place on a log axis: leave a gap. Streaming medians of all-zero layers
        # come back as denormals (the histogram's zero bin), which count as zero too.
        y=[v if v is not None and v >= _TINY else None for v in plot_values(y)],
        name=name,
        meta=site,
        legendgroup=name,
        showlegend=legend,
        mode="lines+markers",
        line={"color": color, "dash": dash},
        hovertemplate=f"{name}<br>layer %{{x}}: %{{y:.4g}}<extra>{site}</extra>",
    )


def plot_values(x: torch.Tensor) -> list[float | None]:
    """Plain floats for JSON; NaN (no data) becomes a gap."""
    return [None if v != v else v for v in x.double().tolist()]


def _dtick(n: int, max_ticks: int = 32) -> int:
    """The smallest of 1, 2, 5, 10, 20, ... that puts at most `max_ticks` ticks on `n` layers."""
    step = 1
    while n / step > max_ticks:
        step = step * 5 // 2 if str(step)[0] == "2" else step * 2
    return step


def _layer_list(layers: tuple[int, ...]) -> str:
    return ", ".join(f"L{layer}" for layer in layers) or "none"


def finish_figure(fig: go.Figure, title: str, height: int) -> go.Figure:
    """The house layout every figure of the package ends with: title, template, margins."""
    fig.update_layout(
        title={"text": title, "x": 0.01, "font": {"size": 15}},
        template=_TEMPLATE,
        height=height,
        margin={"l": 60, "r": 20, "t": 70, "b": 50},
        legend={"orientation": "h", "y": -0.18},
    )
    return fig


__all__ = [
    "plot_alpha",
    "plot_attention_distance",
    "plot_interventions",
    "plot_massive_activations",
    "plot_sink_ratio",
    "plot_sink_scores",
]
