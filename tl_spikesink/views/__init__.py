"""Views: text, JSON, plotly figures, CircuitsVis widgets and the offline HTML page, from results.

Nothing here computes a statistic; each view takes a result. Importing this package loads
neither plotly nor CircuitsVis: each module imports them where a figure is drawn.
"""

from importlib import import_module as _import_module

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


def __getattr__(name: str):
    # Submodules load on first use: plotly and CircuitsVis only when a figure is drawn.
    if name in _MODULES:
        return _import_module(f"tl_spikesink.views.{name}")
    raise AttributeError(f"module 'tl_spikesink.views' has no attribute {name!r}")


__all__ = list(_MODULES)
