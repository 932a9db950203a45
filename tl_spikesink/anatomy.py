"""Model anatomy: hook names and the facts analyses ask of a model, answered in one place.

Every hook name in the package is built here, so HookedTransformer, HookedSAETransformer and
TransformerBridge (which keeps TransformerLens names in compatibility mode) look the same to the
analyses, and a model that lacks a hook point fails with one clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from tl_spikesink.errors import SpikeSinkError

Site = Literal[
    "resid_pre",
    "resid_post",
    "attn_out",
    "mlp_out",
    "pattern",
    "attn_scores",
    "z",
    # Norm internals, hooked by the norm-swap interventions: `scale` is the divisor
    # sqrt(mean(x²) + eps), `normalized` is x / scale before the weight.
    "ln1_scale",
    "ln1_normalized",
    "ln2_scale",
    "ln2_normalized",
    "ln1_post_scale",
    "ln1_post_normalized",
    "ln2_post_scale",
    "ln2_post_normalized",
    "ln_final_scale",
    "ln_final_normalized",
]
SITES: tuple[Site, ...] = get_args(Site)

_TEMPLATES: dict[Site, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "pattern": "blocks.{layer}.attn.hook_pattern",
    "attn_scores": "blocks.{layer}.attn.hook_attn_scores",
    "z": "blocks.{layer}.attn.hook_z",
    "ln1_scale": "blocks.{layer}.ln1.hook_scale",
    "ln1_normalized": "blocks.{layer}.ln1.hook_normalized",
    "ln2_scale": "blocks.{layer}.ln2.hook_scale",
    "ln2_normalized": "blocks.{layer}.ln2.hook_normalized",
    "ln1_post_scale": "blocks.{layer}.ln1_post.hook_scale",
    "ln1_post_normalized": "blocks.{layer}.ln1_post.hook_normalized",
    "ln2_post_scale": "blocks.{layer}.ln2_post.hook_scale",
    "ln2_post_normalized": "blocks.{layer}.ln2_post.hook_normalized",
    "ln_final_scale": "ln_final.hook_scale",
    "ln_final_normalized": "ln_final.hook_normalized",
}


def hook_name(site: Site, layer: int | None = None) -> str:
    """The TransformerLens hook name of `site` in block `layer` (None for `ln_final_*` sites).

    >>> hook_name("resid_post", 3)
    'blocks.3.hook_resid_post'
    >>> hook_name("pattern", 0)
    'blocks.0.attn.hook_pattern'
    >>> hook_name("ln_final_scale")
    'ln_final.hook_scale'
    """
    if site not in _TEMPLATES:
        raise SpikeSinkError(f"unknown hook site {site!r}; choose one of {SITES}")
    template = _TEMPLATES[site]
    if layer is None and "{layer}" in template:
        raise SpikeSinkError(f"hook site {site!r} lives in a block; pass its layer")
    return template.format(layer=layer)


def block_hook(layer: int | None, path: str) -> str:
    """A hook name by its path under ``blocks.{layer}``, for points beyond :func:`hook_name`'s sites.

    >>> block_hook(3, "mlp.hook_pre")
    'blocks.3.mlp.hook_pre'
    >>> block_hook(None, "ln_final.hook_scale")
    'ln_final.hook_scale'
    """
    return path if layer is None else f"blocks.{layer}.{path}"


Component = Literal["attn", "mlp"]
"""The two sublayers of a TransformerLens block."""


def paper_block(layer: int, component: Component) -> int:
    """The seed paper's block number of a TransformerLens sublayer (Sun et al. 2026, §2.2).

    The paper counts a model of L layers as 2L residual blocks, 1-indexed, attention at odd and
    FFN at even numbers: TransformerLens layer ``layer`` (0-indexed) holds attention block
    ``2 * layer + 1`` and FFN block ``2 * layer + 2``. Its Table 1 (step-up / step-down blocks)
    uses these numbers.

    >>> paper_block(0, "attn")
    1
    >>> paper_block(0, "mlp")
    2
    >>> paper_block(11, "mlp")
    24

    Raises:
        SpikeSinkError: `layer` is negative or `component` is neither "attn" nor "mlp".
    """
    if component not in ("attn", "mlp"):
        raise SpikeSinkError(f"component must be 'attn' or 'mlp', got {component!r}")
    if int(layer) < 0:
        raise SpikeSinkError(f"layer must be >= 0, got {layer}")
    return 2 * int(layer) + (1 if component == "attn" else 2)


@dataclass(frozen=True)
class Anatomy:
    """What the analyses need to know about a model, read once from its config."""

    model_name: str
    n_layers: int
    n_heads: int
    d_model: int
    n_ctx: int
    normalization_type: str | None
    """The config's norm ("RMS", "LN", ...), or the class name of a norm module that replaced
    it after construction (a DynamicTanh variant reports "DynamicTanh", not "RMS")."""
    gated_mlp: bool
    prepend_bos: bool
    causal: bool = True
    """False for encoders (BERT), whose queries also attend to later keys."""
    norm_placement: str = "pre"
    """Where the norms sit: "pre" (x + f(norm(x))), "sandwich" (x + norm(f(norm(x)))) or
    "post" (norm(x + f(x)), the original Transformer and BERT)."""

    @property
    def rms_norm(self) -> bool:
        """Whether the norms are RMSNorm (gains folded into the weights or not)."""
        return self.normalization_type in ("RMS", "RMSPre")

    @classmethod
    def of(cls, model: Any) -> Anatomy:
        """Read the anatomy of a HookedTransformer-like model (anything with `cfg` and hooks)."""
        cfg = getattr(model, "cfg", None)
        if cfg is None or not hasattr(model, "hook_dict"):
            raise SpikeSinkError(
                f"{type(model).__name__} is not a TransformerLens model (no `cfg` / `hook_dict`); "
                "pass a HookedTransformer, HookedSAETransformer or TransformerBridge "
                "(e.g. tl_spikesink.load('smollm2-135m'))"
            )
        check_weights(model)
        return cls(
            model_name=str(getattr(cfg, "model_name", None) or type(model).__name__),
            n_layers=int(cfg.n_layers),
            n_heads=int(cfg.n_heads),
            d_model=int(cfg.d_model),
            n_ctx=int(cfg.n_ctx),
            normalization_type=_norm_type(model, cfg),
            gated_mlp=bool(getattr(cfg, "gated_mlp", False)),
            prepend_bos=bool(getattr(cfg, "default_prepend_bos", True)),
            causal=getattr(cfg, "attention_dir", "causal") != "bidirectional",
            norm_placement=_norm_placement(model, cfg),
        )


def check_weights(model: Any) -> None:
    """Refuse weights that cannot give a meaningful scan: not loaded (meta), or float16.

    float16 saturates at 65,504, below the massive activations this package measures (SmolLM2's
    reach 2.6e4 and Gemma 3's 1e5), so spikes would turn into inf or be clipped unseen.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        return
    # The module tree walked by hand: `parameters()` builds every module's name on the way,
    # 1.5 ms for a SmolLM2 against 0.3, and a scan checks three times.
    dtypes, meta, stack = set(), False, [model]
    while stack:
        module = stack.pop()
        for p in module._parameters.values():
            if p is not None:
                dtypes.add(p.dtype)
                meta |= p.is_meta
        stack.extend(module._modules.values())
    if meta:
        raise SpikeSinkError(
            f"{type(model).__name__} has weights on the meta device (shapes only, no values); "
            "load its weights first, e.g. model.to_empty(device='cpu') then load_state_dict"
        )
    if torch.float16 in dtypes:
        raise SpikeSinkError(
            "the model is in float16, whose largest value (65,504) is below the massive "
            "activations being measured; use model.to(torch.float32) or model.to(torch.bfloat16)"
        )


def _first_block(model: Any) -> Any:
    blocks = getattr(model, "blocks", None)
    return blocks[0] if blocks is not None and len(blocks) else None


def _norm_type(model: Any, cfg: Any) -> str | None:
    # A module swapped in after construction (training variants) leaves the config unchanged;
    # an analysis that trusts the config would treat DynamicTanh as RMSNorm.
    # TransformerLens's own norms (RMSNorm, LayerNormPre, ...; Identity without one) are what
    # the config says.
    ln = getattr(_first_block(model), "ln1", None)
    name = type(ln).__name__
    if ln is not None and "Norm" not in name and name != "Identity":
        return name
    return getattr(cfg, "normalization_type", None)


def _norm_placement(model: Any, cfg: Any) -> str:
    block = _first_block(model)
    declared = getattr(block, "norm_placement", None)
    if declared is not None:
        return str(declared)
    if type(block).__name__ == "BertBlock":
        return "post"
    return "sandwich" if getattr(cfg, "use_normalization_before_and_after", False) else "pre"


NORM_SCALE_ATTR = "tl_spikesink_first_norm_scale"
"""Attribute where :func:`tl_spikesink.load` keeps layer 0's ln1 gain, which ``fold_ln`` folds away."""


def first_norm_scale(model: Any) -> Any:
    """The learned gain γ of layer 0's pre-attention norm, or None where it cannot be known.

    What :func:`tl_spikesink.load` recorded before folding, else the norm's own weight when it
    is unfolded (``normalization_type`` "RMS"/"LN"); None for a model loaded another way with
    folded norms.
    """
    recorded = getattr(model, NORM_SCALE_ATTR, None)
    if recorded is not None:
        return recorded
    w = getattr(getattr(_first_block(model), "ln1", None), "w", None)
    if w is not None and getattr(model.cfg, "normalization_type", None) in ("RMS", "LN"):
        return w.detach()
    return None


def require_hooks(model: Any, sites: tuple[Site, ...], layers: range, analysis: str) -> None:
    """Fail early, naming the missing hook, if `model` lacks a hook point an analysis needs."""
    available = model.hook_dict
    for site in sites:
        for layer in layers:
            name = hook_name(site, layer)
            if name not in available:
                hint = (
                    " (TransformerBridge: call model.enable_compatibility_mode() first)"
                    if type(model).__name__ == "TransformerBridge"
                    else ""
                )
                if name in (getattr(model, "acts_to_saes", None) or {}):
                    hint = (
                        f": an SAE is attached there (model.acts_to_saes), so the activation "
                        f"is at {name}.hook_sae_input / .hook_sae_output. Analyse the model "
                        "without it (outside `with model.saes(...)`, or model.reset_saes()), "
                        "or use tl_spikesink.saes.sae_report for the SAE's effect"
                    )
                raise SpikeSinkError(
                    f"{analysis} needs the hook point {name!r}, which "
                    f"{type(model).__name__} does not have{hint}"
                )
