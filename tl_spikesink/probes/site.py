"""The spike site of a scan: which block makes the main spike, one rule for every analysis.

The site is read off the scan's lifecycle (:attr:`.SpikeStats.lifecycle`): a *step-up block* is
a (layer, component) whose own attention or MLP output writes at least half of a massive
activation (same sign, same token and channel) into the residual stream, as the seed paper's
Fig. 1 and Table 1 identify them (Sun, Canziani, LeCun & Zhu 2026, §3.1). A model may have
several; the *main* one is the step-up block that carries the largest spike, the largest |x| at
`hook_resid_post` of its layer among the spikes it created (ties: more step-up events, then the
earlier block). The largest spike is chosen over the most events because a small early spike can
sit on as many tokens as the big one (both on every first token), while the analyses that use
the site (ablation, representations, MLP mechanism) are about the spike the model carries along
its plateau. The paper's own step-up blocks are the "one or two early blocks whose own output
carries the extreme value", which is the same block whenever there is one extreme value.

When spikes exist but no block writes half of any of them, the spike grows over many blocks and
there is no site: :func:`spike_site` raises :class:`NoStepUpBlock`, which names the layers that
carry it, so an analysis can report "not applicable" with that reason.

Example:
    >>> site = spike_site(result)  # doctest: +SKIP
    >>> site.main.layer, site.main.component, site.main.paper_block  # doctest: +SKIP
    (11, 'mlp', 24)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from tl_spikesink.anatomy import Component, paper_block
from tl_spikesink.errors import SpikeSinkError


class NoStepUpBlock(SpikeSinkError):
    """The scan has massive activations, but no block's own output writes half of any of them."""

    def __init__(self, model: str, first: int, last: int, hint: str = ""):
        # The model's name, and the first and last layer whose resid_post holds a spike.
        self.model, self.first, self.last, self.hint = model, first, last, hint
        super().__init__(
            f"no step-up block: the spike accumulates over blocks {first}–{last} "
            f"(TransformerLens layers whose resid_post holds a massive activation in the scan of "
            f"{model}; no attention or MLP output there writes half of a spike){hint}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its parts, so it survives pickling (worker processes).
        return type(self), (self.model, self.first, self.last, self.hint)


class SiteBlock(NamedTuple):
    """One sublayer: TransformerLens layer and component, and the paper's block number."""

    layer: int
    component: Component
    paper_block: int
    """The seed paper's 1-indexed block number, 2·layer + 1 (attn) or 2·layer + 2 (mlp)."""


@dataclass(frozen=True)
class SpikeSite:
    """Where the main spike is made, as read from a scan by :func:`spike_site`."""

    step_up: tuple[SiteBlock, ...]
    """Every step-up block of the scan, in depth order."""
    main: SiteBlock
    """The step-up block carrying the largest spike."""
    layer: int
    """Layer of `main`: its resid_post is the first to carry the main spike."""
    channels: tuple[int, ...]
    """Spike channels massive at `layer`, most spike tokens first."""
    cut: float
    """|resid_post| at `layer` above which a token is a spike token (the scan's own cut)."""
    step_down: int | None
    """First layer after `layer` with a step-down block, if any."""
    step_down_layers: tuple[int, ...]
    """Every layer after `layer` with a step-down block, in depth order."""
    peak: float
    """Largest |x| at resid_post of `layer` among the spikes `main` created."""
    reason: str
    """Why this site: the rule and the numbers it compared, in one sentence."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record (for reports and intervention settings)."""
        return {
            "layer": self.layer,
            "component": self.main.component,
            "paper_block": self.main.paper_block,
            "step_up": [b._asdict() for b in self.step_up],
            "channels": list(self.channels),
            "cut": self.cut,
            "step_down": self.step_down,
            "step_down_layers": list(self.step_down_layers),
            "peak": self.peak,
            "reason": self.reason,
        }


def spike_site(scan: Any) -> SpikeSite:
    """The main spike's site in `scan`: its step-up block, layer, channels and cut.

    Args:
        scan: a :class:`~tl_spikesink.probes.scan.ScanResult` whose spike sites include
            `attn_out` and `mlp_out` (the default), since step-up blocks are read from them.

    Returns:
        A frozen :class:`SpikeSite`.

    Raises:
        NoStepUpBlock: the scan has massive activations but no step-up block.
        SpikeSinkError: the scan found no massive activation, or did not scan block outputs.
    """
    spikes = scan.spikes
    if not spikes.massive:
        raise SpikeSinkError(
            f"the scan of {scan.model} found no massive activation, so there is no spike site; "
            "spike analyses need one"
        )
    if not {"attn_out", "mlp_out"} & set(spikes.sites):
        raise SpikeSinkError(
            "the spike site is read from block outputs; scan with spike_sites including "
            f"'attn_out' and 'mlp_out' (this scan has {spikes.sites})"
        )
    counts, peaks = spikes.lifecycle["step_up"], spikes.lifecycle_peaks["step_up"]
    if not counts:
        layers = spikes.massive_layers
        raise NoStepUpBlock(scan.model, layers[0], layers[-1])
    blocks = {key: SiteBlock(key[0], key[1], paper_block(*key)) for key in counts}
    order = sorted(blocks)  # depth order: layer, then "attn" before "mlp"
    best = max(order, key=lambda key: (peaks[key], counts[key], -order.index(key)))
    main = blocks[best]
    layer = main.layer
    here = {a.channel for a in spikes.massive if a.layer == layer}
    channels = tuple(c for c in spikes.channels if c in here) or spikes.channels
    later = tuple(x for x in spikes.step_down_layers if x > layer)
    others = [k for k in order if k != best]
    reason = (
        f"layer {layer} {main.component} (paper block {main.paper_block}) writes at least half "
        f"of {counts[best]} spikes, the largest |x| = {peaks[best]:.4g} at resid_post of any "
        "step-up block"
    )
    if others:
        reason += "; other step-up blocks: " + ", ".join(
            f"layer {k[0]} {k[1]} (block {blocks[k].paper_block}, largest {peaks[k]:.4g})"
            for k in others
        )
    return SpikeSite(
        step_up=tuple(blocks[k] for k in order),
        main=main,
        layer=layer,
        channels=channels,
        cut=_cut(spikes, layer),
        step_down=later[0] if later else None,
        step_down_layers=later,
        peak=float(peaks[best]),
        reason=reason,
    )


def _cut(spikes: Any, layer: int) -> float:
    # In Python floats, as the interventions compute it, so both agree to the last bit.
    median = float(spikes.median("resid_post").nan_to_num(0.0)[layer])
    return max(spikes.abs_threshold, spikes.rel_threshold * median)


__all__ = ["NoStepUpBlock", "SiteBlock", "SpikeSite", "spike_site"]
