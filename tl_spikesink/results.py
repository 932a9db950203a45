"""The contract every result of the package keeps: frozen, valid JSON, a short repr, a table.

A result is a frozen dataclass that inherits :class:`Result` (declared with ``repr=False`` so the
short repr below is kept). It then has:

- ``repr(result)``: its class and the *shape* of what is inside (tensor shapes, lengths, scalar
  values), at most :data:`MAX_REPR` characters, so a bare ``result`` in a notebook is readable;
- ``str(result)`` / ``print(result)``: the readable table (each result defines ``__str__``);
- ``_repr_html_``: that table in a notebook;
- ``to_dict()``: JSON-ready data (each result defines it), and ``to_json(path)``: strict JSON
  text (NaN and infinities become null, never the invalid ``NaN`` token).
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from tl_spikesink.errors import SpikeSinkError

T = TypeVar("T")

MAX_REPR = 2048
"""Longest repr a result may have."""


class Result:
    """Mixin of the result contract; see the module docstring."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data: every field, tensors of more than 64 numbers by their shape only.

        Results with a report format of their own override this.
        """
        from tl_spikesink.views.format import json_clean

        return json_clean({f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def json_fields(self, names: str, **more: Any) -> dict[str, Any]:
        """JSON-ready :func:`attributes` of this result, then `more` (NaN and inf become null).

        A ``to_dict`` that reports attributes under their own names writes each name once:
        ``self.json_fields("model n_tokens corpus", rows=[...])``.
        """
        from tl_spikesink.views.format import json_clean

        return json_clean({**attributes(self, names), **more})

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as strict JSON text, also written to `path` if given."""
        from tl_spikesink.views.format import json_text

        return json_text(self.to_dict(), path)

    def __repr__(self) -> str:
        return short_repr(self)

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(str(self))}</pre>"


def find(items: Iterable[T], key: str, value: Any, error: str) -> T:
    """The first of `items` whose attribute `key` equals `value` (a table's row by its name).

    Raises:
        SpikeSinkError: with the message `error` when none does.
    """
    for item in items:
        if getattr(item, key) == value:
            return item
    raise SpikeSinkError(error)


def attributes(obj: Any, names: str) -> dict[str, Any]:
    """``{name: obj.name}`` for each of the space-separated `names`, in that order."""
    return {n: getattr(obj, n) for n in names.split()}


def short_repr(obj: Any, limit: int = MAX_REPR) -> str:
    """``Class(field=shape, ...)`` of a dataclass: tensors by shape, collections by length."""
    if not dataclasses.is_dataclass(obj):
        return _brief(obj)
    parts = [f"{f.name}={_brief(getattr(obj, f.name))}" for f in dataclasses.fields(obj)]
    text = f"{type(obj).__name__}({', '.join(parts)})"
    return text if len(text) <= limit else text[: limit - 4] + " ...)"


def _plain(x: Any) -> Any:
    if hasattr(x, "shape") and hasattr(x, "tolist"):
        return x.tolist() if x.numel() <= 64 else {"shape": list(x.shape), "dtype": str(x.dtype)}
    if isinstance(x, Result):
        return x.to_dict()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if callable(x):
        return getattr(x, "__qualname__", type(x).__name__)
    return x


def _brief(x: Any) -> str:
    shape = getattr(x, "shape", None)
    if shape is not None and hasattr(x, "dtype"):
        return f"{type(x).__name__}{list(shape)}"
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return f"{type(x).__name__}(...)"
    if isinstance(x, dict):
        return (
            f"{{{len(x)} items}}"
            if len(x) > 3
            else "{" + ", ".join(f"{k!r}: {_brief(v)}" for k, v in x.items()) + "}"
        )
    if isinstance(x, (list, tuple)):
        if len(x) > 6 or any(dataclasses.is_dataclass(v) for v in x):
            return f"<{len(x)} {type(x).__name__[:5]}>"
        return repr(tuple(x) if isinstance(x, tuple) else x)
    if isinstance(x, str):
        return repr(x) if len(x) <= 60 else repr(x[:57] + "...")
    if isinstance(x, float):
        return f"{x:.4g}"
    return repr(x) if len(repr(x)) <= 60 else f"<{type(x).__name__}>"


__all__ = ["MAX_REPR", "Result", "attributes", "find", "short_repr"]
