"""sae-lens SAEs in a TransformerLens model: load, check against the model, splice, bypass.

* :func:`load_sae` takes an SAE instance or a folder written by ``SAE.save_model`` /
  ``TrainingSAE.save_inference_model``.
* :func:`check_sae` resolves the hook point (the SAE's ``cfg.metadata.hook_name`` unless given)
  and fails with a :class:`~tl_spikesink.SpikeSinkError` when the hook is absent from the model,
  disagrees with the SAE's own, or carries a width other than the SAE's ``d_in``.
* :func:`sae_splice` is an :class:`~tl_spikesink.Intervention` that replaces the activation by the
  SAE's reconstruction, optionally keeping the original at spike tokens (a :class:`SpikeRule`).
  It works on HookedTransformer and HookedSAETransformer alike and plugs into
  :func:`tl_spikesink.evaluation.scoring`.
* :func:`bypassed` is for an SAE already attached to a HookedSAETransformer (``model.saes`` /
  ``add_sae``): while active, the SAE's output is replaced by its input at masked positions.
  Unlike sae-lens's ``exclude_special_tokens`` (fixed token ids), the mask is any spike rule or
  [batch, pos] tensor, e.g. the first token, which is no special id in SmolLM2.

sae-lens is imported only when an SAE has to be loaded, so importing this module stays light.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float

from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.interventions.base import Intervention
from tl_spikesink.saes.masks import SpikeRule

MaskSource = SpikeRule | Bool[torch.Tensor, "batch pos"] | Callable[[torch.Tensor], torch.Tensor]
"""A mask, or how to compute one from the activation at the hook point."""


class _Stop(Exception):
    """Raised inside a hook to end a forward pass once the activation of interest is seen."""


def load_sae(sae: Any) -> Any:
    """An sae-lens SAE from an instance or a saved SAE folder (``cfg.json`` + weights)."""
    if isinstance(sae, (str, Path)):
        path = Path(sae)
        if not (path / "cfg.json").is_file():
            raise SpikeSinkError(
                f"{str(path)!r} is not a saved SAE folder (no cfg.json); save one with "
                "sae.save_model(path) or pass the SAE instance"
            )
        from sae_lens import SAE

        return SAE.load_from_disk(path)
    if not all(hasattr(sae, a) for a in ("cfg", "encode", "decode")) or not hasattr(
        getattr(sae, "cfg", None), "d_in"
    ):
        raise SpikeSinkError(
            f"{type(sae).__name__} is not an sae-lens SAE (no cfg.d_in / encode / decode); pass "
            "an SAE instance (e.g. StandardSAE) or the path of a saved SAE folder"
        )
    return sae


def layer_of(hook: str) -> int | None:
    """The block a hook name lives in (None for hooks outside the blocks, like ``hook_embed``).

    >>> layer_of("blocks.15.hook_resid_post"), layer_of("hook_embed")
    (15, None)
    """
    m = re.match(r"blocks\.(\d+)\.", hook)
    return int(m.group(1)) if m else None


def check_sae(model: Any, sae: Any, hook: str | None = None) -> str:
    """The hook point where `sae` reads and writes in `model`, after checking that it fits.

    Raises:
        SpikeSinkError: no hook given or recorded in the SAE; the hook is absent from the model
            (or an SAE is attached there); it differs from the SAE's recorded hook; or the
            activation there is not ``d_in`` wide.
    """
    own = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    if hook is None:
        if own is None:
            raise SpikeSinkError(
                "the SAE records no hook point (cfg.metadata.hook_name is None); pass hook=, "
                "e.g. hook_name('resid_post', 15)"
            )
        hook = own
    elif own is not None and own != hook:
        raise SpikeSinkError(
            f"the SAE was trained on {own!r} but hook={hook!r} was given; pass hook={own!r} "
            "or an SAE trained at that hook point"
        )
    if hook in getattr(model, "acts_to_saes", {}):
        raise SpikeSinkError(
            f"an SAE is already attached to {hook!r} in this HookedSAETransformer, which hides "
            "the hook point; call model.reset_saes() first (or use bypassed() on the attached SAE)"
        )
    if hook not in model.hook_dict:
        layer = layer_of(hook)
        n = getattr(model.cfg, "n_layers", None)
        hint = (
            f" (the model has {n} blocks: 0..{n - 1})"
            if layer is not None and n is not None and layer >= n
            else ""
        )
        raise SpikeSinkError(
            f"{type(model).__name__} has no hook point {hook!r}{hint}; the SAE belongs to "
            "another model or layer (see model.hook_dict for the names)"
        )
    width = activation_width(model, hook)
    if width != sae.cfg.d_in:
        raise SpikeSinkError(
            f"the SAE reads {sae.cfg.d_in} channels but {hook!r} carries {width} in "
            f"{getattr(model.cfg, 'model_name', type(model).__name__)}; pass an SAE trained "
            "on this model's hook point"
        )
    return hook


def activation_width(model: Any, hook: str) -> int:
    """Last dimension of the activation at `hook` (a one-token forward, stopped at the hook)."""
    seen: list[int] = []

    def grab(act: torch.Tensor, hook: Any) -> None:
        # hook_z-style activations [.., head, d_head] are read flattened, as sae-lens does.
        seen.append(act.shape[-1] * (act.shape[-2] if hook.name.endswith("hook_z") else 1))
        raise _Stop

    device = next(model.parameters()).device
    tokens = torch.zeros(1, 1, dtype=torch.long, device=device)
    try:
        with torch.inference_mode(), model.hooks(fwd_hooks=[(hook, grab)]):
            model(tokens, return_type=None)
    except _Stop:
        pass
    if not seen:
        raise SpikeSinkError(f"the hook point {hook!r} never ran in a forward pass of the model")
    return seen[0]


def reconstruct(
    sae: Any, x: Float[torch.Tensor, "... d_in"]
) -> tuple[Float[torch.Tensor, "... d_in"], Float[torch.Tensor, "... d_sae"]]:
    """(reconstruction, latent activations) of `x`, on the SAE's device, back in x's dtype.

    Calls ``encode`` / ``decode`` rather than ``forward``, so an SAE left in
    ``use_error_term`` mode still reconstructs instead of returning its input.
    """
    device = getattr(sae, "device", x.device)
    acts = sae.encode(x.to(device))
    return sae.decode(acts).to(device=x.device, dtype=x.dtype), acts.to(x.device)


def _mask_of(source: MaskSource, x: torch.Tensor) -> torch.Tensor:
    if isinstance(source, SpikeRule):
        return source.mask(x)
    if callable(source):
        return source(x)
    if source.shape != x.shape[:-1]:
        raise SpikeSinkError(
            f"mask of shape {tuple(source.shape)} does not match the activation's "
            f"[batch, pos] = {tuple(x.shape[:-1])}; build it for this batch"
        )
    return source.to(x.device)


def sae_splice(
    sae: Any,
    hook: str | None = None,
    *,
    bypass: MaskSource | None = None,
    model: Any = None,
    name: str | None = None,
) -> Intervention:
    """An intervention that replaces the activation at `hook` by the SAE's reconstruction.

    Args:
        sae: an sae-lens SAE or a saved SAE folder.
        hook: the hook point (default: the SAE's ``cfg.metadata.hook_name``).
        bypass: positions where the original activation is kept (the SAE is skipped): a
            :class:`SpikeRule`, a [batch, pos] mask, or a function of the activation.
        model: check the SAE against this model now (hook present, width equal to ``d_in``).
        name: the intervention's name in reports.

    Example:
        >>> iv = sae_splice(sae, bypass=SpikeRule())  # doctest: +SKIP
        >>> ts.evaluate(model, texts, iv).loss  # doctest: +SKIP
    """
    sae = load_sae(sae)
    if model is not None:
        hook = check_sae(model, sae, hook)
    hook = hook or getattr(sae.cfg.metadata, "hook_name", None)
    if hook is None:
        raise SpikeSinkError("the SAE records no hook point; pass hook=")

    def splice(act: Float[torch.Tensor, "batch pos d_in"], hook: Any) -> torch.Tensor:
        if act.shape[-1] != sae.cfg.d_in:
            raise SpikeSinkError(
                f"{hook.name}: the SAE reads {sae.cfg.d_in} channels but the activation has "
                f"shape {tuple(act.shape)}; pass an SAE trained on this hook point"
            )
        recon, _ = reconstruct(sae, act)
        if bypass is None:
            return recon
        return torch.where(_mask_of(bypass, act)[..., None], act, recon)

    settings: dict[str, Any] = {
        "kind": "sae_splice",
        "hook": hook,
        "architecture": sae.cfg.architecture(),
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "bypass": bypass.describe() if isinstance(bypass, SpikeRule) else bypass is not None,
    }
    return Intervention(
        name=name or ("SAE" if bypass is None else "SAE, spikes bypassed"),
        fwd_hooks=((hook, splice),),
        settings=settings,
        description=f"{sae.cfg.architecture()} SAE ({sae.cfg.d_sae} latents) spliced at {hook}",
    )


@contextmanager
def bypassed(model: Any, mask: MaskSource, hook: str | None = None) -> Iterator[Any]:
    """Skip an SAE attached to a HookedSAETransformer at masked positions, for a ``with`` block.

    The original activation (the SAE's input) is written back over the SAE's output wherever
    the mask is True. Hooks go through ``model.hooks``: removed on exit, also on error.

    Args:
        model: a HookedSAETransformer with an SAE attached (``model.saes([sae])``, ``add_sae``).
        mask: a :class:`SpikeRule` (applied to each forward's activation), a [batch, pos] mask,
            or a function of the activation.
        hook: the attached SAE's hook point (default: the only one attached).

    Example:
        >>> with model.saes(saes=[sae]), bypassed(model, SpikeRule()):  # doctest: +SKIP
        ...     loss = model(tokens, return_type="loss")
    """
    attached = getattr(model, "acts_to_saes", None)
    if attached is None:
        raise SpikeSinkError(
            f"bypassed() needs a HookedSAETransformer with an attached SAE, not "
            f"{type(model).__name__}; on a plain model use sae_splice(sae, bypass=...)"
        )
    if hook is None:
        if len(attached) != 1:
            raise SpikeSinkError(
                f"{len(attached)} SAEs are attached ({sorted(attached)}); pass hook= to choose one"
                if attached
                else "no SAE is attached; attach one first (with model.saes(saes=[sae]): ...)"
            )
        hook = next(iter(attached))
    if hook not in attached:
        raise SpikeSinkError(f"no SAE is attached at {hook!r}; attached: {sorted(attached)}")
    state: dict[str, torch.Tensor] = {}

    def capture(x: torch.Tensor, hook: Any) -> None:
        state["x"], state["mask"] = x, _mask_of(mask, x)

    def restore(out: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.where(state["mask"][..., None], state["x"].to(out.dtype), out)

    hooks = [(f"{hook}.hook_sae_input", capture), (f"{hook}.hook_sae_output", restore)]
    with model.hooks(fwd_hooks=hooks):
        try:
            yield model
        finally:
            state.clear()


__all__ = [
    "MaskSource",
    "activation_width",
    "bypassed",
    "check_sae",
    "layer_of",
    "load_sae",
    "reconstruct",
    "sae_splice",
]
