"""Interventions: hook factories that ablate spikes, remove sink keys, swap norms and gate heads.

Each factory returns an :class:`Intervention`: a frozen bundle of TransformerLens
``(hook_name, hook_fn)`` pairs with the settings that produced them. Pass
``list(iv.fwd_hooks)`` to ``model.hooks`` / ``model.run_with_hooks``, or write
``with iv.applied(model): ...``. Defaults are read from a :class:`~tl_spikesink.ScanResult`
(spike channels, the block that creates the main spike, sink heads); every choice can be
overridden. Hook names come from :func:`tl_spikesink.anatomy.hook_name`.

Methods:
    * **Spike ablation** (Sun et al. 2024) at ``blocks.L.hook_resid_post``. Spike tokens are found
      on the fly in each activation, since new texts put them at new positions: |x| at any spike
      channel above the scan's massive-activation cut of that layer, max(abs_threshold,
      rel_threshold × the layer's median |x|). The relative part matters: in SmolLM2's middle
      layers every ordinary token carries |x| ≈ 150 in spike channel 507, so 100 alone would
      catch them all. At spike tokens the spike channels are set to 0 ("zero"), to their mean
      over the spike tokens of a clean calibration pass at the same hook ("mean"), or clamped to
      ±value ("clamp"). The default layer is the block that creates the main spike: the first
      layer whose resid_post top-1 reaches half the largest top-1 of any layer (on SmolLM2
      block 11, not the ~870 step-up of blocks 1–2).
    * **Sink-key removal** at ``blocks.L.attn.hook_attn_scores`` (pre-softmax): the chosen key
      positions get -inf for the chosen heads, so each row renormalizes over the other keys. Key
      k is removed only for queries i > k, so a query always keeps its own key and no row is
      left empty (query 0 keeps key 0). Positions count from each sequence's first real token,
      found as the first query that can see its own key; with right padding
      (:meth:`Corpus.batches`' default) or no padding that is column 0, so position == column.
    * **Attention gate** at ``blocks.L.attn.hook_z``: each chosen head's z is multiplied by a
      constant (default 0 on the scan's sink heads).

Norm swaps (replacing RMSNorm at inference) live in :mod:`tl_spikesink.interventions.norms`.

The model is borrowed: no factory or hook changes a parameter, every hook returns a new tensor
rather than writing into the one it is handed, and :meth:`Intervention.applied` is built on
``model.hooks``, which removes exactly the hooks it added, also when the body raises.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from jaxtyping import Float

from tl_spikesink.anatomy import Anatomy, hook_name
from tl_spikesink.corpus import Corpus, tokenize
from tl_spikesink.errors import SpikeSinkError

if TYPE_CHECKING:
    from tl_spikesink.probes.scan import ScanResult

SpikeMode = Literal["zero", "mean", "clamp"]
Texts = Sequence[str] | Corpus
DEFAULT_THRESHOLD = 100.0
"""Spike cut when neither a scan nor `threshold` says otherwise (Sun et al.'s absolute 100)."""
_MAIN_SPIKE_SHARE = 0.5
"""The main spike's block is the first whose resid_post top-1 reaches this share of the largest."""


@dataclass(frozen=True)
class Intervention:
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


# ---------------------------------------------------------------- spikes


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
        layers: blocks at whose ``hook_resid_post`` to intervene (default: the block that creates
            the main spike, see the module docstring).
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
    dims = _dims(scan, model)
    layers = _main_spike_layers(scan) if layers is None else tuple(int(x) for x in layers)
    _check_layers(layers, dims, "spike_ablation")
    channels = (
        _spike_channels(scan, layers) if channels is None else tuple(int(c) for c in channels)
    )
    _check_channels(channels, dims, "spike_ablation")
    cuts = _cuts(scan, threshold, layers)
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
    }
    means: dict[int, torch.Tensor] = {}
    if mode == "mean":
        corpus = _calibration_corpus(model, calibration, "spike_ablation(mode='mean')")
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
) -> Callable:
    index = torch.tensor(channels)

    def hook(resid: Float[torch.Tensor, "batch pos d_model"], hook: Any) -> torch.Tensor | None:
        _check_width(channels, resid, hook)
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


def _spike_means(
    model: Any, corpus: Corpus, channels: tuple[int, ...], cuts: dict[int, float]
) -> dict[int, torch.Tensor]:
    layers = tuple(cuts)
    index = torch.tensor(channels)
    sums = {layer: torch.zeros(len(channels), dtype=torch.float64) for layer in layers}
    counts = dict.fromkeys(layers, 0)
    state: dict[str, torch.Tensor] = {}

    def capture(layer: int) -> Callable:
        def hook(resid: Float[torch.Tensor, "batch pos d_model"], hook: Any) -> None:
            _check_width(channels, resid, hook)
            vals = resid.index_select(-1, index.to(resid.device))[state["mask"]]  # [token, channel]
            spike = (vals.abs() > cuts[layer]).any(-1)
            sums[layer] += vals[spike].double().sum(0).cpu()
            counts[layer] += int(spike.sum())

        return hook

    hooks = [(hook_name("resid_post", layer), capture(layer)) for layer in layers]
    _clean_pass(model, corpus, hooks, state, stop_at_layer=max(layers) + 1)
    for layer in layers:
        if counts[layer] == 0:
            raise SpikeSinkError(
                f"calibration corpus {corpus.name!r} ({corpus.n_tokens} tokens) has no spike token "
                f"at block {layer} (|x| > {cuts[layer]:g} at channels {list(channels)}), so there "
                "is no mean to set; calibrate on texts that have spikes, or use mode='zero'"
            )
    return {layer: (sums[layer] / counts[layer]).float() for layer in layers}


def _main_spike_layers(scan: ScanResult | None) -> tuple[int, ...]:
    if scan is None:
        raise SpikeSinkError("pass a scan result or layers= to choose where to ablate")
    top = scan.spikes.top("resid_post", 1)[:, 0]
    if not scan.spikes.massive:
        raise SpikeSinkError(
            f"the scan of {scan.model} found no massive activation to ablate; pass layers= and "
            "channels= to ablate anyway"
        )
    return (int((top >= _MAIN_SPIKE_SHARE * top.max()).nonzero()[0, 0]),)


def _spike_channels(scan: ScanResult | None, layers: tuple[int, ...]) -> tuple[int, ...]:
    if scan is None:
        raise SpikeSinkError("pass a scan result or channels= to choose which channels to ablate")
    here = {a.channel for a in scan.spikes.massive if a.layer in layers}
    # Channels massive where we ablate, in the scan's order (most spike tokens first).
    channels = tuple(c for c in scan.spikes.channels if c in here) or scan.spikes.channels
    if not channels:
        raise SpikeSinkError(f"the scan of {scan.model} found no spike channel; pass channels=")
    return channels


# ---------------------------------------------------------------- sinks


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
    dims = _dims(scan, model)
    if layers is not None:
        layers = tuple(int(x) for x in layers)
        _check_layers(layers, dims, "sink_key_removal")
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
        _check_heads(pairs, dims, "sink_key_removal")
        if not pairs:
            raise SpikeSinkError(f"sink_key_removal: no head selected ({label}); nothing to remove")
        per_layer = {}
        for layer, head in pairs:
            per_layer[layer] = (*(per_layer.get(layer) or ()), head)
    hooks = tuple(
        (hook_name("attn_scores", layer), _sink_key_hook(positions, per_layer[layer]))
        for layer in sorted(per_layer)
    )
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


def _sink_key_hook(positions: tuple[int, ...], heads: tuple[int, ...] | None) -> Callable:
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
            _check_head_count(heads, h, hook)
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
    _check_heads(tuple(gates), _dims(scan, model), "attention_gate")
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


def _gate_hook(gates: dict[int, float]) -> Callable:
    def hook(z: Float[torch.Tensor, "batch pos head d_head"], hook: Any) -> torch.Tensor:
        _check_head_count(tuple(gates), z.shape[-2], hook)
        factor = torch.ones(z.shape[-2], dtype=z.dtype, device=z.device)
        factor[list(gates)] = torch.tensor(list(gates.values()), dtype=z.dtype, device=z.device)
        return z * factor[:, None]

    return hook


# ---------------------------------------------------------------- shared helpers


def _dims(scan: ScanResult | None, model: Any) -> dict[str, int]:
    if model is not None:
        a = Anatomy.of(model)
        return {"n_layers": a.n_layers, "n_heads": a.n_heads, "d_model": a.d_model}
    if scan is not None:
        return {"n_layers": scan.n_layers, "n_heads": scan.n_heads, "d_model": scan.d_model}
    return {}


def _cuts(
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


def _check_layers(layers: tuple[int, ...], dims: Mapping[str, int], what: str) -> None:
    n = dims.get("n_layers")
    if not layers:
        raise SpikeSinkError(f"{what}: no layer chosen")
    for layer in layers:
        if layer < 0 or (n is not None and layer >= n):
            raise SpikeSinkError(
                f"{what}: layer {layer} is out of range (the model has {n} layers: 0..{n - 1})"
            )


def _check_channels(channels: tuple[int, ...], dims: Mapping[str, int], what: str) -> None:
    d = dims.get("d_model")
    if not channels:
        raise SpikeSinkError(f"{what}: no channel chosen")
    for c in channels:
        if c < 0 or (d is not None and c >= d):
            raise SpikeSinkError(f"{what}: channel {c} is out of range (d_model = {d})")


def _check_heads(pairs: tuple[tuple[int, int], ...], dims: Mapping[str, int], what: str) -> None:
    _check_layers(tuple(layer for layer, _ in pairs) or (0,), dims, what)
    n = dims.get("n_heads")
    for layer, head in pairs:
        if head < 0 or (n is not None and head >= n):
            raise SpikeSinkError(
                f"{what}: head ({layer}, {head}) is out of range (the model has {n} heads)"
            )


def _check_width(channels: tuple[int, ...], act: torch.Tensor, hook: Any) -> None:
    # Only reached when neither a scan nor the model told the factory d_model.
    if max(channels) >= act.shape[-1]:
        raise SpikeSinkError(
            f"{getattr(hook, 'name', 'hook')}: channel {max(channels)} is out of range for an "
            f"activation of shape {tuple(act.shape)}"
        )


def _check_head_count(heads: tuple[int, ...], n_heads: int, hook: Any) -> None:
    if max(heads) >= n_heads:
        raise SpikeSinkError(
            f"{getattr(hook, 'name', 'hook')}: head {max(heads)} is out of range ({n_heads} heads)"
        )


def _calibration_corpus(model: Any, calibration: Texts, what: str) -> Corpus:
    if model is None:
        raise SpikeSinkError(f"{what}: a calibration pass needs the model; pass model=")
    if isinstance(calibration, Corpus):
        return calibration
    if isinstance(calibration, str):
        calibration = [calibration]
    return tokenize(model, calibration, name="calibration")


def _clean_pass(
    model: Any,
    corpus: Corpus,
    hooks: list[tuple[str, Callable]],
    state: dict[str, torch.Tensor],
    stop_at_layer: int | None = None,
    batch_size: int = 8,
    after_batch: Callable[[], None] | None = None,
) -> None:
    """One read-only pass over `corpus`; `state["mask"]` holds the current batch's real tokens."""
    from tl_spikesink.probes.scan import _device_of

    device = _device_of(model)
    kwargs: dict[str, Any] = {"return_type": None}
    if stop_at_layer is not None and "stop_at_layer" in inspect.signature(model.forward).parameters:
        kwargs["stop_at_layer"] = stop_at_layer  # the blocks after the last hook are not needed
    with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
        for batch in corpus.batches(batch_size):
            state["mask"] = batch.mask.to(device)
            model(batch.tokens.to(device), attention_mask=state["mask"].long(), **kwargs)
            if after_batch is not None:
                after_batch()


__all__ = ["Intervention", "attention_gate", "compose", "sink_key_removal", "spike_ablation"]
