"""Round-to-nearest fake quantization of activations and weights, with chosen tokens kept exact.

**Activations** (:func:`activation_quantization`): symmetric RTN to INT`b` at chosen hook points,
q(x) = clamp(round(x / s), −Q, Q)·s with Q = 2^(b−1) − 1 and s = max|x| / Q (``torch.round``:
ties to even). The max runs over one token's whole activation ("token": the d_model values of
a residual or normalized input, the n_heads·d_head values of a key or value) or over one
sequence's whole activation ("tensor": dynamic per-tensor quantization with each sequence its
own forward pass, so the numbers do not depend on how sequences are batched). Sites, in every
block: "resid" ``hook_resid_pre`` (the residual stream; the error then flows on through the skip
connections), "mlp_in" ``ln2.hook_normalized`` and "attn_in" ``ln1.hook_normalized`` (the inputs
of the linear layers, before the folded norm weight), "kv" ``attn.hook_k`` and ``attn.hook_v``
(keys before rotary, as TransformerLens hooks them). Kept tokens ("spike", "sink", "first:k")
stay in full precision *and* leave the max, so they no longer set the other tokens' scale;
pads are never quantized and never enter the max.

**Token classes** (:class:`TokenClasses`, a probe for a clean pass): a position is a *spike
token* when its clean ``hook_resid_post`` has |x| above the scan's massive cut of that layer,
max(abs_threshold, rel_threshold × the scan's median |x|), at any layer and channel (the scan's
own rule, with the scan's medians); a *sink token* when at least `sink_token_share` of all
L·H heads give it α_k > ε, α_k being the mean attention it receives from the queries that see
it, among keys seen by at least `min_queries` queries (the scan's per-token rule, Gu et al.'s
Sink^ε_k). On the scan's own corpus both give the scan's spike and sink tokens.

**Weights** (:func:`weight_rtn`): symmetric RTN per output channel of W_out (``"mlp_out"``) or of
every linear weight of the blocks (``"all"``: W_Q, W_K, W_V, W_O, W_in, W_gate, W_out; the
embedding and unembedding stay exact). Kept weights (a super weight) stay exact and leave their
channel's max. The parameters are changed in place for the body of a ``with`` block only, from
saved clones restored bit-exactly in ``finally``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from jaxtyping import Bool, Float

from tl_spikesink.anatomy import block_hook, hook_name
from tl_spikesink.config import QUANT_SITES, QuantSite
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.interventions.base import Intervention, check_layers, model_dims
from tl_spikesink.probes.engine import HookFn, Probe, Step

if TYPE_CHECKING:
    from tl_spikesink.probes.scan import ScanResult

Granularity = Literal["token", "tensor"]
WeightScope = Literal["mlp_out", "all"]
TokenClass = Literal["spike", "sink"]
_SITE_HOOKS: dict[QuantSite, tuple[str, ...]] = {
    "resid": ("hook_resid_pre",),
    "mlp_in": ("ln2.hook_normalized",),
    "attn_in": ("ln1.hook_normalized",),
    "kv": ("attn.hook_k", "attn.hook_v"),
}
_KEEP = re.compile(r"none|spike|sink|first:([1-9][0-9]*)")
_INPUT_DIMS = {"W_Q": (1,), "W_K": (1,), "W_V": (1,), "W_O": (0, 1), "W_in": (0,),
               "W_gate": (0,), "W_out": (0,)}  # fmt: skip
"""Per TransformerLens weight (oriented [..., d_in, d_out]): the dims one output channel spans."""


def qmax(bits: int) -> int:
    """Largest level of symmetric signed INT`bits`: 2^(bits−1) − 1 (127 for INT8, 7 for INT4)."""
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise SpikeSinkError(
            f"bits must be an integer in 2..16 (8 for INT8, 4 for INT4), got {bits!r}"
        )
    return 2 ** (bits - 1) - 1


def rtn(
    x: Float[torch.Tensor, "*shape"],
    bits: int,
    dims: tuple[int, ...],
    quantize: Bool[torch.Tensor, "*shape"] | None = None,
) -> Float[torch.Tensor, "*shape"]:
    """Symmetric round-to-nearest of `x` with one scale per slice over `dims` (a new tensor).

    Entries where `quantize` (broadcast to `x`) is False are returned as they are and do not
    enter their slice's max. A slice of zeros stays zero.
    """
    q = qmax(bits)
    xf = x.float()
    size = xf.abs() if quantize is None else torch.where(quantize, xf.abs(), 0.0)
    scale = size.amax(dim=dims, keepdim=True) / q
    scale = torch.where(scale > 0, scale, 1.0)
    out = (xf / scale).round().clamp(-q, q) * scale
    if quantize is not None:
        out = torch.where(quantize, out, xf)
    return out.to(x.dtype)


def parse_keep(keep: str) -> tuple[str, int]:
    """("none" | "spike" | "sink" | "first", k) from "none", "spike", "sink" or "first:k"."""
    m = _KEEP.fullmatch(str(keep))
    if m is None:
        raise SpikeSinkError(
            f"keep={keep!r} is not understood; use 'none', 'spike', 'sink' or 'first:k' (k ≥ 1)"
        )
    return ("first", int(m.group(1))) if m.group(1) else (m.group(0), 0)


class TokenClasses(Probe):
    """Read-only probe for a clean pass: per batch, which positions are spike and sink tokens.

    Put it first in the clean pass; later passes of the same batch (quantization hooks, loss
    probes) read :attr:`mask`, :meth:`of` and :meth:`keep`. The masks of every batch are kept
    (two booleans a token), so a later run over the same corpus can :meth:`replay` them.
    Positions are columns, so batches must be right-padded (the engine's default).
    """

    def __init__(self, scan: ScanResult):
        self.n_layers, self.n_heads = scan.n_layers, scan.n_heads
        self.cuts = [float(c) for c in scan.spikes.cut]
        c = scan.config
        self.epsilon, self.min_queries = c.epsilon, c.min_queries
        self.min_votes = c.sink_token_share * scan.n_layers * scan.n_heads
        self.rule = (
            f"spike: clean |resid_post| > the scan's cut of the layer (max({c.abs_threshold:g}, "
            f"{c.rel_threshold:g} × median)) at any layer and channel; sink: alpha_k > "
            f"{c.epsilon:g} in at least {c.sink_token_share:g} of the "
            f"{scan.n_layers * scan.n_heads} heads, keys seen by >= {c.min_queries} queries"
        )
        self.masks: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        """Per batch index: (real, spike, sink) masks [batch, pos] on the CPU."""
        self.index = -1
        self._replay = False

    def replay(self) -> TokenClasses:
        """This probe reading back the masks it recorded instead of hooking a forward pass."""
        twin = object.__new__(TokenClasses)
        twin.__dict__.update(self.__dict__)
        twin._replay = True
        return twin

    def hooks(self) -> list[tuple[str, HookFn]]:
        """Read hooks on every block's resid_post and attention pattern (none when replaying)."""
        if self._replay:
            return []
        spikes = [
            (hook_name("resid_post", la), self._spike_hook(la)) for la in range(self.n_layers)
        ]
        sinks = [(hook_name("pattern", la), self._sink_hook) for la in range(self.n_layers)]
        return spikes + sinks

    def start_batch(self, step: Step) -> None:
        """Learn the batch: its padding mask, and fresh spike and sink counters."""
        if step.batch.first.any():
            raise SpikeSinkError("token classes need right-padded batches (padding_side='right')")
        self.index = step.index
        self.mask = step.mask
        if self._replay:
            if step.index not in self.masks:
                raise SpikeSinkError(f"no token classes were recorded for batch {step.index}")
            return
        self.spike = torch.zeros_like(step.mask)
        self.votes = torch.zeros(step.mask.shape, device=step.mask.device)
        lengths = step.mask.sum(-1, keepdim=True)
        pos = torch.arange(step.mask.shape[1], device=step.mask.device)
        self.seen_by = (lengths - pos).clamp(min=0)  # queries that see each key
        self.done = -1

    def _spike_hook(self, layer: int) -> HookFn:
        def hook(resid: Float[torch.Tensor, "batch pos d_model"], hook: Any) -> None:
            self.spike |= (resid.detach().abs() > self.cuts[layer]).any(-1) & self.mask

        return hook

    def _sink_hook(self, pattern: Float[torch.Tensor, "batch head query key"], hook: Any) -> None:
        p = pattern.detach().float().nan_to_num(0.0)
        alpha = (
            torch.einsum("bhqk,bq->bhk", p, self.mask.float()) / self.seen_by.clamp(min=1)[:, None]
        )
        self.votes += (alpha > self.epsilon).sum(1)

    def end_batch(self, step: Step, logits: torch.Tensor | None = None) -> None:
        """Record the batch's spike and sink masks."""
        if self._replay:
            return
        sink = (
            (self.votes >= self.min_votes - 1e-9) & (self.seen_by >= self.min_queries) & self.mask
        )
        self.masks[step.index] = (self.mask.cpu(), self.spike.cpu(), sink.cpu())
        self.done = step.index

    def of(self, kind: TokenClass) -> Bool[torch.Tensor, "batch pos"]:
        """The current batch's spike or sink mask, on the device of its tokens."""
        if self.index not in self.masks:
            raise SpikeSinkError(
                f"the {kind} tokens of batch {self.index} are not known yet: run the TokenClasses "
                "probe in a clean pass before the passes that use it"
            )
        _, spike, sink = self.masks[self.index]
        return (spike if kind == "spike" else sink).to(self.mask.device)

    def keep(self, keep: tuple[str, int], shape: torch.Size) -> Bool[torch.Tensor, "batch pos"]:
        """Positions that `keep` (from :func:`parse_keep`) leaves in full precision."""
        return keep_mask(keep, shape, self.mask.device, self)


def keep_mask(
    keep: tuple[str, int], shape: torch.Size, device: torch.device, classes: TokenClasses | None
) -> Bool[torch.Tensor, "batch pos"]:
    """[batch, pos] mask of the tokens kept in full precision (positions are columns)."""
    kind, k = keep
    if kind == "none":
        return torch.zeros(shape[:2], dtype=torch.bool, device=device)
    if kind == "first":
        return (torch.arange(shape[1], device=device) < k).expand(shape[:2])
    if classes is None:
        raise SpikeSinkError(
            f"keep={kind!r} needs the token classes of a clean pass: pass "
            "classes=TokenClasses(scan) and run that probe in a clean pass first "
            "(quantization() does this)"
        )
    return classes.of(kind)  # type: ignore[arg-type]


def activation_quantization(
    scan: ScanResult | None = None,
    *,
    sites: Sequence[QuantSite] = QUANT_SITES,
    bits: int = 8,
    granularity: Granularity = "token",
    keep: str = "none",
    classes: TokenClasses | None = None,
    layers: Sequence[int] | None = None,
    model: Any = None,
    name: str | None = None,
) -> Intervention:
    """Fake-quantize activations at `sites` of every block (module docstring).

    Args:
        scan: a clean scan, for the model's size.
        sites: any of "resid", "mlp_in", "attn_in", "kv".
        bits: integer width (8: INT8, 4: INT4).
        granularity: one scale per "token" or per sequence ("tensor").
        keep: tokens left in full precision: "none", "spike", "sink" or "first:k".
        classes: the :class:`TokenClasses` probe of the clean pass; needed for "spike" and
            "sink", and gives the padding mask (without it every column counts as real).
        layers: blocks to quantize (default: all).
        model: used for the model's size when no scan is given.
        name: the intervention's name in reports.
    """
    sites = tuple(sites)
    bad = [s for s in sites if s not in QUANT_SITES]
    if bad or not sites:
        raise SpikeSinkError(
            f"unknown quantization site {bad or sites!r}; choose from {QUANT_SITES}"
        )
    if granularity not in get_args(Granularity):
        raise SpikeSinkError(f"granularity must be 'token' or 'tensor', got {granularity!r}")
    qmax(bits)
    parsed = parse_keep(keep)
    if parsed[0] in ("spike", "sink") and classes is None:
        keep_mask(parsed, torch.Size((1, 1)), torch.device("cpu"), None)  # raises with the fix
    dims = model_dims(scan, model)
    if layers is None:
        if "n_layers" not in dims:
            raise SpikeSinkError("pass a scan, model= or layers= to say which blocks to quantize")
        layers = range(dims["n_layers"])
    layers = tuple(int(x) for x in layers)
    check_layers(layers, dims, "activation_quantization")
    hook = _quant_hook(bits, granularity, parsed, classes)
    hooks = tuple(
        (block_hook(la, path), hook) for la in layers for s in sites for path in _SITE_HOOKS[s]
    )
    label = f"INT{bits} per-{granularity} {'+'.join(sites)}"
    if parsed[0] != "none":
        label += f", {keep} kept"
    return Intervention(
        name=name or label,
        fwd_hooks=hooks,
        settings={
            "kind": "activation_quantization",
            "sites": list(sites),
            "bits": bits,
            "granularity": granularity,
            "keep": keep,
            "layers": list(layers),
            "hooks": sorted({path for s in sites for path in _SITE_HOOKS[s]}),
        },
        description=f"symmetric round-to-nearest {label} at blocks {list(layers)}",
    )


def _quant_hook(
    bits: int, granularity: Granularity, keep: tuple[str, int], classes: TokenClasses | None
) -> HookFn:
    def hook(x: Float[torch.Tensor, "batch pos ..."], hook: Any) -> torch.Tensor:
        real = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if classes is not None:
            real = classes.mask.to(x.device)
            if real.shape != x.shape[:2]:
                raise SpikeSinkError(
                    f"{getattr(hook, 'name', 'hook')}: activation {tuple(x.shape)} does not match "
                    f"the token classes of batch {classes.index} {tuple(real.shape)}"
                )
        quantize = real & ~keep_mask(keep, x.shape, x.device, classes)
        first = 2 if granularity == "token" else 1
        m = quantize.view(*quantize.shape, *[1] * (x.dim() - 2))
        return rtn(x, bits, tuple(range(first, x.dim())), m)

    return hook


@dataclass(frozen=True)
class WeightQuantization:
    """What :func:`weight_rtn` changed: the weights, their relative error, the weights kept."""

    bits: int
    scope: WeightScope
    weights: tuple[str, ...]
    error: float
    """sqrt(Σ ‖q(W) − W‖² / Σ ‖W‖²) over the quantized weights."""
    kept: tuple[tuple[int, int, int], ...]
    """(layer, row = output channel, col = input neuron) of each W_out entry kept exact."""


@contextmanager
def weight_rtn(
    model: Any,
    *,
    bits: int = 4,
    scope: WeightScope = "mlp_out",
    keep: Sequence[tuple[int, int, int]] = (),
    layers: Sequence[int] | None = None,
) -> Iterator[WeightQuantization]:
    """Quantize weights per output channel for the body of a ``with`` block (module docstring).

    Args:
        model: the model; its parameters are restored bit-exactly on exit, also on error.
        bits: integer width.
        scope: "mlp_out" (W_out only) or "all" (every linear weight of the blocks).
        keep: (layer, row, col) W_out entries kept exact, e.g. the super weight (row = output
            channel, col = input neuron, as ``super_weights()`` reports them).
        layers: blocks to quantize (default: all).

    Example:
        >>> with weight_rtn(model, bits=4, keep=[(11, 507, 1229)]) as wq:  # doctest: +SKIP
        ...     logits = model(tokens)
    """
    qmax(bits)
    if scope not in get_args(WeightScope):
        raise SpikeSinkError(f"scope must be 'mlp_out' or 'all', got {scope!r}")
    n = len(model.blocks)
    layers = tuple(range(n)) if layers is None else tuple(int(x) for x in layers)
    check_layers(layers, {"n_layers": n}, "weight_rtn")
    keep = tuple((int(a), int(b), int(c)) for a, b, c in keep)
    params = _weights(model, layers, scope)
    for la, row, col in keep:
        w = params.get(block_hook(la, "mlp.W_out"))
        if w is None or not (0 <= col < w.shape[0] and 0 <= row < w.shape[1]):
            raise SpikeSinkError(
                f"kept weight (layer {la}, row {row}, col {col}) is not a W_out entry being "
                f"quantized (layers {list(layers)}; W_out is (d_mlp, d_model))"
            )
    saved = {name: p.detach().clone() for name, p in params.items()}
    try:
        err, norm = 0.0, 0.0
        with torch.no_grad():
            for name, p in params.items():
                exact = torch.zeros_like(p, dtype=torch.bool)
                for la, row, col in keep:
                    if name == block_hook(la, "mlp.W_out"):
                        exact[col, row] = True
                q = rtn(p.detach(), bits, _INPUT_DIMS[name.rsplit(".", 1)[-1].lstrip("_")], ~exact)
                err += float((q.double() - p.double()).pow(2).sum())
                norm += float(p.double().pow(2).sum())
                p.copy_(q)
        yield WeightQuantization(
            bits, scope, tuple(params), (err / norm) ** 0.5 if norm else 0.0, keep
        )
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])


def _weights(model: Any, layers: tuple[int, ...], scope: WeightScope) -> dict[str, torch.Tensor]:
    """{"blocks.L.mlp.W_out": parameter, ...} of the weights `scope` quantizes."""
    wanted = {"W_out"} if scope == "mlp_out" else set(_INPUT_DIMS)
    out: dict[str, torch.Tensor] = {}
    for la in layers:
        for name, p in model.blocks[la].named_parameters():
            if name.rsplit(".", 1)[-1].lstrip("_") in wanted:
                out[block_hook(la, name)] = p
    if not out:
        raise SpikeSinkError(f"the model has no {sorted(wanted)} weight in blocks {list(layers)}")
    return out


__all__ = [
    "QUANT_SITES",
    "Granularity",
    "QuantSite",
    "TokenClasses",
    "WeightQuantization",
    "WeightScope",
    "activation_quantization",
    "keep_mask",
    "parse_keep",
    "qmax",
    "rtn",
    "weight_rtn",
]
