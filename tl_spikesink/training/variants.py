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
* ``qk_norm``: RMSNorm on every head's queries and keys (TransformerLens's ``use_qk_norm``).
* ``ffn``: the MLP: SwiGLU (the baseline), GeLU or linear (not gated, d_mlp × 1.5 so that the
  parameter count stays), or none (attention-only).
* ``gate``: a sigmoid gate on each head's output (Qiu et al. 2025), σ(g), multiplying the head's
  ``hook_z`` (so ``hook_z`` shows what the output projection reads). Its input g is the block's
  normalized input x̂ ("input": conditioned on the representation, σ(x̂ W_gate + b_gate)), nothing
  ("constant": σ(b_gate)), the position ("positional": a learned table over positions) or the
  current token's embedding ("token": σ(e W_gate + b_gate), e = ``hook_embed``). ``gate_shape``
  says how many gates: one per head ("head"), one per channel of each head ("channel", Qiu
  et al.'s elementwise gate) or one for all heads ("single").
* ``d_head`` alone: head dimension at fixed width (n_heads = d_model / d_head); with ``n_heads``
  as well, both are as given and the attention width n_heads · d_head differs from d_model.
* Training-regime knobs read by the training loop: ``context`` (mixed short and long sequences,
  or full-length ones only), ``seq_scale`` (sequence length as a multiple of the config's),
  ``loss_from`` (the loss only at positions ≥ loss_from × the config's length, the paper's
  Table 8), ``weight_decay``, ``lr_scale``, ``min_lr_ratio``, ``beta2`` and ``token_scale``
  (training steps, so tokens, as a multiple of the config's).
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

from tl_spikesink.config import at_least, check_fields
from tl_spikesink.errors import SpikeSinkError

NormPlacement = Literal["pre", "sandwich", "post", "dyt"]
Gate = Literal["none", "input", "constant", "positional", "token"]
GateShape = Literal["head", "channel", "single"]
Ffn = Literal["swiglu", "gelu", "linear", "none"]
Context = Literal["mixed", "long"]
NORMS: tuple[str, ...] = get_args(NormPlacement)
GATES: tuple[str, ...] = get_args(Gate)
GATE_SHAPES: tuple[str, ...] = get_args(GateShape)
FFNS: tuple[str, ...] = get_args(Ffn)
CONTEXTS: tuple[str, ...] = get_args(Context)
UNGATED_MLP_SCALE = 1.5
"""d_mlp of a non-gated MLP (GeLU, linear) relative to SwiGLU's: 2·d·1.5m = 3·d·m parameters."""


@dataclass(frozen=True)
class Variant:
    """One row of the ablation table: an architecture and a training regime."""

    name: str = "baseline"
    norm: NormPlacement = "pre"
    """Where and which normalization (see the module docstring)."""
    qk_norm: bool = False
    """RMSNorm on each head's queries and keys."""
    ffn: Ffn = "swiglu"
    """The MLP: SwiGLU, GeLU, linear, or none (attention-only)."""
    gate: Gate = "none"
    """Sigmoid gate on each head's output and what it reads (see the module docstring)."""
    gate_shape: GateShape = "head"
    """One gate per head, per channel of each head, or one for all heads."""
    d_head: int | None = None
    """Head dimension (default: the training config's); n_heads = d_model / d_head unless
    `n_heads` is set too."""
    n_heads: int | None = None
    """Number of heads at the given (or the config's) d_head: the attention width changes."""
    context: Context = "mixed"
    """"mixed": each step draws a sequence length from {L/8, L/4, L/2, L} (short and long
    contexts, as in pretraining on documents of every length); "long": every sequence has the
    full training length L (the paper's regime)."""
    seq_scale: float = 1.0
    """Training length L as a multiple of the config's seq_len."""
    loss_from: float = 0.0
    """The loss counts only the tokens at positions ≥ loss_from × the config's seq_len (BOS
    is position 0); every sequence keeps its full length (the paper's Table 8 rows)."""
    weight_decay: float | None = None
    """AdamW weight decay (default: the training config's)."""
    lr_scale: float = 1.0
    """Peak learning rate as a multiple of the config's."""
    min_lr_ratio: float | None = None
    """Final learning rate over the peak (default: the config's; 1: no decay)."""
    beta2: float | None = None
    """AdamW β2 (default: the config's)."""
    token_scale: float = 1.0
    """Training steps (so tokens seen) as a multiple of the config's."""
    dyt_alpha: float = 0.5
    """Initial α of DynamicTanh (Zhu et al.'s default)."""

    def __post_init__(self) -> None:
        check_fields(self)
        at_least(self, {"d_head": 1, "n_heads": 1, "weight_decay": 0})
        for field_name in ("seq_scale", "lr_scale", "token_scale"):
            if not getattr(self, field_name) > 0:
                raise SpikeSinkError(
                    f"Variant.{field_name} must be positive, got {getattr(self, field_name)}"
                )
        if not 0 <= self.loss_from < self.seq_scale:
            raise SpikeSinkError(
                f"Variant.loss_from must lie in [0, seq_scale={self.seq_scale}), got "
                f"{self.loss_from}: some positions must keep their loss"
            )
        if self.min_lr_ratio is not None and not 0 <= self.min_lr_ratio <= 1:
            raise SpikeSinkError(
                f"Variant.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}"
            )
        if self.beta2 is not None and not 0 < self.beta2 < 1:
            raise SpikeSinkError(f"Variant.beta2 must lie in (0, 1), got {self.beta2}")
        if self.gate == "none" and self.gate_shape != "head":
            raise SpikeSinkError("Variant.gate_shape needs a gate; set gate= as well")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Variant:
        """The variant :meth:`to_dict` wrote (older records lack the newer fields)."""
        return cls(**d)

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
    """Attention whose head outputs (``hook_z``) are multiplied by a sigmoid gate.

    The gate's input (`kind`): "input", the block's normalized input x̂ (the query input),
    σ(x̂ W_gate + b_gate); "constant", nothing, σ(b_gate); "positional", the position,
    σ(P_gate[pos]); "token", the current token's embedding e (set on ``embedding`` by the model's
    embedding hook, see :func:`build_model`), σ(e W_gate + b_gate). Its `shape`: one gate per
    head, per channel of each head, or one shared by all heads. ``hook_gate`` sees the gate as
    [batch, pos, head] (head, single) or [batch, pos, head, d_head] (channel).
    """

    def __init__(
        self,
        cfg: HookedTransformerConfig,
        layer_id: int,
        input_dependent: bool = True,
        *,
        kind: str | None = None,
        shape: str = "head",
    ):
        super().__init__(cfg, "global", layer_id)
        self.kind = kind or ("input" if input_dependent else "constant")
        self.shape = shape
        self.input_dependent = self.kind == "input"
        width = {"head": cfg.n_heads, "channel": cfg.n_heads * cfg.d_head, "single": 1}[shape]
        if self.kind in ("input", "token"):
            self.W_gate = nn.Parameter(torch.zeros(cfg.d_model, width))
        if self.kind == "positional":
            self.P_gate = nn.Parameter(torch.zeros(cfg.n_ctx, width))
        else:
            self.b_gate = nn.Parameter(torch.zeros(width))
        self.hook_gate = HookPoint()
        self.embedding: torch.Tensor | None = None
        self._gate: torch.Tensor | None = None

    def gate(self, x: Float[torch.Tensor, "batch pos d_model"]) -> torch.Tensor:
        """The gate for normalized block input `x`, shaped as ``hook_gate`` sees it."""
        if self.kind == "input":
            logits = x @ self.W_gate + self.b_gate
        elif self.kind == "token":
            if self.embedding is None or self.embedding.shape[:-1] != x.shape[:-1]:
                raise SpikeSinkError(
                    "a token-embedding gate reads the model's hook_embed output; run the whole "
                    "model (build_model wires it), not the attention module alone"
                )
            logits = self.embedding.to(x.dtype) @ self.W_gate + self.b_gate
        elif self.kind == "positional":
            logits = self.P_gate[: x.shape[-2]].expand(*x.shape[:-1], -1)
        else:
            logits = self.b_gate.expand(*x.shape[:-1], -1)
        gate = torch.sigmoid(logits)
        if self.shape == "channel":
            gate = gate.reshape(*x.shape[:-1], self.cfg.n_heads, self.cfg.d_head)
        elif self.shape == "single":
            gate = gate.expand(*x.shape[:-1], self.cfg.n_heads)
        return self.hook_gate(gate)

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
            gate = self._gate if self.shape == "channel" else self._gate[..., None]
            z = z * gate.to(z.dtype)
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
    if variant.n_heads is not None:
        n_heads = variant.n_heads
    elif d_model % d_head:
        raise SpikeSinkError(
            f"d_head={d_head} does not divide d_model={d_model}; pick a divisor of d_model "
            "(or set n_heads as well, for an attention width other than d_model)"
        )
    else:
        n_heads = d_model // d_head
    if d_head % 2:
        raise SpikeSinkError(f"rotary positions need an even d_head, got {d_head}")
    gated = variant.ffn == "swiglu"
    return HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_head,
        d_mlp=d_mlp if gated else round(d_mlp * UNGATED_MLP_SCALE),
        d_vocab=d_vocab,
        n_ctx=n_ctx,
        act_fn="silu" if gated else "gelu",
        gated_mlp=gated,
        attn_only=variant.ffn == "none",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        use_normalization_before_and_after=variant.norm == "sandwich",
        use_qk_norm=variant.qk_norm,
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
    if variant.ffn == "linear":
        for block in model.blocks:
            block.mlp.act_fn = nn.Identity()
    if variant.gate != "none":
        for i, block in enumerate(model.blocks):
            new = GatedAttention(cfg, i, kind=variant.gate, shape=variant.gate_shape)
            new.load_state_dict(block.attn.state_dict(), strict=False)
            if hasattr(new, "W_gate"):
                with torch.no_grad():
                    w = torch.randn(new.W_gate.shape, generator=gen) * cfg.initializer_range
                    new.W_gate.copy_(w)
            block.attn = new
        if variant.gate == "token":
            gated = [block.attn for block in model.blocks]

            def share_embedding(module: nn.Module, args: Any, output: torch.Tensor) -> None:
                for attn in gated:
                    attn.embedding = output

            # A torch hook, not a TransformerLens one: reset_hooks() must not remove it.
            model.embed.register_forward_hook(share_embedding)
    model.setup()  # refresh hook_dict / mod_dict with the swapped modules' hook points
    return model


__all__ = [
    "FFNS",
    "GATES",
    "GATE_SHAPES",
    "DynamicTanh",
    "GatedAttention",
    "PostNormBlock",
    "VARIANTS",
    "Variant",
    "build_model",
    "model_config",
    "variant",
]
