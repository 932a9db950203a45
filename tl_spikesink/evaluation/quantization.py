"""Quantization split by token class: RTN error and Δloss at spike tokens, sink tokens and the rest.

Each activation setting (bits × granularity × tokens kept, at the chosen sites of every block;
see :mod:`~tl_spikesink.interventions.quantize`) is one forward pass per batch after a clean
one, in one stream over the corpus; each weight setting (per-output-channel RTN of W_out or of
every linear weight, with and without the super weight kept exact) is one more stream with the
weights swapped in place and restored bit-exactly after it.

Token classes are decided per position in the clean pass (:class:`TokenClasses`: the scan's own
spike and sink rules, with the scan's cuts). The loss at position t predicts token t + 1 and is
counted in the class of its *input* token t: Δloss of a class is the mean next-token loss at its
positions minus the clean mean at the same positions; "rest" is every position that is neither
a spike nor a sink token; "all" is every scored position. The quantization error of a class is
the relative L2 error ‖q(x) − x‖ / ‖x‖ pooled over the class's tokens at each hook point, then
averaged over hook points (for weight rows: pooled over the quantized weights). A setting that
keeps tokens exact *recovers* the share 1 − Δloss / Δloss(same setting, nothing kept) of the
loss increase.

Settings a batch cannot tell apart (keeping the spike tokens and keeping the first token, when
the spike tokens of that batch are exactly its first tokens) run once and count for both, so a
model whose spike and sink tokens coincide pays for one pass.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from tl_spikesink.anatomy import Anatomy
from tl_spikesink.config import ANALYSIS_MAX_TOKENS, QUANT_KEEPS
from tl_spikesink.corpus import Corpus, default_texts
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.evaluation.logits import next_token_logprobs, nll
from tl_spikesink.interventions.quantize import (
    QUANT_SITES,
    Granularity,
    QuantSite,
    TokenClasses,
    WeightScope,
    activation_quantization,
    keep_mask,
    parse_keep,
    weight_rtn,
)
from tl_spikesink.mechanism.captures import as_corpus, scan_of
from tl_spikesink.probes.engine import HookFn, Pass, Probe, Step, run
from tl_spikesink.results import Result, attributes, find
from tl_spikesink.views.format import num, pct, text_table

CLASSES = ("all", "spike", "sink", "rest")
"""The position classes every number is split into."""
KEEPS = QUANT_KEEPS
MAX_TOKENS = ANALYSIS_MAX_TOKENS


@dataclass(frozen=True)
class QuantizationRow:
    """One setting: its quantization error and Δloss per class, and the share it recovers."""

    setting: str
    kind: str
    """"activation" or "weight"."""
    bits: int
    granularity: str
    """"token", "tensor" (activations) or "channel" (weights, per output channel)."""
    target: str
    """Quantized sites ("resid+mlp_in+attn_in+kv") or weights ("mlp_out", "all")."""
    keep: str
    """Kept in full precision: "none", "spike", "sink", "first:k" or "super weight"."""
    error: dict[str, float]
    """Relative L2 error per class (weights: "all" only)."""
    loss: dict[str, float]
    delta_loss: dict[str, float]
    """Mean loss minus the clean mean at the same positions, per class."""
    recovered: float
    """1 − Δloss / Δloss of `baseline` (overall); NaN without a baseline or when it is ≤ 0."""
    baseline: str | None


@dataclass(frozen=True, repr=False)
class Quantization(Result):
    """RTN quantization of activations and weights, its error and Δloss by token class."""

    model: str
    n_tokens: int
    n_positions: dict[str, int]
    """Scored positions per class (by input token)."""
    clean_loss: dict[str, float]
    rows: tuple[QuantizationRow, ...]
    super_weight: tuple[int, int, int] | None
    """(layer, row, col) of the W_out entry the weight rows keep exact, if any."""
    class_rule: str
    settings: dict[str, Any]
    corpus: tuple[dict[str, Any], ...]

    def row(self, setting: str) -> QuantizationRow:
        """The row of `setting` (its label in the table)."""
        error = f"no setting {setting!r}; the rows are {[r.setting for r in self.rows]}"
        return find(self.rows, "setting", setting, error)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: clean loss and positions per class, and every row."""
        return self.json_fields(
            "model n_tokens n_positions clean_loss",
            rows=[vars(r) for r in self.rows],
            super_weight=list(self.super_weight) if self.super_weight else None,
            **attributes(self, "class_rule settings corpus"),
        )

    def __str__(self) -> str:
        head = ["setting", *(f"err {c}" for c in CLASSES), *(f"Δloss {c}" for c in CLASSES),
                "recovered"]  # fmt: skip
        body = [
            [r.setting, *(num(r.error[c]) for c in CLASSES),
             *(num(r.delta_loss[c]) for c in CLASSES), pct(r.recovered)]
            for r in self.rows
        ]  # fmt: skip
        n = self.n_positions
        sw = "none" if self.super_weight is None else str(self.super_weight)
        return "\n".join(
            [
                f"RTN quantization of {self.model} on {self.n_tokens:,} tokens; clean loss "
                + ", ".join(f"{c} {num(self.clean_loss[c])} ({n[c]})" for c in CLASSES)
                + f"; super weight kept: {sw}",
                *text_table(head, body),
                f"classes (by input token): {self.class_rule}",
            ]
        )


class _ClassLoss(Probe):
    """Σ next-token NLL and counts per class of the input token (last batch's share kept)."""

    needs_logits = True

    def __init__(self, classes: TokenClasses):
        self.classes = classes
        self.sums = torch.zeros(len(CLASSES), 2, dtype=torch.float64)
        """[class, (Σ loss, positions)]."""
        self.last = (-1, torch.zeros_like(self.sums))

    def end_batch(self, step: Step, logits: torch.Tensor | None) -> None:
        logp, targets = next_token_logprobs(logits, step.batch)
        loss = nll(logp, targets).double()
        mask = step.batch.mask.to(logits.device)
        scored = mask[:, :-1] & mask[:, 1:]
        inside = _class_masks(self.classes, mask)[:, :, :-1][:, scored].double()  # [class, n]
        inc = torch.stack([inside @ loss, inside.sum(-1)], -1).cpu()
        self.sums += inc
        self.last = (step.index, inc)

    def absorb(self, twin: _ClassLoss, index: int) -> None:
        """Count `twin`'s share of batch `index` as this probe's own."""
        assert twin.last[0] == index, "a twin setting must run before the one reusing it"
        self.sums += twin.last[1]

    @property
    def counts(self) -> dict[str, int]:
        return {c: int(self.sums[i, 1]) for i, c in enumerate(CLASSES)}

    def mean(self) -> dict[str, float]:
        s = self.sums
        return {c: float(s[i, 0] / s[i, 1]) if s[i, 1] else math.nan for i, c in enumerate(CLASSES)}


class _ErrorMeter:
    """Per hook point and class: Σ ‖q(x) − x‖² and Σ ‖x‖² over tokens (last batch's share kept)."""

    def __init__(self, classes: TokenClasses):
        self.classes = classes
        self.sums: dict[str, torch.Tensor] = {}
        """hook name → [class, (Σ‖Δ‖², Σ‖x‖²)] in float64."""
        self.last: tuple[int, dict[str, torch.Tensor]] = (-1, {})

    def wrap(self, name: str, fn: HookFn) -> HookFn:
        def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
            y = fn(x, hook)
            dims = tuple(range(2, x.dim()))
            # Per-token sums in float32 (fast); the running totals are float64.
            diff = (y.float() - x.float()).pow(2).sum(dims)
            size = x.float().pow(2).sum(dims)
            masks = _class_masks(self.classes, self.classes.mask.to(x.device)).double()
            inc = torch.einsum("cbp,kbp->ck", masks, torch.stack([diff, size]).double()).cpu()
            self._add(name, inc)
            if self.last[0] != self.classes.index:
                self.last = (self.classes.index, {})
            self.last[1][name] = inc
            return y

        return hook

    def _add(self, name: str, inc: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0) + inc

    def absorb(self, twin: _ErrorMeter, index: int) -> None:
        """Count `twin`'s share of batch `index` as this meter's own."""
        assert twin.last[0] == index, "a twin setting must run before the one reusing it"
        for name, inc in twin.last[1].items():
            self._add(name, inc)

    def error(self) -> dict[str, float]:
        if not self.sums:
            return dict.fromkeys(CLASSES, math.nan)
        acc = torch.stack(list(self.sums.values()))  # [hook, class, 2]
        rel = (acc[..., 0] / acc[..., 1]).sqrt()  # NaN where a class has no token there
        return {c: _nanmean(rel[:, i]) for i, c in enumerate(CLASSES)}


def _nanmean(x: torch.Tensor) -> float:
    x = x[~x.isnan()]
    return float(x.mean()) if x.numel() else math.nan


def _class_masks(classes: TokenClasses, real: torch.Tensor) -> torch.Tensor:
    """[class, batch, pos] masks in the order of :data:`CLASSES`."""
    spike, sink = classes.of("spike"), classes.of("sink")
    return torch.stack([real, spike, sink, real & ~spike & ~sink])


@dataclass
class _Setting:
    """One activation setting's probes, and how it is told apart from the ones before it."""

    label: str
    bits: int
    granularity: str
    keep: str
    loss: _ClassLoss
    meter: _ErrorMeter
    twin: _Setting | None = None
    """The earlier setting whose pass this batch reuses (same masks), or None."""


def quantization(
    model: Any,
    texts: Sequence[str] | str | Corpus | None = None,
    scan: Any = None,
    *,
    bits: Sequence[int] = (8, 4),
    granularities: Sequence[Granularity] = ("token", "tensor"),
    keeps: Sequence[str] = KEEPS,
    sites: Sequence[QuantSite] = QUANT_SITES,
    weight_bits: Sequence[int] = (4,),
    weight_scopes: Sequence[WeightScope] = ("mlp_out", "all"),
    super_weight: tuple[int, int, int] | str | None = "auto",
    max_tokens: int = MAX_TOKENS,
    batch_size: int = 8,
    progress: bool = True,
) -> Quantization:
    """Error and Δloss by token class under RTN quantization (module docstring).

    Args:
        model: a causal TransformerLens model; its weights are restored bit-exactly after each
            weight setting, also on error.
        texts: the evaluation texts (default: the offline default corpus).
        scan: the clean scan whose spike cuts and sink rule classify tokens (run on `texts`
            if None).
        bits: activation widths; every bits × granularity × keep is one row.
        granularities: "token" and/or "tensor" (one scale per sequence).
        keeps: tokens kept in full precision: "none", "spike", "sink", "first:k".
        sites: activation sites quantized together: "resid", "mlp_in", "attn_in", "kv".
        weight_bits: weight widths (empty: no weight rows).
        weight_scopes: "mlp_out" (W_out) and/or "all" (every linear weight of the blocks).
        super_weight: (layer, row, col) kept exact in the weight rows, "auto" (the top
            candidate of :func:`~tl_spikesink.mechanism.super_weights.super_weights` on its
            prompt, if any), or None.
        max_tokens: tokens of `texts` read.
        batch_size: sequences per forward pass.
        progress: show progress bars.
    """
    anatomy = Anatomy.of(model)
    if not anatomy.causal:
        raise SpikeSinkError("quantization() scores next-token loss: it needs a causal model")
    if not bits and not weight_bits:
        raise SpikeSinkError("nothing to quantize: pass bits= and/or weight_bits=")
    keeps = tuple(keeps)
    for k in keeps:
        parse_keep(k)
    corpus = as_corpus(model, default_texts() if texts is None else texts, max_tokens)
    scan = scan_of(model, corpus, scan)
    classes = TokenClasses(scan)
    clean = _ClassLoss(classes)
    settings = [
        _setting(b, g, k, classes) for b, g, k in itertools.product(bits, granularities, keeps)
    ]
    passes = [Pass([classes, clean])]
    for s in settings:
        iv = activation_quantization(scan, sites=sites, bits=s.bits, granularity=s.granularity,
                                     keep=s.keep, classes=classes, model=model)  # fmt: skip
        hooks = [(name, s.meter.wrap(name, fn)) for name, fn in iv.fwd_hooks]
        passes.append(Pass([s.loss], fwd_hooks=hooks, skip=_skip(s, settings, classes)))
    run(model, corpus, passes=passes, batch_size=batch_size, progress=progress,
        desc=f"quantization ({len(passes)} passes a batch)")  # fmt: skip
    clean_loss = clean.mean()
    rows = [_row(s.label, "activation", s.bits, s.granularity, "+".join(sites), s.keep,
                 s.meter.error(), s.loss.mean(), clean_loss) for s in settings]  # fmt: skip
    sw = _super_weight(model, scan, super_weight) if weight_bits else None
    for b, scope in itertools.product(weight_bits, weight_scopes):
        for kept in ((), (sw,)) if sw else ((),):
            loss = _ClassLoss(classes.replay())
            with weight_rtn(model, bits=b, scope=scope, keep=kept) as wq:
                run(model, corpus, [loss.classes, loss], batch_size=batch_size, progress=progress,
                    desc=f"weights INT{b} {scope}")  # fmt: skip
            error = {c: wq.error if c == "all" else math.nan for c in CLASSES}
            label = f"W INT{b} per-channel {scope}" + (", super weight kept" if kept else "")
            what = "super weight" if kept else "none"
            rows.append(
                _row(label, "weight", b, "channel", scope, what, error, loss.mean(), clean_loss)
            )
    return Quantization(
        model=anatomy.model_name,
        n_tokens=corpus.n_tokens,
        n_positions=clean.counts,
        clean_loss=clean_loss,
        rows=_recovered(rows),
        super_weight=sw,
        class_rule=classes.rule,
        settings={
            "bits": list(bits),
            "granularities": list(granularities),
            "keeps": list(keeps),
            "sites": list(sites),
            "weight_bits": list(weight_bits),
            "weight_scopes": list(weight_scopes),
            "super_weight": super_weight if isinstance(super_weight, str) else sw,
            "max_tokens": max_tokens,
            "batch_size": batch_size,
            "rounding": "symmetric round-to-nearest, ties to even, scale = max|x| / (2^(b-1) - 1)",
        },
        corpus=(corpus.describe(),),
    )


def _setting(bits: int, granularity: str, keep: str, classes: TokenClasses) -> _Setting:
    label = f"A INT{bits} per-{granularity}" + ("" if keep == "none" else f", {keep} kept")
    return _Setting(label, bits, granularity, keep, _ClassLoss(classes), _ErrorMeter(classes))


def _skip(s: _Setting, settings: list[_Setting], classes: TokenClasses) -> Callable[[Step], bool]:
    """Skip `s` for a batch whose kept tokens equal an earlier setting's; count that one's."""
    earlier = settings[: settings.index(s)]
    same = [t for t in earlier if (t.bits, t.granularity) == (s.bits, s.granularity)]

    def skip(step: Step) -> bool:
        shape = step.tokens.shape
        mine = keep_mask(parse_keep(s.keep), shape, step.tokens.device, classes)
        for t in same:
            if t.twin is None and torch.equal(
                mine, keep_mask(parse_keep(t.keep), shape, step.tokens.device, classes)
            ):
                s.twin = t
                s.loss.absorb(t.loss, step.index)
                s.meter.absorb(t.meter, step.index)
                return True
        s.twin = None
        return False

    return skip


def _row(label, kind, bits, gran, target, keep, error, loss, clean) -> QuantizationRow:  # noqa: ANN001
    delta = {c: loss[c] - clean[c] for c in CLASSES}
    return QuantizationRow(
        label, kind, bits, gran, target, keep, error, loss, delta, math.nan, None
    )


def _recovered(rows: list[QuantizationRow]) -> tuple[QuantizationRow, ...]:
    base = {(r.kind, r.bits, r.granularity, r.target): r for r in rows if r.keep == "none"}
    out = []
    for r in rows:
        b = base.get((r.kind, r.bits, r.granularity, r.target))
        if r.keep == "none" or b is None:
            out.append(r)
            continue
        d = b.delta_loss["all"]
        share = 1 - r.delta_loss["all"] / d if d > 0 and math.isfinite(d) else math.nan
        out.append(replace(r, recovered=share, baseline=b.setting))
    return tuple(out)


def _super_weight(
    model: Any, scan: Any, choice: tuple[int, int, int] | str | None
) -> tuple[int, int, int] | None:
    if choice is None:
        return None
    if choice != "auto":
        if isinstance(choice, str) or len(choice) != 3:
            raise SpikeSinkError(
                f"super_weight must be (layer, row, col), 'auto' or None, got {choice!r}"
            )
        return tuple(int(x) for x in choice)  # type: ignore[return-value]
    from tl_spikesink.mechanism.super_weights import PROMPT, super_weights

    found = super_weights(model, [PROMPT], scan, evaluate=False).candidates
    return (found[0].layer, found[0].row, found[0].col) if found else None


__all__ = ["CLASSES", "KEEPS", "Quantization", "QuantizationRow", "quantization"]
