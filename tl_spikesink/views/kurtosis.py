"""Plotly figure of the residual stream's excess kurtosis per layer, with and without spike tokens.

>>> fig = plot_kurtosis(result)  # doctest: +SKIP
>>> fig.show()  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import plotly.graph_objects as go

from tl_spikesink.probes.kurtosis import ExcessKurtosis, excess_kurtosis

if TYPE_CHECKING:
    from tl_spikesink.probes.scan import ScanResult

_COLORS = {"all tokens": "#d62728", "without spike tokens": "#1f77b4"}


def plot_kurtosis(result: ScanResult | ExcessKurtosis, log_y: bool = True) -> go.Figure:
    """Excess kurtosis (OSP's relu(mean(x⁴)/std⁴ − 3)) of each layer's ``hook_resid_post``.

    Args:
        result: a scan, or its :func:`~tl_spikesink.probes.kurtosis.excess_kurtosis`.
        log_y: log y axis (layers at exactly 0 are then not drawn).

    Returns:
        A figure with traces "all tokens" and "without spike tokens" over "layer".
    """
    k = result if isinstance(result, ExcessKurtosis) else excess_kurtosis(result)
    layers = list(range(len(k.per_layer)))
    fig = go.Figure()
    for name, values in (
        ("all tokens", k.per_layer),
        ("without spike tokens", k.per_layer_without_spikes),
    ):
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=values.tolist(),
                name=name,
                mode="lines+markers",
                line={"color": _COLORS[name]},
                hovertemplate="layer %{x}<br>kurtosis %{y:.3g}<extra>" + name + "</extra>",
            )
        )
    fig.update_layout(
        template="plotly_white",
        title=(
            f"Excess kurtosis of the residual stream, {k.model} ({k.n_spike_tokens} spike tokens "
            f"of {k.n_tokens:,})"
        ),
        xaxis_title="layer",
        yaxis_title="excess kurtosis (hook_resid_post)",
        yaxis_type="log" if log_y else "linear",
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


__all__ = ["plot_kurtosis"]
