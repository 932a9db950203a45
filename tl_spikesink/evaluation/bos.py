r"""BOS / first-token dependence: loss, sink heads and spikes with and without a BOS token.

The same texts are read four ways; `x` is a text's own tokens (cut to `max_len`):

1. ``with_bos``: ``[BOS] + x``;
2. ``no_bos``: ``x``;
3. ``packed``: ``[BOS] + prefix + [BOS] + x``, as in packed training batches; the prefix is the
   first `prefix_len` tokens of the next text (cyclically), so the second BOS sits at the same
   position P + 1 in every sequence and its pooled attention is one key column of the scan;
4. ``delimiter``: ``[d] + x``, a delimiter token (default "\n") in the place of BOS.

**Loss** is the mean next-token NLL of the targets x_1 … x_{n−1}, each predicted from all of the
text before it: the same tokens in every condition (x_0 has no context without BOS, so it is
never a target; each row records a hash of its (text, position, token) targets to prove it).
**Sinks** come from the scan run on each condition's corpus (one forward per batch, with the
loss probe riding along): a head is a sink head when its pooled first-token score α_0 exceeds ε;
heads kept / lost compare with the reference (``with_bos``, or ``no_bos`` for a tokenizer
without BOS). In ``packed`` the heads whose pooled α at the mid-sequence BOS exceeds ε are
reported as well. **Spikes**: whether the scan finds a massive activation at the first position
(and at the mid-sequence BOS), and the largest |x| there at `hook_resid_post` over layers in the
reference scan's spike channels.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float

from tl_spikesink.anatomy import Anatomy, hook_name
from tl_spikesink.config import ScanConfig
from tl_spikesink.corpus import Chunk, tokenize
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.evaluation.logits import nll
from tl_spikesink.probes.engine import HookFn, Probe, Step
from tl_spikesink.probes.scan import ScanResult, scan_corpus
from tl_spikesink.results import Result, find
from tl_spikesink.tokens import is_delimiter
from tl_spikesink.views.format import MISSING, json_clean, num, signed, text_table

Condition = Literal["with_bos", "no_bos", "packed", "delimiter"]
CONDITIONS: tuple[Condition, ...] = get_args(Condition)
Head = tuple[int, int]


@dataclass(frozen=True)
class BosRow:
    """One way of reading the texts; numbers are NaN (and `applicable` False) where it cannot."""

    condition: Condition
    applicable: bool
    reason: str
    """Why the condition does not apply ("" when it does)."""
    loss: float
    n_targets: int
    targets_sha256: str
    """Hash of the sorted (text, position in text, token id) targets: equal rows scored alike."""
    first_scores: Float[torch.Tensor, "layer head"]
    """Pooled attention each head puts on the sequence's first position (α_0)."""
    sink_heads: tuple[Head, ...]
    spike_first: bool
    """The scan found a massive activation at the first position."""
    peak_first: float
    """Largest |x| at the first position, `hook_resid_post`, over layers, in the spike channels."""
    mid_position: int | None = None
    """Position of the mid-sequence BOS (``packed`` only)."""
    mid_scores: Float[torch.Tensor, "layer head"] | None = None
    mid_sink_heads: tuple[Head, ...] = ()
    spike_mid: bool | None = None
    peak_mid: float = float("nan")

    @property
    def perplexity(self) -> float:
        """exp(`loss`)."""
        return math.exp(self.loss) if self.loss == self.loss else float("nan")


@dataclass(frozen=True, repr=False)
class BosAudit(Result):
    """Loss, sink heads and first-token spikes of the same texts under each BOS condition."""

    model: str
    default_prepend_bos: bool
    """Whether the model prepends BOS by default (how it is normally run)."""
    bos_token: str | None
    delimiter: str
    prefix_len: int
    """Tokens of the other text before the mid-sequence BOS in ``packed``."""
    max_len: int
    """Each text is cut to this many tokens."""
    reference: Condition
    """The row Δloss and kept / lost heads compare with."""
    spike_channels: tuple[int, ...]
    """Channels the |x| columns read (empty: all channels, no spike channel was found)."""
    epsilon: float
    rows: tuple[BosRow, ...]
    corpus: dict[str, Any]
    config: ScanConfig
    settings: dict[str, Any] = field(default_factory=dict)

    def row(self, condition: Condition) -> BosRow:
        """The row of `condition`."""
        error = f"no condition {condition!r}; choose one of {CONDITIONS}"
        return find(self.rows, "condition", condition, error)

    def delta_loss(self, condition: Condition) -> float:
        """Loss of `condition` minus the reference's."""
        return self.row(condition).loss - self.row(self.reference).loss

    def kept(self, condition: Condition) -> tuple[Head, ...]:
        """Reference sink heads that are still sink heads under `condition`."""
        r = self.row(condition)
        return tuple(h for h in self.row(self.reference).sink_heads if h in r.sink_heads)

    def lost(self, condition: Condition) -> tuple[Head, ...]:
        """Reference sink heads that are no sink heads under `condition`."""
        r = self.row(condition)
        if not r.applicable:
            return ()
        return tuple(h for h in self.row(self.reference).sink_heads if h not in r.sink_heads)

    def gained(self, condition: Condition) -> tuple[Head, ...]:
        """Sink heads under `condition` that the reference does not have."""
        ref = self.row(self.reference).sink_heads
        return tuple(h for h in self.row(condition).sink_heads if h not in ref)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: settings and one entry per condition (scores as [layer][head] lists)."""
        rows = []
        for r in self.rows:
            d = {k: getattr(r, k) for k in r.__dataclass_fields__}
            d["perplexity"] = r.perplexity
            d["delta_loss"] = self.delta_loss(r.condition)
            d["kept"], d["lost"] = self.kept(r.condition), self.lost(r.condition)
            d["gained"] = self.gained(r.condition)
            rows.append(d)
        head = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("rows",)}
        head["config"] = {k: getattr(self.config, k) for k in self.config.__dataclass_fields__}
        return json_clean({**head, "rows": rows})

    def __str__(self) -> str:
        channels = ", ".join(map(str, self.spike_channels)) or "all"
        header = ["condition", "loss", "ppl", f"Δloss vs {self.reference}", "sink heads",
                  "kept", "lost", "spike @0", f"|x| @0 (ch {channels})"]  # fmt: skip
        body = []
        for r in self.rows:
            if not r.applicable:
                body.append([r.condition, *[MISSING] * 8])
                continue
            body.append(
                [
                    r.condition,
                    num(r.loss, 4),
                    num(r.perplexity),
                    signed(self.delta_loss(r.condition)),
                    str(len(r.sink_heads)),
                    str(len(self.kept(r.condition))),
                    str(len(self.lost(r.condition))),
                    "yes" if r.spike_first else "no",
                    num(r.peak_first),
                ]
            )
        n = self.row(self.reference).n_targets
        bos = repr(self.bos_token) if self.bos_token is not None else "none"
        lines = [
            f"BOS audit of {self.model} (BOS {bos}, prepended by default: "
            f"{'yes' if self.default_prepend_bos else 'no'}); {self.corpus['n_texts']} texts, "
            f"{n} targets x_1..x_n-1 per condition, ε = {self.epsilon}",
            *text_table(header, body),
        ]
        for r in self.rows:
            if not r.applicable:
                lines.append(f"  {r.condition}: not applicable, {r.reason}")
            elif r.mid_position is not None:
                lines.append(
                    f"  packed: mid-sequence BOS at position {r.mid_position} (after "
                    f"{self.prefix_len} tokens of another text): {len(r.mid_sink_heads)} heads "
                    f"sink on it, spike {'yes' if r.spike_mid else 'no'} (|x| {num(r.peak_mid)})"
                )
        lines.append(f"  delimiter: {self.delimiter!r} in the place of BOS")
        return "\n".join(lines)


class _TargetLoss(Probe):
    """NLL of each text's tokens x_1 … x_{n−1}, found `offset` columns after the first real one."""

    needs_logits = True

    def __init__(self, offset: int):
        self.offset = offset
        self.total, self.n = 0.0, 0
        self.targets: list[tuple[int, int, int]] = []

    def end_batch(self, step: Step, logits: torch.Tensor | None) -> None:
        batch = step.batch
        width = batch.tokens.shape[1]
        col = torch.arange(1, width)[None, :]
        rel = col - batch.first[:, None] - self.offset  # position in the text of the target
        scored = batch.mask[:, 1:] & (rel >= 1)
        dev = scored.to(logits.device)
        logp = logits[:, :-1][dev].float().log_softmax(-1)
        targets = step.tokens[:, 1:][dev]
        self.total += float(nll(logp, targets).double().sum())
        self.n += int(scored.sum())
        text = batch.text_index[:, None].expand_as(rel)[scored]
        self.targets += zip(text.tolist(), rel[scored].tolist(), targets.tolist(), strict=True)

    @property
    def loss(self) -> float:
        return self.total / self.n if self.n else float("nan")

    @property
    def sha256(self) -> str:
        return hashlib.sha256(repr(sorted(self.targets)).encode()).hexdigest()


class _PositionPeak(Probe):
    """max |x| per (layer, channel) at `hook_resid_post` at fixed positions of every sequence."""

    def __init__(self, n_layers: int, d_model: int, positions: tuple[int, ...]):
        self.positions = positions
        self.peak = torch.zeros(len(positions), n_layers, d_model)
        self.n_layers = n_layers

    def hooks(self) -> list[tuple[str, HookFn]]:
        return [(hook_name("resid_post", la), self._hook(la)) for la in range(self.n_layers)]

    def start_batch(self, step: Step) -> None:
        self.cols = step.batch.first.to(step.mask.device)

    def _hook(self, layer: int) -> HookFn:
        def hook(act: Float[torch.Tensor, "batch pos d_model"], hook: Any) -> None:
            rows = torch.arange(act.shape[0], device=act.device)
            for i, p in enumerate(self.positions):
                x = act[rows, self.cols + p].detach().float().abs().amax(0).cpu()
                self.peak[i, layer] = torch.maximum(self.peak[i, layer], x)

        return hook

    def at(self, i: int, channels: tuple[int, ...]) -> float:
        peak = self.peak[i] if not channels else self.peak[i][:, list(channels)]
        return float(peak.max())


@dataclass
class _Run:
    scan: ScanResult
    loss: _TargetLoss
    peak: _PositionPeak


def bos_audit(
    model: Any,
    texts: Sequence[str] | str,
    config: ScanConfig | None = None,
    *,
    delimiter: str = "\n",
    prefix_len: int = 16,
    max_len: int = 64,
    progress: bool = True,
) -> BosAudit:
    """Loss, sink heads and first-token spikes of `texts` with, without and mid-sequence BOS.

    Args:
        model: a causal TransformerLens model; only borrowed (read-only hooks, removed after
            each pass).
        texts: the texts (one string counts as one); each is cut to `max_len` tokens.
        config: scan settings (default: :class:`ScanConfig` with spikes read at
            `hook_resid_post` only, which is all the audit needs).
        delimiter: the token put in the place of BOS in the ``delimiter`` condition; it must
            be one token made only of punctuation or whitespace.
        prefix_len: tokens of another text before the mid-sequence BOS in ``packed`` (fewer
            when the shortest text is shorter).
        max_len: tokens kept of each text.
        progress: show progress bars.

    Returns:
        A frozen :class:`BosAudit`; `print(audit)` shows the table. See the module docstring.
    """
    a = Anatomy.of(model)
    if not a.causal:
        raise SpikeSinkError(
            f"the BOS audit measures next-token loss; {a.model_name} attends both ways"
        )
    config = config or ScanConfig(spike_sites=("resid_post",))
    if prefix_len < 1 or max_len < 2:
        raise SpikeSinkError(
            f"prefix_len must be ≥ 1 and max_len ≥ 2, got {prefix_len} and {max_len}"
        )
    n_ctx = int(model.cfg.n_ctx)
    max_len = min(int(max_len), n_ctx - min(prefix_len, n_ctx // 2) - 2)
    if max_len < 2:
        raise SpikeSinkError(f"n_ctx={n_ctx} leaves no room for a packed sequence")
    base = tokenize(model, texts, name="bos audit", max_seq_len=max_len, long_texts="truncate",
                    prepend_bos=False)  # fmt: skip
    xs = [c.tokens for c in base.chunks]
    if not any(len(x) >= 2 for x in xs):
        raise SpikeSinkError(
            "every text is a single token: no token has a context; use longer texts"
        )
    delim = _delimiter_id(model, delimiter)
    bos_id = model.tokenizer.bos_token_id
    p = min(prefix_len, *map(len, xs))
    first: dict[Condition, list[int]] = {"with_bos": [bos_id], "no_bos": [], "delimiter": [delim]}
    sequences: dict[Condition, list[tuple[int, ...]]] = {
        c: [tuple(pre) + x for x in xs] for c, pre in first.items()
    }
    sequences["packed"] = [
        (bos_id, *xs[(i + 1) % len(xs)][:p], bos_id, *x) for i, x in enumerate(xs)
    ]
    offsets: dict[Condition, int] = {"with_bos": 1, "no_bos": 0, "packed": p + 2, "delimiter": 1}
    reasons: dict[Condition, str] = {}
    if bos_id is None:
        reasons["with_bos"] = reasons["packed"] = "the tokenizer has no BOS token"
    elif len(xs) < 2:
        reasons["packed"] = "packing needs at least two texts"

    runs: dict[Condition, _Run] = {}
    for cond in CONDITIONS:
        if cond in reasons:
            continue
        corpus = replace(
            base,
            name=f"bos audit: {cond}",
            chunks=tuple(Chunk(i, 0, s) for i, s in enumerate(sequences[cond])),
            prepend_bos=cond in ("with_bos", "packed"),
            max_seq_len=max(map(len, sequences[cond])),
        )
        loss = _TargetLoss(offsets[cond])
        peak = _PositionPeak(a.n_layers, a.d_model, (0, p + 1) if cond == "packed" else (0,))
        result = scan_corpus(model, corpus, config, probes=[loss, peak], progress=progress,
                             desc=f"bos audit: {cond}")  # fmt: skip
        runs[cond] = _Run(result, loss, peak)

    reference: Condition = "with_bos" if "with_bos" in runs else "no_bos"
    channels = runs[reference].scan.spikes.channels or tuple(
        sorted({c for r in runs.values() for c in r.scan.spikes.channels})
    )
    rows = tuple(_row(c, runs.get(c), reasons.get(c, ""), channels, p + 1, a) for c in CONDITIONS)
    return BosAudit(
        model=a.model_name,
        default_prepend_bos=bool(getattr(model.cfg, "default_prepend_bos", True)),
        bos_token=model.tokenizer.bos_token if bos_id is not None else None,
        delimiter=delimiter,
        prefix_len=p,
        max_len=max_len,
        reference=reference,
        spike_channels=channels,
        epsilon=config.epsilon,
        rows=rows,
        corpus=base.describe(),
        config=config,
        settings={"delimiter_id": delim, "bos_id": bos_id, "requested_prefix_len": prefix_len},
    )


def _row(
    cond: Condition,
    run: _Run | None,
    reason: str,
    channels: tuple[int, ...],
    mid: int,
    a: Anatomy,
) -> BosRow:
    if run is None:
        nan = torch.full((a.n_layers, a.n_heads), float("nan"))
        return BosRow(cond, False, reason, float("nan"), 0, "", nan, (), False, float("nan"))
    sinks, massive = run.scan.sinks, run.scan.spikes.massive
    positions = {m.token.position for m in massive}
    row = BosRow(
        condition=cond,
        applicable=True,
        reason="",
        loss=run.loss.loss,
        n_targets=run.loss.n,
        targets_sha256=run.loss.sha256,
        first_scores=sinks.scores.float(),
        sink_heads=tuple(sinks.sink_heads),
        spike_first=0 in positions,
        peak_first=run.peak.at(0, channels),
    )
    if cond != "packed":
        return row
    scores = sinks.alpha[:, :, mid].float()
    return replace(
        row,
        mid_position=mid,
        mid_scores=scores,
        mid_sink_heads=tuple(tuple(h) for h in (scores > sinks.epsilon).nonzero().tolist()),
        spike_mid=mid in positions,
        peak_mid=run.peak.at(1, channels),
    )


def _delimiter_id(model: Any, delimiter: str) -> int:
    ids = model.to_tokens(delimiter, prepend_bos=False, truncate=False)[0].tolist()
    if len(ids) != 1 or not is_delimiter(model.tokenizer.decode(ids)):
        raise SpikeSinkError(
            f"delimiter {delimiter!r} is {len(ids)} tokens {ids} for this tokenizer, not one "
            "token of punctuation or whitespace; pass another, e.g. delimiter='.'"
        )
    return ids[0]


__all__ = ["CONDITIONS", "BosAudit", "BosRow", "Condition", "bos_audit"]
