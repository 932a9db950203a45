"""Store a HookedTransformer's weights in the memory layout its forward pass multiplies with.

TransformerLens keeps weights in the interpretability convention (``W_in`` is
``[d_model, d_mlp]``, ``W_Q`` is ``[head, d_model, d_head]``) but multiplies with
``F.linear``, which wants ``[d_out, d_in]``. So every forward first copies each matrix into
that layout: ``GatedMLP`` calls ``W.T.contiguous()`` on ``W_gate``, ``W_in`` and ``W_out``,
``simple_attn_linear`` reshapes a permuted ``W_Q``/``W_K``/``W_V`` (a copy, since the permuted
axes cannot be merged in place), attention calls ``.contiguous()`` on a permuted ``W_O``, and
``Unembed`` calls ``W_U.T.contiguous()``. On SmolLM2-135M that is over 400 MB copied per pass.

:func:`fast_layout` stores each of those matrices as a permuted *view* of a tensor already in
the layout the forward asks for, so the permute/transpose gives back a contiguous tensor and
the copy becomes a no-op. Shapes, values, parameter objects and ``state_dict`` keys stay the
same, and ``F.linear`` receives a weight with the very same layout as before, so outputs and
gradients are bit-identical. See docs/fast_layout.md.

The einsum paths that ``use_split_qkv_input``/``use_attn_in`` (Q/K/V) and ``use_attn_result``
(W_O) switch on read the same weights with other strides, which changes the BLAS call and so
the float rounding (by about 1e-7 relative). Weights those flags read at the time of the call
are left alone; for a flag switched on later, :func:`standard_layout` restores the layout
TransformerLens creates.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch
from torch import nn
from transformer_lens import HookedTransformer
from transformer_lens.components import Attention, GroupedQueryAttention, Unembed
from transformer_lens.components.mlps.gated_mlp import GatedMLP

TRANSPOSE = (1, 0)
"""``[d_in, d_out]`` weights used as ``W.T`` by ``F.linear`` (gated MLP, unembedding)."""
QKV_ORDER = (0, 2, 1)
"""``simple_attn_linear`` reads ``[head, d_model, d_head]`` as ``[head, d_head, d_model]``."""
OUT_ORDER = (2, 0, 1)
"""The attention output reads ``W_O [head, d_head, d_model]`` as ``[d_model, head, d_head]``."""


def fast_layout(model: HookedTransformer) -> HookedTransformer:
    """Re-store `model`'s weights, in place, so the forward pass stops copying them.

    Only the components whose forward is known to copy are touched (exact TransformerLens
    classes, not subclasses that may multiply differently); plain MLPs multiply with
    ``addmm`` on the stored layout and are left alone, as are 4-bit weights, parameters that
    share storage with another (re-storing one would silently untie them), and the attention
    weights that the einsum paths enabled in ``model.cfg`` read (see the module docstring).
    Calling it again is a no-op. Returns `model`, for chaining.
    """
    with torch.no_grad():
        shared = _shared_storages(model)
        for param, order in _relayout_targets(model):
            if _storage_key(param) not in shared:
                _restride(param, order)
    return model


def standard_layout(model: HookedTransformer) -> HookedTransformer:
    """Undo :func:`fast_layout`: make every parameter contiguous in its own shape again.

    For switching on ``use_split_qkv_input``, ``use_attn_in`` or ``use_attn_result`` after
    :func:`fast_layout` when results must match a model never re-stored to the last bit.
    Returns `model`, for chaining.
    """
    with torch.no_grad():
        shared = _shared_storages(model)
        for param in model.parameters():
            if not param.is_contiguous() and _storage_key(param) not in shared:
                param.data = param.detach().contiguous()
    return model


def _relayout_targets(model: HookedTransformer) -> Iterator[tuple[nn.Parameter, tuple[int, ...]]]:
    cfg = model.cfg
    if cfg.load_in_4bit:
        return
    einsum_qkv = cfg.use_split_qkv_input or cfg.use_attn_in
    for block in model.blocks:
        attn = block.attn
        if type(attn) is Attention:
            qkv = (attn.W_Q, attn.W_K, attn.W_V)
        elif type(attn) is GroupedQueryAttention:
            # Unless ungrouped, the forward multiplies the stored _W_K/_W_V; the ungrouped
            # W_K is a repeat_interleave copy, which no layout saves.
            qkv = (attn.W_Q, attn._W_K, attn._W_V)
        else:
            qkv = ()
        if qkv and not einsum_qkv:
            yield from ((w, QKV_ORDER) for w in qkv)
        if qkv and not cfg.use_attn_result:
            yield attn.W_O, OUT_ORDER
        if type(block.mlp) is GatedMLP:
            yield from ((block.mlp.W_gate, TRANSPOSE), (block.mlp.W_in, TRANSPOSE))
            yield block.mlp.W_out, TRANSPOSE
    if type(model.unembed) is Unembed:
        yield model.unembed.W_U, TRANSPOSE


def _restride(param: nn.Parameter, order: tuple[int, ...]) -> None:
    # `storage` is contiguous in the layout the forward reads; `param` becomes the view of it
    # with the original shape. contiguous() is free when the layout is already right.
    storage = param.detach().permute(order).contiguous()
    inverse = tuple(sorted(range(len(order)), key=order.__getitem__))
    param.data = storage.permute(inverse)


def _storage_key(param: torch.Tensor) -> tuple[str, int]:
    return str(param.device), param.untyped_storage().data_ptr()


def _shared_storages(model: nn.Module) -> set[tuple[str, int]]:
    counts = Counter(_storage_key(p) for p in model.parameters())
    return {key for key, n in counts.items() if n > 1}
