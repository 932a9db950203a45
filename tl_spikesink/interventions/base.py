"""What every intervention shares: the :class:`Intervention` bundle, composition, range checks.

An intervention is a frozen bundle of TransformerLens ``(hook_name, hook_fn)`` pairs with the
settings that produced them. Pass ``list(iv.fwd_hooks)`` to ``model.hooks`` /
``model.run_with_hooks``, or write ``with iv.applied(model): ...``. The factories live beside
this module: :mod:`~tl_spikesink.interventions.spikes` (spike ablation),
:mod:`~tl_spikesink.interventions.attention` (sink-key removal, head gates) and
:mod:`~tl_spikesink.interventions.norms` (norm swaps).

The model is borrowed: no factory or hook changes a parameter, every hook returns a new tensor
rather than writing into the one it is handed, and :meth:`Intervention.applied` is built on
``model.hooks``, which removes exactly the hooks it added, also when the body raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from tl_spikesink.anatomy import Anatomy
from tl_spikesink.corpus import Corpus, tokenize
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.results import Result

if TYPE_CHECKING:
    from tl_spikesink.probes.scan import ScanResult

Texts = Sequence[str] | Corpus
DEFAULT_THRESHOLD = 100.0
"""Spike cut when neither a scan nor `threshold` says otherwise (Sun et al.'s absolute 100)."""


@dataclass(frozen=True, repr=False)
class Intervention(Result):
    """Forward hooks that change a model's computation, with the settings for reports."""

    name: str
    fwd_hooks: tuple[tuple[str, Callable], ...]
    """(hook_name, hook_fn) pairs, in the order they run at a shared hook point."""
    settings: dict[str, Any] = field(default_factory=dict)
    """JSON-ready record of every choice made (layers, channels, fitted values, ...)."""
    description: str = ""

    @contextmanager
    def applied(self, model: Any) -> Iterator[Any]:
        """Install the hooks for the body of a ``with`` block; always removed after.

        Example:
            >>> with spike_ablation(result, mode="zero").applied(model):  # doctest: +SKIP
            ...     logits = model(tokens)
        """
        missing = [name for name, _ in self.fwd_hooks if name not in model.hook_dict]
        if missing:
            raise SpikeSinkError(
                f"intervention {self.name!r} needs the hook point {missing[0]!r}, which "
                f"{type(model).__name__} does not have (built for another model, or a layer out "
                "of range?)"
            )
        with model.hooks(fwd_hooks=list(self.fwd_hooks)):
            yield model


def compose(*interventions: Intervention, name: str | None = None) -> Intervention:
    """One intervention that applies all of `interventions`, in order, at every hook point."""
    if not interventions:
        raise SpikeSinkError("compose() needs at least one intervention")
    return Intervention(
        name=name or " + ".join(iv.name for iv in interventions),
        fwd_hooks=tuple(h for iv in interventions for h in iv.fwd_hooks),
        settings={
            "kind": "compose",
            "parts": [{"name": iv.name, **iv.settings} for iv in interventions],
        },
        description="; ".join(iv.description for iv in interventions if iv.description),
    )


def model_dims(scan: ScanResult | None, model: Any) -> dict[str, int]:
    """The model's sizes (n_layers, n_heads, d_model) from the model, else the scan, else {}."""
    if model is not None:
        a = Anatomy.of(model)
        return {"n_layers": a.n_layers, "n_heads": a.n_heads, "d_model": a.d_model}
    if scan is not None:
        return {"n_layers": scan.n_layers, "n_heads": scan.n_heads, "d_model": scan.d_model}
    return {}


def spike_cuts(
    scan: ScanResult | None, threshold: float | None, layers: Sequence[int]
) -> dict[int, float]:
    """Per layer, the |x| above which a resid_post value marks a spike token."""
    if threshold is not None:
        return {layer: float(threshold) for layer in layers}
    if scan is None:
        return dict.fromkeys(layers, DEFAULT_THRESHOLD)
    # The scan's own definition of a massive activation, with its corpus-wide medians.
    medians = scan.spikes.median("resid_post").nan_to_num(0.0)
    c = scan.config
    return {
        layer: max(c.abs_threshold, c.rel_threshold * float(medians[layer])) for layer in layers
    }


def _check_range(values: tuple[int, ...], size: int | None, what: str, noun: str, of: str) -> None:
    if not values:
        raise SpikeSinkError(f"{what}: no {noun} chosen")
    for v in values:
        if v < 0 or (size is not None and v >= size):
            raise SpikeSinkError(f"{what}: {noun} {v} is out of range ({of})")


def check_layers(layers: tuple[int, ...], dims: Mapping[str, int], what: str) -> None:
    """Refuse an empty or out-of-range choice of layers, naming `what` asked for it."""
    n = dims.get("n_layers")
    _check_range(layers, n, what, "layer", f"the model has {n} layers: 0..{(n or 0) - 1}")


def check_channels(channels: tuple[int, ...], dims: Mapping[str, int], what: str) -> None:
    """Refuse an empty or out-of-range choice of residual channels."""
    d = dims.get("d_model")
    _check_range(channels, d, what, "channel", f"d_model = {d}")


def check_heads(pairs: tuple[tuple[int, int], ...], dims: Mapping[str, int], what: str) -> None:
    """Refuse out-of-range (layer, head) pairs."""
    check_layers(tuple(layer for layer, _ in pairs) or (0,), dims, what)
    n = dims.get("n_heads")
    for layer, head in pairs:
        if head < 0 or (n is not None and head >= n):
            raise SpikeSinkError(
                f"{what}: head ({layer}, {head}) is out of range (the model has {n} heads)"
            )


def check_width(channels: tuple[int, ...], act: torch.Tensor, hook: Any) -> None:
    """Refuse channels beyond the activation's width (checked inside the hook)."""
    # Only reached when neither a scan nor the model told the factory d_model.
    if max(channels) >= act.shape[-1]:
        raise SpikeSinkError(
            f"{getattr(hook, 'name', 'hook')}: channel {max(channels)} is out of range for an "
            f"activation of shape {tuple(act.shape)}"
        )


def check_head_count(heads: tuple[int, ...], n_heads: int, hook: Any) -> None:
    """Refuse heads beyond the activation's head count (checked inside the hook)."""
    if max(heads) >= n_heads:
        raise SpikeSinkError(
            f"{getattr(hook, 'name', 'hook')}: head {max(heads)} is out of range ({n_heads} heads)"
        )


def calibration_corpus(model: Any, calibration: Texts, what: str) -> Corpus:
    """Calibration texts tokenized for a clean pass (a Corpus as it is)."""
    if model is None:
        raise SpikeSinkError(f"{what}: a calibration pass needs the model; pass model=")
    if isinstance(calibration, Corpus):
        return calibration
    if isinstance(calibration, str):
        calibration = [calibration]
    return tokenize(model, calibration, name="calibration")


__all__ = [
    "DEFAULT_THRESHOLD",
    "Intervention",
    "Texts",
    "calibration_corpus",
    "check_channels",
    "check_head_count",
    "check_heads",
    "check_layers",
    "check_width",
    "compose",
    "model_dims",
    "spike_cuts",
]
