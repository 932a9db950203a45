"""Norm swaps: replace RMSNorm at inference, to see what the norm does to spikes and sinks.

RMSNorm divides a token by its own RMS. A spike token's RMS is its spike, so the norm turns every
spike token into nearly the same vector (the "RMSNorm bound" of docs/definitions.md); the swaps below take
that away in different ways, with the weights left as they are.

Method: TransformerLens RMSNorm and RMSNormPre compute ``scale = hook_scale(sqrt(mean(x²) + eps))``
and then ``hook_normalized(x / scale)``, before the weight (with ``fold_ln`` the weight lives in
the next matrices, so hooking ``hook_normalized`` acts the same folded or not). A pair of hooks
does the swap: the first keeps ``scale``, the second recovers ``x = normalized · scale`` and
returns the replacement:

* "layernorm": (x − mean(x)) / sqrt(var(x) + eps), the model's own eps.
* "fixed_scale": x / s, s the median RMS of non-spike tokens at that norm on a calibration corpus
  (spike tokens, those with a massive activation in any block, are left out of the median), so
  ordinary tokens are scaled about as before and spike tokens are no longer compressed.
* "dyt" (dynamic tanh, Zhu et al. 2025): tanh(α·x) with α = 1 / s, the same s: on ordinary tokens
  α·x has about the unit RMS RMSNorm gives them, while spike channels saturate at ±1.
* "rms_no_spike": x divided by the RMS of the non-spike channels only.

Only RMSNorm models qualify: on a LayerNorm model ``normalized · scale`` is the already centred
input, so the swaps would not mean the same thing; such a model gets a clear error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from jaxtyping import Float

from tl_spikesink.anatomy import Anatomy, Site, hook_name
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.interventions.base import (
    Intervention,
    Texts,
    calibration_corpus,
    check_channels,
    check_layers,
    model_dims,
    spike_cuts,
)
from tl_spikesink.probes.engine import HookFn, Probe, Step, run
from tl_spikesink.results import Result

if TYPE_CHECKING:
    from tl_spikesink.probes.scan import ScanResult

NormKind = Literal["layernorm", "dyt", "fixed_scale", "rms_no_spike"]
Norm = Literal["ln1", "ln2", "ln1_post", "ln2_post", "ln_final"]
_NORM_SITES: dict[str, tuple[Site, Site]] = {
    "ln1": ("ln1_scale", "ln1_normalized"),
    "ln2": ("ln2_scale", "ln2_normalized"),
    "ln1_post": ("ln1_post_scale", "ln1_post_normalized"),
    "ln2_post": ("ln2_post_scale", "ln2_post_normalized"),
    "ln_final": ("ln_final_scale", "ln_final_normalized"),
}


@dataclass(frozen=True, repr=False)
class NormScales(Result):
    """Median RMS of non-spike tokens at each norm's input, measured on a calibration corpus.

    The RMS of a token is the norm's own scale, sqrt(mean(x²) + eps); the median is
    ``torch.median`` (the lower middle value for an even count). Spike tokens, those with a
    massive activation at any block's ``hook_resid_post`` in the calibration pass, are left out.
    """

    medians: dict[str, float]
    """Norm module name (e.g. "blocks.3.ln1", "ln_final") → median RMS."""
    counts: dict[str, int]
    """Non-spike tokens behind each median."""
    n_spike_tokens: int
    """Calibration tokens left out as spike tokens."""
    cuts: tuple[float, ...]
    """Per block, the |x| above which a resid_post value marks a spike token."""
    corpus: dict[str, Any]


def norm_scales(
    model: Any,
    calibration: Texts,
    *,
    norms: Sequence[Norm] = ("ln1", "ln2", "ln_final"),
    layers: Sequence[int] | None = None,
    scan: ScanResult | None = None,
    threshold: float | None = None,
) -> NormScales:
    """Measure, with one clean pass, the median RMS of non-spike tokens at each chosen norm.

    Args:
        model: the model.
        calibration: texts or a Corpus.
        norms: which norms (as in :func:`norm_swap`).
        layers: blocks whose ln1/ln2 to measure (default: all).
        scan: a clean scan, for the massive-activation cut of each block.
        threshold: one cut for every block instead (without a scan: 100).
    """
    targets = _norm_targets(model, norms, layers)
    n_layers = Anatomy.of(model).n_layers
    cuts = spike_cuts(scan, threshold, tuple(range(n_layers)))
    corpus = calibration_corpus(model, calibration, "norm_scales")
    probe = _ScaleProbe(targets, cuts)
    run(model, corpus, [probe], desc="calibrate: norm scales")
    n_spike = probe.n_spike
    values = probe.values
    medians, counts = {}, {}
    for module, parts in values.items():
        v = torch.cat(parts)
        if v.numel() == 0:
            raise SpikeSinkError(
                f"calibration corpus {corpus.name!r} has no non-spike token at {module} "
                f"({n_spike} of {corpus.n_tokens} tokens are spike tokens); calibrate on more "
                "ordinary text, or pass a scan so the relative cut applies"
            )
        medians[module], counts[module] = float(v.median()), int(v.numel())
    return NormScales(medians, counts, n_spike, tuple(cuts.values()), corpus.describe())


class _ScaleProbe(Probe):
    """Each chosen norm's scale at the non-spike tokens of every batch."""

    def __init__(self, targets: dict[str, tuple[str, str]], cuts: dict[int, float]):
        self.targets, self.cuts = targets, cuts
        self.values: dict[str, list[torch.Tensor]] = {module: [] for module in targets}
        self.n_spike = 0

    def hooks(self) -> list[tuple[str, HookFn]]:
        hooks = [(scale, self._keep(module)) for module, (scale, _) in self.targets.items()]
        return hooks + [(hook_name("resid_post", layer), self._flag(layer)) for layer in self.cuts]

    def start_batch(self, step: Step) -> None:
        self.mask, self.batch = step.mask, {}
        self.spike = torch.zeros(int(step.mask.sum()), dtype=torch.bool)

    def _keep(self, module: str) -> HookFn:
        def hook(scale: Float[torch.Tensor, "batch pos 1"], hook: Any) -> None:
            self.batch[module] = scale[..., 0][self.mask].double().cpu()

        return hook

    def _flag(self, layer: int) -> HookFn:
        def hook(resid: Float[torch.Tensor, "batch pos d_model"], hook: Any) -> None:
            self.spike |= (resid.abs().amax(-1) > self.cuts[layer])[self.mask].cpu()

        return hook

    def end_batch(self, step: Step, logits: torch.Tensor | None) -> None:
        self.n_spike += int(self.spike.sum())
        for module in self.targets:
            self.values[module].append(self.batch.pop(module)[~self.spike])


def norm_swap(
    kind: NormKind,
    *,
    norms: Sequence[Norm] = ("ln1", "ln2"),
    layers: Sequence[int] | None = None,
    calibration: Texts | NormScales | None = None,
    scan: ScanResult | None = None,
    channels: Sequence[int] | None = None,
    threshold: float | None = None,
    model: Any = None,
    name: str | None = None,
) -> Intervention:
    """Replace RMSNorm by another normalization at inference (the weights are kept).

    Args:
        kind: "layernorm", "dyt", "fixed_scale" or "rms_no_spike" (see the module docstring).
        norms: which norms: "ln1", "ln2", "ln_final", and "ln1_post" / "ln2_post" on models with
            sandwich norms (Gemma 3).
        layers: blocks whose ln1/ln2 to swap (default: all; "ln_final" has no layer).
        calibration: texts, a Corpus or :class:`NormScales`, for "dyt" and "fixed_scale".
        scan: a clean scan, for the spike channels and the massive-activation cuts.
        channels: spike channels for "rms_no_spike" (default: the scan's).
        threshold: one spike cut for the calibration instead of the scan's (see
            :func:`norm_scales`).
        model: the model (required: its norms, eps and the calibration pass).
        name: the intervention's name in reports (default "norm: <kind>").
    """
    if kind not in get_args(NormKind):
        raise SpikeSinkError(f"unknown norm swap {kind!r}; choose one of {get_args(NormKind)}")
    if model is None:
        raise SpikeSinkError("norm_swap needs model= (its norm type, eps and hook points)")
    targets = _norm_targets(model, norms, layers)
    eps = float(model.cfg.eps)
    settings: dict[str, Any] = {
        "kind": "norm_swap",
        "norm": kind,
        "norms": list(targets),
        "eps": eps,
    }
    spike_channels = None
    if kind == "rms_no_spike":
        spike_channels = _spike_channels_for_norm(scan, channels)
        check_channels(spike_channels, model_dims(scan, model), "norm_swap")
        settings["channels"] = list(spike_channels)
    scales: dict[str, float] = {}
    if kind in ("dyt", "fixed_scale"):
        if calibration is None:
            raise SpikeSinkError(
                f"norm_swap({kind!r}) needs calibration texts, a Corpus or NormScales"
            )
        if not isinstance(calibration, NormScales):
            calibration = norm_scales(
                model, calibration, norms=norms, layers=layers, scan=scan, threshold=threshold
            )
        missing = [m for m in targets if m not in calibration.medians]
        if missing:
            raise SpikeSinkError(
                f"the NormScales given have no median for {missing[0]}; measure it too"
            )
        scales = {m: calibration.medians[m] for m in targets}
        key = "alpha" if kind == "dyt" else "scale"
        settings[key] = {m: (1 / s if kind == "dyt" else s) for m, s in scales.items()}
        settings["calibration"] = calibration.corpus
    hooks: list[tuple[str, Callable]] = []
    for module, (scale_name, normalized_name) in targets.items():
        on_scale, on_normalized = _norm_hooks(
            _replacement(kind, eps, scales.get(module), spike_channels)
        )
        hooks += [(scale_name, on_scale), (normalized_name, on_normalized)]
    return Intervention(
        name=name or f"norm: {kind}",
        fwd_hooks=tuple(hooks),
        settings=settings,
        description=f"{kind} instead of RMSNorm at {', '.join(dict.fromkeys(norms))}",
    )


def _replacement(
    kind: NormKind, eps: float, scale: float | None, channels: tuple[int, ...] | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    if kind == "layernorm":

        def f(x: torch.Tensor) -> torch.Tensor:
            centred = x - x.mean(-1, keepdim=True)
            return centred / (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()

    elif kind == "dyt":

        def f(x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x / scale)

    elif kind == "fixed_scale":

        def f(x: torch.Tensor) -> torch.Tensor:
            return x / scale

    else:

        def f(x: torch.Tensor) -> torch.Tensor:
            keep = torch.ones(x.shape[-1], dtype=torch.bool, device=x.device)
            keep[list(channels)] = False
            return x / (x[..., keep].pow(2).mean(-1, keepdim=True) + eps).sqrt()

    return f


def _norm_hooks(swap: Callable[[torch.Tensor], torch.Tensor]) -> tuple[Callable, Callable]:
    kept: dict[str, torch.Tensor] = {}

    def on_scale(scale: Float[torch.Tensor, "batch pos 1"], hook: Any) -> None:
        kept["scale"] = scale

    def on_normalized(
        normalized: Float[torch.Tensor, "batch pos d_model"], hook: Any
    ) -> torch.Tensor:
        scale = kept.pop("scale", None)  # popped, so a stale scale can never be reused
        if scale is None:
            raise SpikeSinkError(
                f"{hook.name}: no hook_scale value came first; is this an RMSNorm?"
            )
        x = normalized.float() * scale.float()
        return swap(x).to(normalized.dtype)

    return on_scale, on_normalized


def _norm_targets(
    model: Any, norms: Sequence[Norm], layers: Sequence[int] | None
) -> dict[str, tuple[str, str]]:
    """Norm module name → (scale hook, normalized hook), checked against the model."""
    if model is None:
        raise SpikeSinkError("norm interventions need model= (its norm type and hook points)")
    anatomy = Anatomy.of(model)
    if not anatomy.rms_norm:
        raise SpikeSinkError(
            f"norm swaps replace RMSNorm, but {anatomy.model_name} uses normalization_type="
            f"{anatomy.normalization_type!r}; they need an RMSNorm model (Llama, Qwen2, Gemma)"
        )
    bad = [n for n in norms if n not in get_args(Norm)]
    if bad or not norms:
        raise SpikeSinkError(
            f"unknown norm {bad[0] if bad else None!r}; choose from {get_args(Norm)}"
        )
    layers = range(anatomy.n_layers) if layers is None else tuple(int(x) for x in layers)
    check_layers(tuple(layers), {"n_layers": anatomy.n_layers}, "norm_swap")
    targets: dict[str, tuple[str, str]] = {}
    for norm in dict.fromkeys(norms):
        for layer in (None,) if norm == "ln_final" else layers:
            scale_name, normalized_name = (hook_name(site, layer) for site in _NORM_SITES[norm])
            if scale_name not in model.hook_dict or normalized_name not in model.hook_dict:
                raise SpikeSinkError(
                    f"{anatomy.model_name} has no {norm} norm hooks ({scale_name!r}); "
                    + (
                        "ln1_post / ln2_post exist only on models with sandwich norms (Gemma 3)"
                        if norm.endswith("_post")
                        else "is this a TransformerLens model with norms?"
                    )
                )
            targets[scale_name.removesuffix(".hook_scale")] = (scale_name, normalized_name)
    return targets


def _spike_channels_for_norm(
    scan: ScanResult | None, channels: Sequence[int] | None
) -> tuple[int, ...]:
    if channels is not None:
        return tuple(int(c) for c in channels)
    if scan is not None and scan.spikes.channels:
        return scan.spikes.channels
    raise SpikeSinkError(
        "rms_no_spike needs the spike channels: pass a scan that found some, or channels="
    )


__all__ = ["Norm", "NormKind", "NormScales", "norm_scales", "norm_swap"]
