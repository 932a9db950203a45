"""Spike ablation (Sun et al. 2024): zero, mean-set or clamp the spike channels at spike tokens.

At ``blocks.L.hook_resid_post``. Spike tokens are found
on the fly in each activation, since new texts put them at new positions: |x| at any spike
channel above the scan's massive-activation cut of that layer, max(abs_threshold,
rel_threshold × the layer's median |x|). The relative part matters: in SmolLM2's middle
layers every ordinary token carries |x| ≈ 150 in spike channel 507, so 100 alone would
catch them all. At spike tokens the spike channels are set to 0 ("zero"), to their mean
over the spike tokens of a clean calibration pass at the same hook ("mean"), or clamped to
±value ("clamp"). The default layer is the scan's spike site
(:func:`tl_spikesink.probes.site.spike_site`): the layer of the step-up block that carries the
largest spike (on SmolLM2-135M layer 11's MLP, paper block 24); the settings record which site
was used and why (``settings["site"]``).

The model is borrowed: every hook returns a new tensor, and the calibration pass only reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from jaxtyping import Float

from tl_spikesink.anatomy import hook_name
from tl_spikesink.corpus import Corpus
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.interventions.base import (
    Intervention,
    Texts,
    calibration_corpus,
    check_channels,
    check_layers,
    check_width,
    model_dims,
    spike_cuts,
)
from tl_spikesink.probes.engine import HookFn, Probe, Step, run
from tl_spikesink.probes.site import NoStepUpBlock, SpikeSite, spike_site

if TYPE_CHECKING:
    from tl_spikesink.probes.scan import ScanResult

SpikeMode = Literal["zero", "mean", "clamp"]


def spike_ablation(
    scan: ScanResult | None = None,
    *,
    mode: SpikeMode,
    layers: Sequence[int] | None = None,
    channels: Sequence[int] | None = None,
    value: float | None = None,
    calibration: Texts | None = None,
    threshold: float | None = None,
    model: Any = None,
    name: str | None = None,
) -> Intervention:
    """Zero, mean-set or clamp the spike channels at spike tokens after chosen blocks.

    Args:
        scan: a clean scan, for the defaults (layers, channels, threshold).
        mode: "zero", "mean" (Sun et al. 2024) or "clamp".
        layers: blocks at whose ``hook_resid_post`` to intervene (default: the layer of the
            scan's spike site, see the module docstring).
        channels: spike channels (default: the channels massive at those layers in the scan).
        value: the bound for "clamp": |x| is clamped to `value` at spike tokens.
        calibration: texts or a Corpus for "mean": the mean of each channel over the spike tokens
            of a clean pass at the same hook. Keep it disjoint from the texts you evaluate on.
        threshold: a token is a spike token where |x| at any spike channel exceeds this
            (default: the scan's cut at each layer, max(abs_threshold, rel_threshold × median);
            without a scan, 100).
        model: the model; needed for "mean" (the calibration pass) and used to check ranges.
        name: the intervention's name in reports (default "<mode> spikes").
    """
    if mode not in get_args(SpikeMode):
        raise SpikeSinkError(
            f"unknown spike ablation mode {mode!r}; choose one of {get_args(SpikeMode)}"
        )
    dims = model_dims(scan, model)
    site: dict[str, Any] = {"reason": "layers given by the caller"}
    if layers is None:
        found = _site(scan)
        layers, site = (found.layer,), found.to_dict()
    else:
        layers = tuple(int(x) for x in layers)
    check_layers(layers, dims, "spike_ablation")
    channels = (
        _spike_channels(scan, layers) if channels is None else tuple(int(c) for c in channels)
    )
    check_channels(channels, dims, "spike_ablation")
    cuts = spike_cuts(scan, threshold, layers)
    if mode == "clamp" and (value is None or value < 0):
        raise SpikeSinkError(f"mode='clamp' needs value >= 0 (the bound on |x|), got {value!r}")
    if mode != "clamp" and value is not None:
        raise SpikeSinkError(f"value is the clamp bound; mode={mode!r} takes none")
    if mode == "mean" and calibration is None:
        raise SpikeSinkError("mode='mean' needs calibration texts or a Corpus (and model=)")
    settings: dict[str, Any] = {
        "kind": "spike_ablation",
        "mode": mode,
        "layers": list(layers),
        "channels": list(channels),
        "threshold": {str(layer): cut for layer, cut in cuts.items()},
        "site": site,
    }
    means: dict[int, torch.Tensor] = {}
    if mode == "mean":
        corpus = calibration_corpus(model, calibration, "spike_ablation(mode='mean')")
        means = _spike_means(model, corpus, channels, cuts)
        settings["means"] = {str(layer): m.tolist() for layer, m in means.items()}
        settings["calibration"] = corpus.describe()
    if mode == "clamp":
        settings["value"] = float(value)
    hooks = tuple(
        (
            hook_name("resid_post", layer),
            _spike_hook(mode, channels, cuts[layer], value, means.get(layer)),
        )
        for layer in layers
    )
    return Intervention(
        name=name or f"{mode} spikes",
        fwd_hooks=hooks,
        settings=settings,
        description=f"{mode} channels {list(channels)} at spike tokens after blocks {list(layers)}",
    )


def _spike_hook(
    mode: SpikeMode,
    channels: tuple[int, ...],
    threshold: float,
    value: float | None,
    mean: torch.Tensor | None,
) -> HookFn:
    index = torch.tensor(channels)

    def hook(resid: Float[torch.Tensor, "batch pos d_model"], hook: Any) -> torch.Tensor | None:
        check_width(channels, resid, hook)
        ch = index.to(resid.device)
        vals = resid.index_select(-1, ch)  # a copy: the hook's input is never written
        spike = (vals.abs() > threshold).any(-1, keepdim=True)
        if not bool(spike.any()):
            return None
        if mode == "zero":
            new = torch.zeros_like(vals)
        elif mode == "mean":
            new = mean.to(vals).expand_as(vals)
        else:
            new = vals.clamp(-value, value)
        out = resid.clone()
        out[..., ch] = torch.where(spike, new, vals)
        return out

    return hook


class _SpikeMeans(Probe):
    """Σ and count of the spike channels over spike tokens at each chosen block (clean pass)."""

    def __init__(self, channels: tuple[int, ...], cuts: dict[int, float]):
        self.channels, self.cuts, self.index = channels, cuts, torch.tensor(channels)
        self.sums = {layer: torch.zeros(len(channels), dtype=torch.float64) for layer in cuts}
        self.counts = dict.fromkeys(cuts, 0)

    def hooks(self) -> list[tuple[str, HookFn]]:
        return [(hook_name("resid_post", layer), self._hook(layer)) for layer in self.cuts]

    def start_batch(self, step: Step) -> None:
        self.mask = step.mask

    def _hook(self, layer: int) -> HookFn:
        def hook(resid: Float[torch.Tensor, "batch pos d_model"], hook: Any) -> None:
            check_width(self.channels, resid, hook)
            vals = resid.index_select(-1, self.index.to(resid.device))[self.mask]  # [token, ch]
            spike = (vals.abs() > self.cuts[layer]).any(-1)
            self.sums[layer] += vals[spike].double().sum(0).cpu()
            self.counts[layer] += int(spike.sum())

        return hook


def _spike_means(
    model: Any, corpus: Corpus, channels: tuple[int, ...], cuts: dict[int, float]
) -> dict[int, torch.Tensor]:
    probe = _SpikeMeans(channels, cuts)
    run(model, corpus, [probe], stop_at_layer=max(cuts) + 1, desc="calibrate: spike means")
    for layer in cuts:
        if probe.counts[layer] == 0:
            raise SpikeSinkError(
                f"calibration corpus {corpus.name!r} ({corpus.n_tokens} tokens) has no spike token "
                f"at block {layer} (|x| > {cuts[layer]:g} at channels {list(channels)}), so there "
                "is no mean to set; calibrate on texts that have spikes, or use mode='zero'"
            )
    return {layer: (probe.sums[layer] / probe.counts[layer]).float() for layer in cuts}


def _site(scan: ScanResult | None) -> SpikeSite:
    if scan is None:
        raise SpikeSinkError("pass a scan result or layers= to choose where to ablate")
    hint = "; pass layers= and channels= to ablate anyway"
    try:
        return spike_site(scan)
    except NoStepUpBlock as e:
        raise NoStepUpBlock(e.model, e.first, e.last, hint) from e
    except SpikeSinkError as e:
        raise SpikeSinkError(f"{e}{hint}") from e


def _spike_channels(scan: ScanResult | None, layers: tuple[int, ...]) -> tuple[int, ...]:
    if scan is None:
        raise SpikeSinkError("pass a scan result or channels= to choose which channels to ablate")
    here = {a.channel for a in scan.spikes.massive if a.layer in layers}
    # Channels massive where we ablate, in the scan's order (most spike tokens first).
    channels = tuple(c for c in scan.spikes.channels if c in here) or scan.spikes.channels
    if not channels:
        raise SpikeSinkError(f"the scan of {scan.model} found no spike channel; pass channels=")
    return channels


__all__ = ["SpikeMode", "spike_ablation"]
