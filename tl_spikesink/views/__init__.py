"""Views: text, JSON, plotly figures, CircuitsVis widgets and the offline HTML page, from results.

Nothing here computes a statistic; each view takes a result. Importing this package loads
neither plotly nor CircuitsVis: each module imports them where a figure is drawn.
"""

from tl_spikesink.lazy import exports

_MODULES = (
    "format",
    "html",
    "kurtosis",
    "mechanism",
    "paper",
    "plots",
    "saes",
    "text",
    "training",
    "valleys",
    "widgets",
)


# Submodules load on first use: plotly and CircuitsVis only when a figure is drawn.
__getattr__ = exports("tl_spikesink.views", {}, modules=_MODULES)


__all__ = list(_MODULES)
