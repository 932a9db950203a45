"""How every view writes a number: one formatter for text, HTML and JSON, so NaN reads the same.

A missing number (NaN, or a measurement that does not apply) prints as :data:`MISSING` in text
and HTML, and becomes ``null`` in JSON (JSON has no NaN).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

MISSING = "–"
"""What a missing number prints as."""


def num(x: float | None, digits: int = 3) -> str:
    """`x` with `digits` significant digits; scientific notation outside [1e-3, 1e4).

    >>> num(0.12345), num(12345.0), num(float("nan")), num(7.0)
    ('0.123', '1.23e+04', '–', '7')
    """
    if x is None or x != x:
        return MISSING
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.{digits}g}"
    return f"{x:.{max(digits - 1, 1)}e}"


def pct(x: float | None, digits: int = 0) -> str:
    """`x` as a percentage.

    >>> pct(0.4601), pct(0.4601, 1), pct(float("nan"))
    ('46%', '46.0%', '–')
    """
    if x is None or x != x:
        return MISSING
    return f"{100 * x:.{digits}f}%"


def signed(x: float | None) -> str:
    """`x` with its sign, 3 significant digits."""
    return MISSING if x is None or x != x else f"{x:+.3g}"


def layer_list(layers: tuple[int, ...]) -> str:
    """Layers as "1, 2, 5", or "none"."""
    return ", ".join(map(str, layers)) if layers else "none"


def json_clean(x: Any) -> Any:
    """`x` made JSON-ready: NaN and inf become null, tensors lists, keys strings."""
    if isinstance(x, torch.Tensor):
        return json_clean(x.tolist())
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, (list, tuple)):
        return [json_clean(v) for v in x]
    if isinstance(x, dict):
        return {str(k): json_clean(v) for k, v in x.items()}
    return x


def json_text(data: dict[str, Any], path: str | Path | None = None) -> str:
    """`data` as indented, strict JSON text, also written to `path` if given."""
    text = json.dumps(json_clean(data), indent=1, allow_nan=False)
    if path is not None:
        Path(path).write_text(text)
    return text


def text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a plain-text table: first column left-aligned, the rest right-aligned."""
    width = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]  # no rows

    def fmt(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, width, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    return [fmt(header), fmt(["-" * w for w in width]), *(fmt(r) for r in rows)]


def block_events(counter: dict, verb: str) -> str:
    """Step-up or step-down blocks with what each did: `verb` is "created" or "cancelled"."""
    from tl_spikesink.anatomy import paper_block

    if not counter:
        return "none"
    return ", ".join(
        f"layer {layer} {comp} = paper block {paper_block(layer, comp)} "
        f"({verb} {n} token-channel spike{'' if n == 1 else 's'})"
        for (layer, comp), n in sorted(counter.items())
    )


__all__ = [
    "MISSING",
    "block_events",
    "json_clean",
    "json_text",
    "layer_list",
    "num",
    "pct",
    "signed",
    "text_table",
]
