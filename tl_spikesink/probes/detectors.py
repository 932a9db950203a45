"""Massive-activation detectors from the field, side by side on one scan.

Every rule reads ``hook_resid_post`` entries the scan kept (all |x| > ``abs_threshold``), so it
needs no forward pass of its own:

- ``"sun"`` (Sun et al. 2024, the scan's rule): |x| > max(abs_threshold, rel_threshold × median),
  median of |x| over the layer's tokens and channels.
- ``"mad"``: |x| > max(abs_threshold, median + z × MAD), median and MAD of |x| over the layer,
  MAD scaled by 1.4826 (a Gaussian's σ), z = :data:`MAD_Z` = 1000 by default: heretic's
  ``min_mad_mult`` (p-e-w/heretic commit e44e5f1, "detect and ignore massive activations").
  Heretic takes median and MAD per token over its channels and also requires
  |x| > 1000 × median and a small cluster of outliers; here both are per layer, from the scan's
  streaming histogram (within a few %), with the same absolute floor.
- ``"persistent"``: Sun's rule, kept only where the same (token, channel) passes it in at least
  ``min_layers`` consecutive layers; by default heretic's confirmation, a layer and the next
  ⌊(L + 1) / 4⌋ hidden states, so ``min_layers = 1 + (n_layers + 1) // 4``.

:func:`check_sink_logits` warns when a model's HF original has learned per-head sink logits
(gpt-oss) that the TransformerLens model does not carry: its sinks then look different.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int

from tl_spikesink.config import DETECTOR_RULES, MAD_Z, DetectorRule
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.probes.reducers import BIN_SHIFT, abs_bits, bin_edges, histogram_quantile
from tl_spikesink.probes.spikes import Activation, SpikeStats
from tl_spikesink.results import Result, find
from tl_spikesink.tokens import TokenRef
from tl_spikesink.views.format import layer_list, num, pct, text_table

Rule = DetectorRule
RULES = DETECTOR_RULES
MAD_SCALE = 1.4826
"""MAD × this estimates σ of a Gaussian."""


def mad_outliers(
    x: Float[torch.Tensor, " n"], z: float = MAD_Z
) -> tuple[Int[torch.Tensor, " k"], float]:
    """Indices of the entries with |x| > median + z × 1.4826 × MAD of |x|, and that cut (exact).

    >>> x = torch.tensor([1.0, -2.0, 1.5, -1.0, 50.0])
    >>> mad_outliers(x, z=10)[0].tolist()
    [4]
    """
    a = x.abs().double().flatten()
    med = a.median()
    cut = float(med + z * MAD_SCALE * (a - med).abs().median())
    return (a > cut).nonzero()[:, 0], cut


def _cdf(counts: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Share of |x| ≤ v for each histogram row, interpolated as histogram_quantile does."""
    n_bins = counts.shape[-1]
    cum = torch.cat([torch.zeros_like(counts[..., :1]), counts.cumsum(-1)], -1).double()
    vf = v.float().clamp(min=0)
    idx = (abs_bits(vf) >> BIN_SHIFT).long().clamp(max=n_bins - 1)
    lo, hi = bin_edges(idx).double(), bin_edges(idx + 1).double()
    vd = vf.double()
    geometric = torch.log(vd.clamp(min=1e-38) / lo.clamp(min=1e-38)) / torch.log(
        hi / lo.clamp(min=1e-38)
    )
    frac = torch.where(lo > 0, geometric, vd / hi).clamp(0, 1)
    inside = counts.double().gather(-1, idx[..., None]).squeeze(-1)
    below = cum.gather(-1, idx[..., None]).squeeze(-1)
    out = (below + frac * inside) / cum[..., -1].clamp(min=1)
    return torch.where(v < 0, torch.zeros_like(out), out)


def histogram_mad(counts: Int[torch.Tensor, "... bins"]) -> Float[torch.Tensor, "..."]:
    """Median absolute deviation of |x| from its median, from a streaming |x| histogram.

    Solves F(m + d) − F(m − d) = 1/2 for d by bisection on the interpolated histogram CDF F;
    within a few % of the exact MAD, like the histogram median.
    """
    med = histogram_quantile(counts, 0.5).double()
    lo = torch.zeros_like(med)
    # Every |x| lies below the top edge of the highest non-empty bin: the bracket's upper end.
    top = (counts > 0).long().cumsum(-1).argmax(-1)
    hi = bin_edges(top + 1).double()
    for _ in range(80):
        mid = (lo + hi) / 2
        inside = _cdf(counts, med + mid) - _cdf(counts, med - mid)
        below = inside < 0.5
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return ((lo + hi) / 2).float()


@dataclass(frozen=True, repr=False)
class Detection(Result):
    """What one rule flags: its cut per layer and every flagged (layer, token, channel)."""

    model: str
    rule: Rule
    cuts: Float[torch.Tensor, " layer"]
    """The |x| a flagged activation must exceed in each layer."""
    flags: tuple[Activation, ...]
    complete: bool
    """False when the scan hit max_candidates, so an entry above a cut may be missing."""
    settings: dict[str, Any]
    corpus: tuple[dict[str, Any], ...] = ()

    @property
    def layer_channels(self) -> tuple[tuple[int, int], ...]:
        """Flagged (layer, channel) pairs, in depth order."""
        return tuple(sorted({(a.layer, a.channel) for a in self.flags}))

    @property
    def channels(self) -> tuple[int, ...]:
        """Flagged channels, ascending."""
        return tuple(sorted({a.channel for a in self.flags}))

    @property
    def layers(self) -> tuple[int, ...]:
        """Layers with at least one flag."""
        return tuple(sorted({a.layer for a in self.flags}))

    @property
    def tokens(self) -> tuple[TokenRef, ...]:
        """Flagged tokens, in corpus order."""
        return tuple(sorted({a.token for a in self.flags}))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the rule, its settings and cuts, and every flag."""
        return self.json_fields(
            "model rule settings complete cuts layer_channels",
            n_tokens_flagged=len(self.tokens),
            flags=[
                {"layer": a.layer, "channel": a.channel, "text_index": a.token.text_index,
                 "start": a.token.start, "position": a.token.position,
                 "token_id": a.token_id, "value": a.value}
                for a in self.flags
            ],  # fmt: skip
            corpus=self.corpus,
        )

    def __str__(self) -> str:
        by_lc: dict[tuple[int, int], list[Activation]] = defaultdict(list)
        for a in self.flags:
            by_lc[(a.layer, a.channel)].append(a)
        rows = [
            [str(layer), str(ch), num(float(self.cuts[layer])), str(len(acts)),
             num(max(abs(a.value) for a in acts))]
            for (layer, ch), acts in sorted(by_lc.items())
        ]  # fmt: skip
        head = f"{self.rule!r} detector on {self.model}: {len(self.tokens)} tokens flagged"
        lines = [head + ("" if self.complete else " (incomplete: raise max_candidates)")]
        if rows:
            lines += text_table(["layer", "channel", "cut", "tokens", "max |x|"], rows)
        else:
            lines.append("  nothing flagged")
        return "\n".join(lines)


@dataclass(frozen=True, repr=False)
class DetectorComparison(Result):
    """Several rules on the same scan, with their agreement with Sun et al.'s."""

    model: str
    detections: tuple[Detection, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    def get(self, rule: Rule) -> Detection:
        """The detection of one rule."""
        error = f"rule {rule!r} was not compared; compared {self.rules}"
        return find(self.detections, "rule", rule, error)

    @property
    def rules(self) -> tuple[Rule, ...]:
        """The rules compared, in order."""
        return tuple(d.rule for d in self.detections)

    def agreement(self, a: Rule, b: Rule) -> float:
        """Jaccard overlap of two rules' flagged (layer, token, channel) sets (NaN if both empty)."""
        sa, sb = (set(_keys(self.get(r))) for r in (a, b))
        return len(sa & sb) / len(sa | sb) if sa | sb else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: each rule's detection and its agreement with the first rule."""
        first = self.rules[0]
        return self.json_fields(
            "model settings",
            detections=[d.to_dict() for d in self.detections],
            agreement_with=first,
            agreement={r: self.agreement(first, r) for r in self.rules},
        )

    def __str__(self) -> str:
        first = self.rules[0]
        head = ["rule", "activations", "(layer, ch)", "channels", "tokens", "layers",
                f"agree w/ {first}"]  # fmt: skip
        rows = [
            [d.rule, str(len(d.flags)), str(len(d.layer_channels)),
             ",".join(map(str, d.channels[:6])) or "none", str(len(d.tokens)),
             _span(d.layers), pct(self.agreement(first, d.rule))]
            for d in self.detections
        ]  # fmt: skip
        return "\n".join(
            [f"massive-activation detectors on {self.model}", *text_table(head, rows)]
        )


def _keys(d: Detection) -> list[tuple[int, TokenRef, int]]:
    return [(a.layer, a.token, a.channel) for a in d.flags]


def _span(layers: tuple[int, ...]) -> str:
    if len(layers) > 4 and layers == tuple(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return layer_list(layers)


def default_min_layers(n_layers: int) -> int:
    """Heretic's confirmation: the layer plus the next ⌊(L + 1) / 4⌋ hidden states."""
    return 1 + (n_layers + 1) // 4


def _above(s: SpikeStats, cuts: torch.Tensor) -> list[Activation]:
    found: list[Activation] = []
    for layer in range(s.n_layers):
        found += [
            a for a in s.top_activations("resid_post", layer, n=None) if abs(a.value) > cuts[layer]
        ]
    return found


def _persistent(flags: list[Activation], min_layers: int) -> list[Activation]:
    runs: dict[tuple[TokenRef, int], dict[int, Activation]] = defaultdict(dict)
    for a in flags:
        runs[(a.token, a.channel)][a.layer] = a
    kept: list[Activation] = []
    for by_layer in runs.values():
        layers = sorted(by_layer)
        start = 0
        for i in range(1, len(layers) + 1):
            if i == len(layers) or layers[i] != layers[i - 1] + 1:
                if i - start >= min_layers:
                    kept += [by_layer[layer] for layer in layers[start:i]]
                start = i
    return sorted(kept, key=lambda a: (a.layer, a.token, a.channel))


def _scan_of(source: Any, texts: Any, progress: bool, settings: dict[str, Any]) -> Any:
    from tl_spikesink.probes.scan import ScanResult, scan

    if isinstance(source, ScanResult):
        if texts is not None or settings:
            raise SpikeSinkError(
                "detect() was given a ScanResult and texts or scan settings; pass a model to "
                "scan those texts, or the scan alone"
            )
        return source
    if not hasattr(source, "cfg"):
        raise SpikeSinkError(
            f"detect() needs a ScanResult or a TransformerLens model, got {type(source).__name__}"
        )
    return scan(source, texts, progress=progress, **settings)


def detect(
    source: Any,
    texts: Any = None,
    rule: Rule = "sun",
    *,
    z: float = MAD_Z,
    min_layers: int | None = None,
    progress: bool = False,
    **settings: Any,
) -> Detection:
    """Flag massive activations in `source` by one rule.

    Args:
        source: a :class:`~tl_spikesink.probes.scan.ScanResult`, or a model to scan `texts`
            with (None: the default corpus; `settings` go to the scan, e.g. ``max_tokens``).
        rule: ``"sun"``, ``"mad"`` or ``"persistent"`` (see the module docstring).
        z: the MAD rule's multiple of the scaled MAD.
        min_layers: the persistence rule's run length (default :func:`default_min_layers`).
        progress: show the scan's progress bar.

    Returns:
        A frozen :class:`Detection`.

    Example:
        >>> detect(result, rule="persistent").layer_channels  # doctest: +SKIP
    """
    if rule not in RULES:
        raise SpikeSinkError(f"rule must be one of {RULES}, got {rule!r}")
    if not (math.isfinite(z) and z > 0):
        raise SpikeSinkError(f"z must be a positive number, got {z!r}")
    scanned = _scan_of(source, texts, progress, settings)
    s = scanned.spikes
    m = default_min_layers(s.n_layers) if min_layers is None else min_layers
    if not 1 <= m <= s.n_layers:
        raise SpikeSinkError(f"min_layers must lie in [1, n_layers = {s.n_layers}], got {m}")
    hist = s.histograms[s.sites.index("resid_post")]
    used: dict[str, Any] = {"abs_threshold": s.abs_threshold}
    if rule == "mad":
        med, mad = s.median("resid_post"), histogram_mad(hist)
        cuts = (med + z * MAD_SCALE * mad).clamp(min=s.abs_threshold)
        flags = _above(s, cuts)
        used |= {"z": z, "mad_scale": MAD_SCALE}
    else:
        cuts = s.cut
        flags = list(s.massive)
        used["rel_threshold"] = s.rel_threshold
        if rule == "persistent":
            flags = _persistent(flags, m)
            used["min_layers"] = m
    return Detection(
        model=scanned.model,
        rule=rule,
        cuts=cuts.float(),
        flags=tuple(flags),
        complete=not s.truncated,
        settings=used,
        corpus=scanned.corpus,
    )


def compare_detectors(
    source: Any,
    texts: Any = None,
    rules: Sequence[Rule] = RULES,
    *,
    z: float = MAD_Z,
    min_layers: int | None = None,
    progress: bool = False,
    **settings: Any,
) -> DetectorComparison:
    """Run several rules on one scan (one forward pass over the corpus at most).

    Example:
        >>> print(compare_detectors(result))  # doctest: +SKIP
    """
    if not rules:
        raise SpikeSinkError(f"rules must name at least one of {RULES}")
    scanned = _scan_of(source, texts, progress, settings)
    found = tuple(detect(scanned, rule=r, z=z, min_layers=min_layers) for r in rules)
    return DetectorComparison(scanned.model, found, {"z": z, "min_layers": min_layers})


_SINK_PARAMS = ("sinks", "sink")


def check_sink_logits(model: Any) -> bool:
    """Warn if the model's HF original has learned sink logits this model does not carry.

    gpt-oss attention (HF ``GptOssAttention.sinks``) adds one learned logit per head to every
    softmax. A TransformerLens model without them attends differently, so its sink heads are
    not the original's. Warns when ``cfg.original_architecture`` or the model name says
    gpt-oss, or ``cfg.use_attention_sinks`` is set, and no ``sinks`` parameter exists (or, for
    gpt-oss, all of them are zero: the weights were not loaded).

    Returns:
        True if it warned.
    """
    cfg = getattr(model, "cfg", None)
    names = (getattr(cfg, "original_architecture", None), getattr(cfg, "model_name", None))
    gpt_oss = any(
        n and "gptoss" in str(n).lower().replace("_", "").replace("-", "") for n in names
    )
    if not (gpt_oss or getattr(cfg, "use_attention_sinks", False)):
        return False
    sinks = [p for name, p in model.named_parameters() if name.split(".")[-1] in _SINK_PARAMS]
    where = f"{type(model).__name__} ({getattr(cfg, 'model_name', '?')})"
    if not sinks:
        message = (
            f"{where} has no learned attention-sink parameters, but its original "
            f"({names[0] or 'gpt-oss'}) adds a learned per-head sink logit to every softmax; "
            "its attention patterns and sink heads will differ from the original's. Load it "
            "with a TransformerLens version that supports use_attention_sinks"
        )
    elif gpt_oss and all(not bool(p.detach().any()) for p in sinks):
        message = (
            f"{where}'s attention-sink logits are all zero; gpt-oss's are learned, so the "
            "weights were probably not converted. Reload from the pretrained checkpoint"
        )
    else:
        return False
    warnings.warn(message, UserWarning, stacklevel=2)
    return True


__all__ = [
    "MAD_SCALE",
    "MAD_Z",
    "RULES",
    "Detection",
    "DetectorComparison",
    "Rule",
    "check_sink_logits",
    "compare_detectors",
    "default_min_layers",
    "detect",
    "histogram_mad",
    "mad_outliers",
]
