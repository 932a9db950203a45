"""Single-weight edits done with hooks: prune or scale one MLP output weight (a super weight).

Yu et al. (2024) prune one weight of the MLP's output projection, W_out[i, o] in TransformerLens's
orientation ([d_mlp, d_model]; HF's ``down_proj.weight[o, i]``), and watch perplexity explode.
Here the weight itself is never written: at ``mlp.hook_post`` the hook keeps the neuron's
activation a_i, and at ``hook_mlp_out`` it subtracts (1 − scale)·a_i·W_out[i, o] from channel o,
which is exactly the output with W_out[i, o] scaled by `scale`. With `restore_above`, tokens whose
clean |output o| exceeds it keep their clean value (the paper's "prune the super weight, restore
the super activation"). Pre-norm blocks only: under sandwich norm the MLP output is normalized
again before ``hook_mlp_out``.
"""

from __future__ import annotations

from typing import Any

import torch

from tl_spikesink.anatomy import Anatomy, block_hook, hook_name
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.interventions.base import Intervention
from tl_spikesink.probes.engine import HookFn


def super_weight_edit(
    model: Any,
    layer: int,
    row: int,
    col: int,
    *,
    scale: float = 0.0,
    restore_above: float | None = None,
    name: str | None = None,
) -> Intervention:
    """Scale W_out[col, row] of layer `layer`'s MLP by `scale` (0: prune), through hooks.

    Args:
        model: the model whose weight is read (never written).
        layer: the block.
        row: output channel (residual stream), HF ``down_proj`` row.
        col: input channel (MLP neuron), HF ``down_proj`` column.
        scale: the factor the weight is scaled by (0 prunes it; Yu et al. sweep 0 … 3).
        restore_above: keep the clean output at tokens whose clean |output `row`| exceeds this.
        name: the intervention's name in reports.
    """
    a = Anatomy.of(model)
    if not 0 <= layer < a.n_layers:
        raise SpikeSinkError(f"layer {layer} out of range: the model has {a.n_layers} layers")
    if a.norm_placement != "pre":
        raise SpikeSinkError(
            f"super_weight_edit needs pre-norm blocks; {a.model_name} is {a.norm_placement}-norm, "
            "whose MLP output is normalized again before hook_mlp_out"
        )
    w_out = model.blocks[layer].mlp.W_out
    if not (0 <= col < w_out.shape[0] and 0 <= row < w_out.shape[1]):
        raise SpikeSinkError(
            f"weight ({row}, {col}) out of range: W_out of layer {layer} is "
            f"{tuple(w_out.shape)} (d_mlp, d_model), so row < {w_out.shape[1]}, col < "
            f"{w_out.shape[0]}"
        )
    weight = float(w_out[col, row].detach())
    kept: dict[str, torch.Tensor] = {}

    def keep(post: torch.Tensor, hook: Any) -> None:
        kept["a"] = post[..., col]

    def edit(out: torch.Tensor, hook: Any) -> torch.Tensor:
        change = (scale - 1.0) * kept.pop("a").to(out.dtype) * weight
        if restore_above is not None:
            change = torch.where(out[..., row].abs() > restore_above, 0.0, change)
        out = out.clone()
        out[..., row] += change
        return out

    hooks: tuple[tuple[str, HookFn], ...] = (
        (block_hook(layer, "mlp.hook_post"), keep),
        (hook_name("mlp_out", layer), edit),
    )
    what = "pruned" if scale == 0 else f"scaled by {scale:g}"
    restored = "" if restore_above is None else f", |output| > {restore_above:g} restored"
    return Intervention(
        name=name or f"W_out[{layer}] ({row}, {col}) {what}{restored}",
        fwd_hooks=hooks,
        settings={
            "kind": "super_weight_edit",
            "layer": layer,
            "row": row,
            "col": col,
            "value": weight,
            "scale": scale,
            "restore_above": restore_above,
        },
        description=f"layer {layer} MLP weight (out {row}, in {col}) = {weight:.4g} {what}",
    )


__all__ = ["super_weight_edit"]
