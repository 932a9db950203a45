"""Model variants for the ablations: one design choice changed, TransformerLens hook names kept.

Every variant is a plain :class:`~transformer_lens.HookedTransformer` (Llama-style: RMSNorm,
SwiGLU MLP, rotary positions) built from a config, with at most a few modules swapped after
construction. The swapped modules keep the hook points of the modules they replace, so the scan,
the sink probe, the interventions and every view work on a variant unchanged.

* ``norm="pre"``: pre-norm RMSNorm, the baseline (x + f(RMSNorm(x))).
* ``norm="sandwich"``: TransformerLens's ``use_normalization_before_and_after`` (Gemma 2): an
  extra RMSNorm (``ln1_post`` / ``ln2_post``) on each sublayer's output before the residual add.
* ``norm="post"``: the original Transformer's post-norm, RMSNorm(x + f(x)): the residual stream
  itself is normalized after every sublayer, so ``hook_resid_mid`` / ``hook_resid_post`` see the
  normalized stream.
* ``norm="dyt"``: DynamicTanh (Zhu et al. 2025), γ·tanh(α·x) + β with a learned scalar α, in
  place of every RMSNorm (pre-norm placement).
* ``gate="input"``: a per-head sigmoid gate on the attention output computed from the block's
  normalized input, σ(x̂ W_gate + b_gate) (Qiu et al. 2025, head-wise): it multiplies the head's
  ``hook_z``, so ``hook_z`` shows what the output projection reads.
* ``gate="constant"``: the input-independent control, σ(b_gate) per head.
* ``d_head``: head dimension at fixed width (n_heads = d_model / d_head).
* ``context`` and ``weight_decay``: training-regime knobs read by the training loop (mixed
  short and long sequences, or long ones only; AdamW decay on or off).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float
from torch import nn
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.components import Attention, TransformerBlock
from transformer_lens.hook_points import HookPoint

from tl_spikesink.errors import SpikeSinkError

NormPlacement = Literal["pre", "sandwich", "post", "dyt"]
Gate = Literal["none", "input", "constant"]
Context = Literal["mixed", "long"]
NORMS: tuple[str, ...] = get_args(NormPlacement)
GATES: tuple[str, ...] = get_args(Gate)
CONTEXTS: tuple[str, ...] = get_args(Context)


@dataclass(frozen=True)
class Variant:
    """One row of the ablation table: an architecture and a training regime."""

    name: str = "baseline"
    norm: NormPlacement = "pre"
    """Where and which normalization (see the module docstring)."""
    gate: Gate = "none"
    """Sigmoid gate on each head's output: none, input-dependent, or a learned constant."""
    d_head: int | None = None
    """Head dimension (default: the training config's); n_heads = d_model / d_head."""
    context: Context = "mixed"
    """"mixed": each step draws a sequence length from {L/8, L/4, L/2, L} (short and long
    contexts, as in pretraining on documents of every length); "long": every sequence has the
    full training length L (the paper's long-context-only regime, which collapses sinks)."""
    weight_decay: float | None = None
    """AdamW weight decay (default: the training config's)."""
    dyt_alpha: float = 0.5
    """Initial α of DynamicTanh (Zhu et al.'s default)."""

    def __post_init__(self) -> None:
        for field_name, value, allowed in (
            ("norm", self.norm, NORMS),
            ("gate", self.gate, GATES),
            ("context", self.context, CONTEXTS),
        ):
            if value not in allowed:
                raise SpikeSinkError(
                    f"Variant.{field_name} must be one of {allowed}, got {value!r}"
                )
        if self.d_head is not None and self.d_head < 1:
            raise SpikeSinkError(f"Variant.d_head must be positive, got {self.d_head}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise SpikeSinkError(f"Variant.weight_decay must be >= 0, got {self.weight_decay}")

    def to_dict(self) -> dict[str, Any]:
        """The variant as plain data (checkpoints and reports keep it)."""
        return asdict(self)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("baseline"),
        Variant("sandwich", norm="sandwich"),
        Variant("post_norm", norm="post"),
        Variant("dyt", norm="dyt"),
        Variant("gate_input", gate="input"),
        Variant("gate_constant", gate="constant"),
        Variant("d_head_8", d_head=8),
        Variant("d_head_32", d_head=32),
        Variant("d_head_64", d_head=64),
        Variant("context_long", context="long"),
        Variant("no_weight_decay", weight_decay=0.0),
    )
}
"""The named variants `tl-spikesink ablate --variants` knows (baseline: pre-norm RMSNorm, no gate,
the config's d_head, mixed context lengths, the config's weight decay)."""


def variant(name_or_variant: str | Variant) -> Variant:
    """Look a variant up by name (or pass one through)."""
    if isinstance(name_or_variant, Variant):
        return name_or_variant
    if name_or_variant not in VARIANTS:
        raise SpikeSinkError(
            f"unknown variant {name_or_variant!r}; choose from {', '.join(VARIANTS)} "
            "or pass a Variant(...)"
        )
    return VARIANTS[name_or_variant]


class DynamicTanh(nn.Module):
    """γ·tanh(α·x) + β (Zhu et al. 2025), with TransformerLens-style parameter and hook names.

    ``w`` is γ and ``b`` is β (as in TransformerLens's norms); ``hook_normalized`` sees tanh(α·x)
    before the affine part, like RMSNorm's ``hook_normalized`` sees x / rms before its weight.
    """

    def __init__(self, length: int, alpha: float = 0.5) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.w = nn.Parameter(torch.ones(length))
        self.b = nn.Parameter(torch.zeros(length))
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[torch.Tensor, "... d"]) -> Float[torch.Tensor, "... d"]:
        """γ·tanh(α·x) + β."""
        return self.hook_normalized(torch.tanh(self.alpha * x)) * self.w + self.b


class GatedAttention(Attention):
    """Attention whose head outputs (``hook_z``) are multiplied by a per-head sigmoid gate.

    Input-dependent: gate = σ(x̂ W_gate + b_gate), x̂ the block's normalized input (the query
    input), one scalar per (token, head). Constant: gate = σ(b_gate), one scalar per head.
    ``hook_gate`` sees the gate, shaped [batch, pos, head].
    """

    def __init__(self, cfg: HookedTransformerConfig, layer_id: int, input_dependent: bool):
        super().__init__(cfg, "global", layer_id)
        self.input_dependent = input_dependent
        if input_dependent:
            self.W_gate = nn.Parameter(torch.zeros(cfg.d_model, cfg.n_heads))
        self.b_gate = nn.Parameter(torch.zeros(cfg.n_heads))
        self.hook_gate = HookPoint()
        self._gate: torch.Tensor | None = None

    def gate(
        self, x: Float[torch.Tensor, "batch pos d_model"]
    ) -> Float[torch.Tensor, "batch pos head"]:
        """The gate for normalized block input `x`."""
        logits = self.b_gate.expand(*x.shape[:-1], -1)
        if self.input_dependent:
            logits = x @ self.W_gate + self.b_gate
        return self.hook_gate(torch.sigmoid(logits))

    def forward(self, query_input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Attention with gated head outputs (same signature as TransformerLens's)."""
        # The gate must be known inside calculate_z_scores, which the parent's forward calls;
        # it lives only for this call.
        self._gate = self.gate(query_input)
        try:
            return super().forward(query_input, *args, **kwargs)
        finally:
            self._gate = None

    def calculate_z_scores(
        self,
        v: Float[torch.Tensor, "batch key_pos head d_head"],
        pattern: Float[torch.Tensor, "batch head query_pos key_pos"],
    ) -> Float[torch.Tensor, "batch query_pos head d_head"]:
        """Σ_j A_ij v_j per head, times the gate, before ``hook_z`` (so hooks see the gated z)."""
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        if self._gate is not None:
            z = z * self._gate[..., None].to(z.dtype)
        return self.hook_z(z)


class PostNormBlock(TransformerBlock):
    """The original Transformer's block: RMSNorm(x + attn(x)), then RMSNorm(h + mlp(h)).

    ``ln1`` and ``ln2`` keep their names but act after the residual add, so
    ``hook_resid_mid`` and ``hook_resid_post`` see the normalized stream.
    """

    norm_placement = "post"
    """Read by :class:`~tl_spikesink.anatomy.Anatomy`: the config still says pre-norm."""

    def forward(
        self,
        resid_pre: Float[torch.Tensor, "batch pos d_model"],
        shortformer_pos_embed: torch.Tensor | None = None,
        past_kv_cache_entry: Any = None,
        attention_mask: torch.Tensor | None = None,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """One post-norm block."""
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(
            self.attn(
                query_input=resid_pre,
                key_input=resid_pre,
                value_input=resid_pre,
                past_kv_cache_entry=past_kv_cache_entry,
                attention_mask=attention_mask,
            )
        )
        resid_mid = self.hook_resid_mid(self.ln1(resid_pre + attn_out))
        mlp_out = self.hook_mlp_out(self.mlp(resid_mid))
        return self.hook_resid_post(self.ln2(resid_mid + mlp_out))


def model_config(
    variant: Variant,
    *,
    n_layers: int,
    d_model: int,
    d_head: int,
    d_mlp: int,
    d_vocab: int,
    n_ctx: int,
    seed: int,
    name: str | None = None,
) -> HookedTransformerConfig:
    """The TransformerLens config of `variant` at the given size (before any module swap)."""
    d_head = variant.d_head or d_head
    if d_model % d_head:
        raise SpikeSinkError(
            f"d_head={d_head} does not divide d_model={d_model}; pick a divisor of d_model"
        )
    return HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=d_model // d_head,
        d_head=d_head,
        d_mlp=d_mlp,
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        use_normalization_before_and_after=variant.norm == "sandwich",
        default_prepend_bos=True,
        model_name=name or f"tl-spikesink/{variant.name}",
        seed=seed,
    )


def build_model(
    variant: Variant, cfg: HookedTransformerConfig, tokenizer: Any = None
) -> HookedTransformer:
    """A freshly initialized `variant` from `cfg` (see :func:`model_config`); seeded by cfg.seed.

    The swaps run after TransformerLens's own initialization, each from a generator seeded by
    cfg.seed, so the same config and variant always give the same weights.
    """
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    gen = torch.Generator().manual_seed(int(cfg.seed or 0) + 1)
    if variant.norm == "dyt":
        for block in model.blocks:
            block.ln1 = DynamicTanh(cfg.d_model, variant.dyt_alpha)
            block.ln2 = DynamicTanh(cfg.d_model, variant.dyt_alpha)
        model.ln_final = DynamicTanh(cfg.d_model, variant.dyt_alpha)
    if variant.norm == "post":
        for i, old in enumerate(model.blocks):
            new = PostNormBlock(cfg, i)
            new.load_state_dict(old.state_dict())
            model.blocks[i] = new
    if variant.gate != "none":
        for i, block in enumerate(model.blocks):
            new = GatedAttention(cfg, i, input_dependent=variant.gate == "input")
            new.load_state_dict(block.attn.state_dict(), strict=False)
            if new.input_dependent:
                with torch.no_grad():
                    w = torch.randn(new.W_gate.shape, generator=gen) * cfg.initializer_range
                    new.W_gate.copy_(w)
            block.attn = new
    model.setup()  # refresh hook_dict / mod_dict with the swapped modules' hook points
    return model


__all__ = [
    "DynamicTanh",
    "GatedAttention",
    "PostNormBlock",
    "VARIANTS",
    "Variant",
    "build_model",
    "model_config",
    "variant",
]
