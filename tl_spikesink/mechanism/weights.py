"""The spike read off the weights alone (paper Fig. 3–4): outlier FFN channels and blocks.

For a gated FFN, output channel k is, where SiLU runs near the identity, the quadratic form
h̃ᵀ U_k h̃ with U_k = Σ_i W_down[k, i] g_i u_iᵀ (paper Eq. 16–17), g_i and u_i the gate and up
rows of hidden unit i. In TransformerLens's orientation (``W_gate``, ``W_in``: [d_model, d_mlp],
``W_out``: [d_mlp, d_model]) g_i = W_gate[:, i], u_i = W_in[:, i] and W_down[k, i] = W_out[i, k],
so with w_k = W_out[:, k]

    ‖U_k‖_F² = Σ_ij w_ki w_kj (g_i·g_j)(u_i·u_j) = w_kᵀ (G ∘ Uu) w_k,
    G = W_gateᵀ W_gate, Uu = W_inᵀ W_in   (d_mlp × d_mlp),

one kernel per block for all of its d_model channels, no d × d matrix per channel. The norm's
learned scale γ multiplies g_i and u_i: with ``fold_ln`` (how :func:`tl_spikesink.load`
converts, ``normalization_type="RMSPre"``) it is already inside ``W_gate`` / ``W_in``; an
unfolded ``RMS`` model's ``ln2.w`` is multiplied in here, so both read the same U_k.

Outlier rule (ours; the paper shows Fig. 3 and names no threshold): channel k of block ℓ is an
outlier when ‖U_k‖_F exceeds `factor` (10) × the median over the channels of block ℓ **and**
`factor` × the median over every channel of every block. The second condition keeps a block
whose channels are all small from contributing an "outlier" that is large only locally.

Step-up / step-down from the weights (ours): where the trigger direction s⋆ of S_k = ½(U_k +
U_kᵀ) (eigenvector of the eigenvalue λ⋆ of largest |λ|) is hit, the block writes λ⋆·d·cos² into
channel k (Eq. 19), so the sign of λ⋆ is the sign it writes. Walking the outlier blocks in
depth order, the first to hold channel k sets the spike's sign there and steps it up; a later
block with the same sign steps it up further, one with the opposite sign steps it down. A
block is classified by its largest outlier channel. Only FFN blocks have a U_k: a step-down done
by attention (some of the paper's Table 1 rows) is invisible to the weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float

from tl_spikesink.mechanism.captures import require_gated
from tl_spikesink.results import Result

DEFAULT_FACTOR = 10.0
"""An outlier's ‖U_k‖_F exceeds this multiple of its block's median (and the global median)."""
MAX_CHANNELS = 3
"""Outlier channels per block whose d × d matrix S_k is built (for λ⋆ and s⋆)."""


def _gate_up(model: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W_gate and W_in of block `layer` (float64), times ln2's weight when it is not folded."""
    mlp = model.blocks[layer].mlp
    g, u = mlp.W_gate.detach().double(), mlp.W_in.detach().double()
    w = getattr(getattr(model.blocks[layer], "ln2", None), "w", None)
    if w is not None:
        g, u = g * w.detach().double()[:, None], u * w.detach().double()[:, None]
    return g, u


def u_frobenius(model: Any, layer: int | None = None) -> Float[torch.Tensor, ...]:
    """‖U_k‖_F of every output channel k, in closed form.

    Args:
        model: a TransformerLens model with a gated MLP; only read.
        layer: one block (returns [d_model]); None for every block (returns [layer, d_model]).

    Raises:
        SpikeSinkError: the model has no gated MLP.
    """
    require_gated(model, "‖U_k‖_F from the weights")
    if layer is None:
        return torch.stack([u_frobenius(model, i) for i in range(int(model.cfg.n_layers))])
    with torch.inference_mode():
        g, u = _gate_up(model, layer)
        kernel = (g.T @ g) * (u.T @ u)  # G ∘ Uu, d_mlp × d_mlp
        w_out = model.blocks[layer].mlp.W_out.detach().double()
        sq = ((kernel @ w_out) * w_out).sum(0)
        return sq.clamp(min=0).sqrt().float().cpu()


def u_matrix(model: Any, layer: int, channel: int) -> Float[torch.Tensor, "d_model d_model"]:
    """U_k = Σ_i W_out[i, k] g_i u_iᵀ of one channel (a d × d matrix: for a few channels only)."""
    require_gated(model, "U_k from the weights")
    with torch.inference_mode():
        g, u = _gate_up(model, layer)
        wk = model.blocks[layer].mlp.W_out.detach().double()[:, channel]
        return ((g * wk) @ u.T).float().cpu()


def _dominant(model: Any, layer: int, channel: int) -> tuple[float, torch.Tensor, float]:
    """λ⋆ (largest |λ|) of S_k, its unit eigenvector s⋆, and |λ⋆| / ‖S_k‖_F."""
    u = u_matrix(model, layer, channel).double()
    vals, vecs = torch.linalg.eigh(0.5 * (u + u.T))
    i = int(vals.abs().argmax())
    norm = float(vals.norm())
    return float(vals[i]), vecs[:, i].float(), abs(float(vals[i])) / norm if norm else math.nan


@dataclass(frozen=True)
class Outlier:
    """One outlier channel of one FFN block."""

    layer: int
    """TransformerLens block (the paper's FFN block 2·layer + 2)."""
    channel: int
    norm: float
    """‖U_k‖_F."""
    ratio: float
    """‖U_k‖_F over the median of its block's channels."""
    lambda_star: float | None = None
    """Dominant eigenvalue of S_k (None past the `max_channels` largest of the block)."""
    lambda_share: float | None = None
    """|λ⋆| / ‖S_k‖_F: 1 when one direction carries the whole form (Fig. 4)."""


@dataclass(frozen=True, repr=False)
class WeightReading(Result):
    """Where the weights say the spike is made and unmade, and whether the scan agrees."""

    model: str
    norms: Float[torch.Tensor, "layer d_model"]
    """‖U_k‖_F of every channel of every FFN block (paper Fig. 3)."""
    factor: float
    outliers: tuple[Outlier, ...]
    """Outlier (block, channel) pairs, in depth order, largest first within a block."""
    step_up: tuple[int, ...]
    """FFN blocks (TransformerLens layers) read from the weights as stepping a spike up."""
    step_down: tuple[int, ...]
    """... and as stepping it down."""
    spike_channels: tuple[int, ...]
    """Channels whose trigger directions were compared (the scan's, else the first block's)."""
    trigger_layer: int | None
    """Block where the trigger directions s⋆ were compared (the first step-up block)."""
    trigger_cosine: Float[torch.Tensor, "channel channel"]
    """|cos(s⋆_k, s⋆_k')| between the spike channels' trigger directions there (Fig. 4)."""
    gate_up_cosine: Float[torch.Tensor, " channel"]
    """cos(g_i, u_i) of the hidden unit that writes most into each spike channel there."""
    scan_step_up: tuple[int, ...] | None = None
    """FFN blocks the scan's lifecycle saw step a spike up (None without a scan)."""
    scan_step_down: tuple[int, ...] | None = None

    @property
    def blocks(self) -> tuple[int, ...]:
        """FFN blocks holding at least one outlier channel."""
        return tuple(sorted({o.layer for o in self.outliers}))

    @property
    def channels(self) -> tuple[int, ...]:
        """Outlier channels, those found in the most blocks first."""
        count: dict[int, int] = {}
        for o in self.outliers:
            count[o.channel] = count.get(o.channel, 0) + 1
        return tuple(sorted(count, key=lambda c: (-count[c], c)))

    @property
    def min_trigger_cosine(self) -> float:
        """Smallest pairwise |cos| of the spike channels' s⋆ (NaN with fewer than two)."""
        n = self.trigger_cosine.shape[0]
        if n < 2:
            return math.nan
        off = ~torch.eye(n, dtype=torch.bool)
        return float(self.trigger_cosine[off].min())

    @property
    def agrees_step_up(self) -> bool | None:
        """Whether the weights' step-up blocks are the scan's step-up FFN blocks."""
        return None if self.scan_step_up is None else set(self.step_up) == set(self.scan_step_up)

    @property
    def agrees_step_down(self) -> bool | None:
        """Whether the weights' step-down blocks are the scan's step-down FFN blocks."""
        if self.scan_step_down is None:
            return None
        return set(self.step_down) == set(self.scan_step_down)

    @property
    def outliers_in_lifecycle(self) -> float:
        """Share of outlier blocks that the scan saw step a spike up or down (NaN: no scan)."""
        if self.scan_step_up is None or not self.blocks:
            return math.nan
        known = set(self.scan_step_up) | set(self.scan_step_down or ())
        return sum(b in known for b in self.blocks) / len(self.blocks)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN as null); `norms` is left out (layer × d_model numbers)."""
        from tl_spikesink.views.format import json_clean

        return json_clean(
            {
                "model": self.model,
                "factor": self.factor,
                "blocks": list(self.blocks),
                "channels": list(self.channels),
                "step_up": list(self.step_up),
                "step_down": list(self.step_down),
                "outliers": [o.__dict__ for o in self.outliers],
                "spike_channels": list(self.spike_channels),
                "trigger_layer": self.trigger_layer,
                "trigger_cosine": self.trigger_cosine,
                "min_trigger_cosine": self.min_trigger_cosine,
                "gate_up_cosine": self.gate_up_cosine,
                "scan_step_up": None if self.scan_step_up is None else list(self.scan_step_up),
                "scan_step_down": (
                    None if self.scan_step_down is None else list(self.scan_step_down)
                ),
                "agrees_step_up": self.agrees_step_up,
                "agrees_step_down": self.agrees_step_down,
            }
        )

    def __str__(self) -> str:
        from tl_spikesink.views.format import layer_list, num

        def agree(x: bool | None) -> str:
            return "" if x is None else (" (agrees with the scan)" if x else " (the scan differs)")

        lines = [
            f"weights of {self.model}: ‖U_k‖_F outliers (> {self.factor:g}× median) in FFN "
            f"blocks {layer_list(self.blocks)}, channels {layer_list(self.channels)}",
            f"  step-up {layer_list(self.step_up)}{agree(self.agrees_step_up)}; "
            f"step-down {layer_list(self.step_down)}{agree(self.agrees_step_down)}",
        ]
        if self.trigger_layer is not None:
            lines.append(
                f"  trigger directions at block {self.trigger_layer}: min |cos(s⋆, s⋆')| "
                f"{num(self.min_trigger_cosine)} over channels {layer_list(self.spike_channels)}"
            )
        for o in self.outliers[:8]:
            lines.append(
                f"  block {o.layer} channel {o.channel}: ‖U‖_F {num(o.norm)} "
                f"({num(o.ratio)}× median), λ⋆ {num(o.lambda_star)}"
            )
        return "\n".join(lines)


def read_weights(
    model: Any,
    scan: Any = None,
    *,
    factor: float = DEFAULT_FACTOR,
    max_channels: int = MAX_CHANNELS,
) -> WeightReading:
    """Find the outlier ‖U_k‖_F channels and blocks and read step-up / step-down off them.

    Args:
        model: a TransformerLens model with a gated MLP; only read.
        scan: the model's scan, for the comparison with its lifecycle and its spike channels
            (optional: the weights alone give every other field).
        factor: the outlier rule's multiple of the median.
        max_channels: outlier channels per block whose S_k is eigen-decomposed.

    Raises:
        SpikeSinkError: the model has no gated MLP.
    """
    norms = u_frobenius(model)
    block_median = norms.median(-1).values
    global_median = float(norms.median())
    outliers: list[Outlier] = []
    for layer in range(norms.shape[0]):
        row = norms[layer]
        med = float(block_median[layer])
        hot = (row > factor * med) & (row > factor * global_median)
        order = [int(c) for c in row.argsort(descending=True) if bool(hot[c])]
        for rank, c in enumerate(order):
            lam, share = (None, None)
            if rank < max_channels:
                lam, _, share = _dominant(model, layer, c)
            ratio = float(row[c]) / med if med > 0 else math.inf
            outliers.append(Outlier(layer, c, float(row[c]), ratio, lam, share))
    step_up, step_down = _classify(outliers)

    scan_up = scan_down = None
    spike_channels: tuple[int, ...] = ()
    if scan is not None:
        events = scan.spikes.lifecycle
        scan_up = tuple(sorted({la for la, comp in events["step_up"] if comp == "mlp"}))
        scan_down = tuple(sorted({la for la, comp in events["step_down"] if comp == "mlp"}))
        spike_channels = tuple(scan.spikes.channels)
    trigger_layer = step_up[0] if step_up else None
    if trigger_layer is not None:
        # The scan's spike channels when it has them (a channel that spikes only because it
        # rides along with the main one need not be an outlier); the block's outliers otherwise.
        here = [o.channel for o in outliers if o.layer == trigger_layer]
        spike_channels = tuple((spike_channels or tuple(here))[:max_channels])
    cos, gate_up = _triggers(model, trigger_layer, spike_channels)
    return WeightReading(
        model=str(getattr(model.cfg, "model_name", type(model).__name__)),
        norms=norms,
        factor=factor,
        outliers=tuple(outliers),
        step_up=step_up,
        step_down=step_down,
        spike_channels=spike_channels if trigger_layer is not None else (),
        trigger_layer=trigger_layer,
        trigger_cosine=cos,
        gate_up_cosine=gate_up,
        scan_step_up=scan_up,
        scan_step_down=scan_down,
    )


def _classify(outliers: list[Outlier]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Step-up and step-down blocks by the sign each block writes into its largest channel."""
    spike_sign: dict[int, float] = {}  # set by the first block that holds the channel
    up: list[int] = []
    down: list[int] = []
    for layer in sorted({o.layer for o in outliers}):
        here = [o for o in outliers if o.layer == layer and o.lambda_star is not None]
        for o in here:
            spike_sign.setdefault(o.channel, math.copysign(1.0, o.lambda_star))
        if not here:  # max_channels=0: no sign to read; count the block as writing the spike
            up.append(layer)
            continue
        lead = here[0]
        same = math.copysign(1.0, lead.lambda_star) == spike_sign[lead.channel]
        (up if same else down).append(layer)
    return tuple(up), tuple(down)


def _triggers(
    model: Any, layer: int | None, channels: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    if layer is None or not channels:
        return torch.zeros(0, 0), torch.zeros(0)
    vecs = torch.stack([_dominant(model, layer, c)[1] for c in channels])
    cos = (vecs @ vecs.T).abs()
    with torch.inference_mode():
        g, u = _gate_up(model, layer)
        w_out = model.blocks[layer].mlp.W_out.detach().double()
        gate_up = []
        for c in channels:
            # The unit writing most into channel c: |W_out[i, c]|·‖g_i‖‖u_i‖ bounds its term.
            i = int((w_out[:, c].abs() * g.norm(dim=0) * u.norm(dim=0)).argmax())
            gate_up.append(float(torch.nn.functional.cosine_similarity(g[:, i], u[:, i], dim=0)))
    return cos.float(), torch.tensor(gate_up)


__all__ = [
    "DEFAULT_FACTOR",
    "Outlier",
    "WeightReading",
    "read_weights",
    "u_frobenius",
    "u_matrix",
]
