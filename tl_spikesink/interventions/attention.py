"""Attention interventions: remove sink keys from chosen heads, or gate heads' outputs.

- **Sink-key removal** at ``blocks.L.attn.hook_attn_scores`` (pre-softmax): the chosen key
  positions get -inf for the chosen heads, so each row renormalizes over the other keys. Key
  k is removed only for queries i > k, so a query always keeps its own key and no row is
  left empty (query 0 keeps key 0). Positions count from each sequence's first real token,
  found as the first query that can see its own key; with right padding
  (:meth:`Corpus.batches`' default) or no padding that is column 0, so position == column.
- **Window attention** at ``blocks.L.attn.hook_attn_scores`` (StreamingLLM / DuoAttention's
  "streaming heads"): each chosen head keeps only the first `sinks` keys and the `window` most
  recent keys (the query's own included); every other key gets -inf. Right padding (or none) is
  assumed, so positions are columns.
- **Attention gate** at ``blocks.L.attn.hook_z``: each chosen head's z is multiplied by a
  constant (default 0 on the scan's sink heads).

Every hook returns a new tensor; none writes into the one it is handed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float

from tl_spikesink.anatomy import hook_name
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.interventions.base import (
    Intervention,
    check_head_count,
    check_heads,
    check_layers,
    model_dims,
)
from tl_spikesink.probes.engine import HookFn

if TYPE_CHECKING:
    from tl_spikesink.probes.scan import ScanResult


def heads_by_layer(pairs: Sequence[tuple[int, int]]) -> dict[int, tuple[int, ...]]:
    """{layer: its heads} of (layer, head) pairs, in the order given."""
    out: dict[int, tuple[int, ...]] = {}
    for layer, head in pairs:
        out[layer] = (*out.get(layer, ()), head)
    return out


def score_hooks(
    per_layer: Mapping[int, Any], make: Callable[[Any], HookFn]
) -> tuple[tuple[str, HookFn], ...]:
    """One ``hook_attn_scores`` hook per layer, made from that layer's heads, in depth order."""
    return tuple((hook_name("attn_scores", la), make(per_layer[la])) for la in sorted(per_layer))


def sink_key_removal(
    scan: ScanResult | None = None,
    *,
    positions: Sequence[int] = (0,),
    heads: Literal["all", "sink"] | Sequence[tuple[int, int]] = "all",
    layers: Sequence[int] | None = None,
    model: Any = None,
    name: str | None = None,
) -> Intervention:
    """Mask the sink keys (default: the first token) in the attention scores of chosen heads.

    Args:
        scan: a clean scan, for ``heads="sink"`` and the model's size.
        positions: key positions to remove, counted from each sequence's first real token.
        heads: "all" heads, the scan's "sink" heads, or explicit (layer, head) pairs.
        layers: keep only heads in these layers (default: every layer).
        model: used for the model's size when no scan is given.
        name: the intervention's name in reports.
    """
    positions = tuple(int(p) for p in positions)
    if not positions or min(positions) < 0:
        raise SpikeSinkError(f"positions must be non-empty and non-negative, got {positions}")
    dims = model_dims(scan, model)
    if layers is not None:
        layers = tuple(int(x) for x in layers)
        check_layers(layers, dims, "sink_key_removal")
    per_layer: dict[int, tuple[int, ...] | None]  # None: every head of the layer
    if isinstance(heads, str) and heads == "all":
        if layers is None and dims.get("n_layers") is None:
            raise SpikeSinkError(
                "heads='all' needs the model's size: pass a scan, model= or layers="
            )
        per_layer = dict.fromkeys(layers if layers is not None else range(dims["n_layers"]))
        label = "all heads"
    else:
        if isinstance(heads, str) and heads == "sink":
            if scan is None:
                raise SpikeSinkError("heads='sink' needs a scan result (its sink heads)")
            pairs, label = scan.sinks.sink_heads, "sink heads"
        elif isinstance(heads, str):
            raise SpikeSinkError(
                f"heads must be 'all', 'sink' or (layer, head) pairs, got {heads!r}"
            )
        else:
            pairs, label = tuple((int(a), int(b)) for a, b in heads), "chosen heads"
        pairs = tuple(p for p in pairs if layers is None or p[0] in layers)
        check_heads(pairs, dims, "sink_key_removal")
        if not pairs:
            raise SpikeSinkError(f"sink_key_removal: no head selected ({label}); nothing to remove")
        per_layer = dict(heads_by_layer(pairs))
    hooks = score_hooks(per_layer, lambda heads: _sink_key_hook(positions, heads))
    return Intervention(
        name=name or f"no sink key ({label})",
        fwd_hooks=hooks,
        settings={
            "kind": "sink_key_removal",
            "positions": list(positions),
            "heads": heads if isinstance(heads, str) else [list(p) for p in heads],
            "layer_heads": {
                str(k): (None if v is None else list(v)) for k, v in sorted(per_layer.items())
            },
        },
        description=f"keys at positions {list(positions)} masked for later queries in {label}",
    )


def _sink_key_hook(positions: tuple[int, ...], heads: tuple[int, ...] | None) -> HookFn:
    def hook(scores: Float[torch.Tensor, "batch head query key"], hook: Any) -> torch.Tensor:
        b, h, q, k = scores.shape
        device = scores.device
        offset = k - q  # > 0 only when generating with a KV cache
        query = torch.arange(q, device=device) + offset
        key = torch.arange(k, device=device)
        if offset == 0:
            # First real token: the first query that sees its own key (left padding masks pads).
            own = scores[:, 0].diagonal(dim1=-2, dim2=-1)
            first = (own > torch.finfo(scores.dtype).min / 2).float().argmax(-1)
        else:
            first = torch.zeros(b, dtype=torch.long, device=device)
        cols = first[:, None] + torch.tensor(positions, device=device)[None, :]  # [batch, n_pos]
        removed = (key[None, None, :] == cols[..., None]).any(1)  # [batch, key]
        drop = removed[:, None, :] & (query[:, None] > key[None, :])[None]  # [batch, query, key]
        select = torch.ones(h, dtype=torch.bool, device=device)
        if heads is not None:
            check_head_count(heads, h, hook)
            select = torch.zeros(h, dtype=torch.bool, device=device)
            select[list(heads)] = True
        return scores.masked_fill(drop[:, None] & select[None, :, None, None], float("-inf"))

    return hook


def attention_gate(
    gates: Mapping[tuple[int, int], float] | None = None,
    scan: ScanResult | None = None,
    *,
    model: Any = None,
    name: str | None = None,
) -> Intervention:
    """Multiply the output z of chosen heads by constants (default: 0 on the scan's sink heads)."""
    if gates is None:
        if scan is None:
            raise SpikeSinkError("attention_gate needs gates= or a scan result (its sink heads)")
        if not scan.sinks.sink_heads:
            raise SpikeSinkError(
                f"the scan of {scan.model} found no sink head to gate; pass gates="
            )
        gates = dict.fromkeys(scan.sinks.sink_heads, 0.0)
    gates = {(int(a), int(b)): float(g) for (a, b), g in gates.items()}
    if not gates:
        raise SpikeSinkError("attention_gate: gates is empty; nothing to gate")
    check_heads(tuple(gates), model_dims(scan, model), "attention_gate")
    per_layer: dict[int, dict[int, float]] = {}
    for (layer, head), g in sorted(gates.items()):
        per_layer.setdefault(layer, {})[head] = g
    hooks = tuple(
        (hook_name("z", layer), _gate_hook(per_layer[layer])) for layer in sorted(per_layer)
    )
    return Intervention(
        name=name or "gate heads",
        fwd_hooks=hooks,
        settings={
            "kind": "attention_gate",
            "gates": [[lay, h, g] for (lay, h), g in sorted(gates.items())],
        },
        description=f"z of {len(gates)} head(s) scaled by constants",
    )


def _gate_hook(gates: dict[int, float]) -> HookFn:
    def hook(z: Float[torch.Tensor, "batch pos head d_head"], hook: Any) -> torch.Tensor:
        check_head_count(tuple(gates), z.shape[-2], hook)
        factor = torch.ones(z.shape[-2], dtype=z.dtype, device=z.device)
        factor[list(gates)] = torch.tensor(list(gates.values()), dtype=z.dtype, device=z.device)
        return z * factor[:, None]

    return hook


def window_attention(
    heads: Sequence[tuple[int, int]],
    window: int,
    *,
    sinks: int = 1,
    model: Any = None,
    name: str | None = None,
) -> Intervention:
    """Restrict chosen heads to the first `sinks` keys plus a recent window of `window` keys.

    Args:
        heads: (layer, head) pairs to restrict.
        window: keys i − window + 1 … i stay visible to query i.
        sinks: the first this many keys stay visible too (0: window attention alone).
        model: used to check the heads' range.
        name: the intervention's name in reports.
    """
    pairs = tuple((int(a), int(b)) for a, b in heads)
    if not pairs:
        raise SpikeSinkError("window_attention: no head chosen; pass (layer, head) pairs")
    if window < 1 or sinks < 0:
        raise SpikeSinkError(f"window must be ≥ 1 and sinks ≥ 0, got {window} and {sinks}")
    check_heads(pairs, model_dims(None, model), "window_attention")
    hooks = score_hooks(heads_by_layer(pairs), lambda heads: _window_hook(window, sinks, heads))
    return Intervention(
        name=name or f"window {window} + {sinks} sink(s) ({len(pairs)} heads)",
        fwd_hooks=hooks,
        settings={
            "kind": "window_attention",
            "window": window,
            "sinks": sinks,
            "heads": [list(p) for p in pairs],
        },
        description=f"{len(pairs)} head(s) see the first {sinks} and the last {window} keys",
    )


def _window_hook(window: int, sinks: int, heads: tuple[int, ...]) -> HookFn:
    def hook(scores: Float[torch.Tensor, "batch head query key"], hook: Any) -> torch.Tensor:
        _, h, q, k = scores.shape
        check_head_count(heads, h, hook)
        query = torch.arange(q, device=scores.device)[:, None] + (k - q)
        key = torch.arange(k, device=scores.device)[None, :]
        hidden = (key >= sinks) & (key <= query - window)  # [query, key]
        select = torch.zeros(h, dtype=torch.bool, device=scores.device)
        select[list(heads)] = True
        return scores.masked_fill(hidden[None, None] & select[None, :, None, None], float("-inf"))

    return hook


__all__ = ["attention_gate", "sink_key_removal", "window_attention"]
