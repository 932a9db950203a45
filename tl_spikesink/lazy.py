"""Names that load on first use: one module-level ``__getattr__`` for every package.

A package lists where each public name lives; nothing is imported until the name is read, so
``import tl_spikesink`` and the CLI's parser stay free of torch, plotly and CircuitsVis. Old
names keep working for one release with a DeprecationWarning naming the new place (the pattern
of TransformerLens ``hook_points.py``).

    >>> __getattr__ = exports("tl_spikesink.models", {"load": "loading"})  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Mapping
from importlib import import_module
from typing import Any


def exports(
    package: str,
    names: Mapping[str, str],
    *,
    modules: Collection[str] = (),
    renamed: Mapping[str, tuple[str, str]] | None = None,
) -> Callable[[str], Any]:
    """A module ``__getattr__`` for `package`.

    Args:
        package: the package's dotted name (``__name__``).
        names: public name → the submodule of `package` that defines it.
        modules: submodules reachable as attributes (``ts.probes``).
        renamed: old name → (module under ``tl_spikesink``, new name); reading the old name
            warns and returns the new object.
    """
    renamed = dict(renamed or {})

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(import_module(f"{package}.{names[name]}"), name)
        if name in modules:
            return import_module(f"{package}.{name}")
        if name in renamed:
            module, new = renamed[name]
            warnings.warn(
                f"{package}.{name} is now tl_spikesink.{module}.{new}; the old name goes in the "
                "next release",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(import_module(f"tl_spikesink.{module}"), new)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


__all__ = ["exports"]
