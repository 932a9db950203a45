"""StreamingLLM in TransformerLens: window attention, with and without sink tokens (Xiao et al.).

StreamingLLM keeps a rolling KV cache of the last W tokens plus the first k ("attention sinks")
and reports that perplexity collapses without the sinks and recovers with four. Evaluated here
with attention masks instead of cache eviction (:func:`~tl_spikesink.interventions.window_attention`
at ``hook_attn_scores``): every query i sees keys 0 … k−1 and i − W + 1 … i, and positions stay the
true ones. This matches the paper's "window attention" baseline and its sink variant, except
that StreamingLLM re-assigns positions inside the cache (its rotary positions are cache slots);
see docs/paper.md.

The texts are joined with blank lines into one stream and cut into sequences of `seq_len` tokens,
each starting with the model's BOS where it uses one, so every query past the window loses keys.
Perplexity is reported over all scored positions and over the queries at position ≥ W alone
("beyond the window"), where the restriction bites. ``heads="sink"`` restricts only the scan's
sink heads (DuoAttention's "streaming heads").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tl_spikesink.anatomy import Anatomy
from tl_spikesink.config import STREAMING_SEQ_LEN, STREAMING_SINKS, STREAMING_WINDOWS
from tl_spikesink.corpus import Corpus, default_texts, tokenize
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.evaluation.logits import nll
from tl_spikesink.interventions.attention import window_attention
from tl_spikesink.probes.engine import Pass, Probe, Step, run
from tl_spikesink.results import Result, attributes
from tl_spikesink.views.format import num, text_table

WINDOWS, SINKS, SEQ_LEN = STREAMING_WINDOWS, STREAMING_SINKS, STREAMING_SEQ_LEN


@dataclass(frozen=True)
class StreamingRow:
    """One restriction: a window of W recent keys plus the first k keys."""

    window: int
    sinks: int
    loss: float
    loss_beyond: float
    """Mean NLL of the queries at position ≥ window."""
    delta_loss: float
    """`loss` minus the full-attention loss."""

    @property
    def perplexity(self) -> float:
        """exp(`loss`)."""
        return math.exp(self.loss)

    @property
    def perplexity_beyond(self) -> float:
        """exp(`loss_beyond`)."""
        return math.exp(self.loss_beyond)


@dataclass(frozen=True, repr=False)
class Streaming(Result):
    """Perplexity under full attention and under each window + sinks restriction."""

    model: str
    heads: str
    """"all", "sink" (the scan's sink heads) or the number of chosen heads."""
    n_heads_restricted: int
    seq_len: int
    n_tokens: int
    full_loss: float
    full_loss_beyond: dict[int, float]
    """Full-attention NLL of the queries at position ≥ W, per window W."""
    rows: tuple[StreamingRow, ...]
    corpus: tuple[dict[str, Any], ...]

    @property
    def full_perplexity(self) -> float:
        """Perplexity with full attention."""
        return math.exp(self.full_loss)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``full_perplexity`` and ``rows`` (window, sinks, perplexity, delta_loss)."""
        row = "window sinks loss perplexity delta_loss perplexity_beyond"
        return self.json_fields(
            "model heads n_heads_restricted seq_len n_tokens full_loss full_perplexity",
            full_perplexity_beyond={str(w): math.exp(v) for w, v in self.full_loss_beyond.items()},
            rows=[attributes(r, row) for r in self.rows],
            corpus=self.corpus,
        )

    def __str__(self) -> str:
        head = ["window", "sinks", "perplexity", "Δloss", "ppl ≥ W", "full ppl ≥ W"]
        body = [
            [
                str(r.window),
                str(r.sinks),
                num(r.perplexity),
                num(r.delta_loss),
                num(r.perplexity_beyond),
                num(math.exp(self.full_loss_beyond[r.window])),
            ]
            for r in self.rows
        ]
        title = (
            f"streaming attention on {self.model}: {self.heads} heads "
            f"({self.n_heads_restricted}) restricted, {self.n_tokens:,} tokens in sequences of "
            f"{self.seq_len}; full attention perplexity {num(self.full_perplexity)}"
        )
        return "\n".join([title, *text_table(head, body)])


class _PositionLoss(Probe):
    """NLL summed over every scored position and over the queries at position ≥ each window."""

    needs_logits = True

    def __init__(self, windows: Sequence[int]):
        self.windows = tuple(windows)
        self.n, self.total = 0, 0.0
        self.n_beyond = dict.fromkeys(self.windows, 0)
        self.beyond = dict.fromkeys(self.windows, 0.0)

    def end_batch(self, step: Step, logits: torch.Tensor | None) -> None:
        mask = step.batch.mask.to(logits.device)
        scored = mask[:, :-1] & mask[:, 1:]
        logp = logits[:, :-1].float().log_softmax(-1)
        loss = nll(logp.flatten(0, 1), step.tokens[:, 1:].flatten()).view(scored.shape)
        loss = loss.double() * scored
        self.n += int(scored.sum())
        self.total += float(loss.sum())
        for w in self.windows:  # right padding: the column is the position
            self.n_beyond[w] += int(scored[:, w:].sum())
            self.beyond[w] += float(loss[:, w:].sum())

    def mean(self, window: int | None = None) -> float:
        if window is None:
            return self.total / self.n if self.n else float("nan")
        n = self.n_beyond[window]
        return self.beyond[window] / n if n else float("nan")


def streaming(
    model: Any,
    texts: Sequence[str] | str | None = None,
    *,
    windows: Sequence[int] = WINDOWS,
    sinks: Sequence[int] = SINKS,
    heads: str | Sequence[tuple[int, int]] = "all",
    scan: Any = None,
    seq_len: int = SEQ_LEN,
    max_tokens: int = 16_384,
    batch_size: int = 4,
    progress: bool = True,
) -> Streaming:
    """Perplexity with full attention and with each window W + first k keys (module docstring).

    Args:
        model: a causal TransformerLens model; only borrowed (hooks removed after each pass).
        texts: joined into one stream (default: the offline default corpus).
        windows: recent-window sizes W.
        sinks: numbers k of first keys kept visible (0: window attention alone).
        heads: "all", "sink" (the scan's sink heads) or (layer, head) pairs to restrict.
        scan: the scan whose sink heads ``heads="sink"`` uses (run when None).
        seq_len: tokens per sequence (at most the model's n_ctx); should exceed the windows.
        max_tokens: tokens read from the stream.
        batch_size: sequences per forward pass.
        progress: show a progress bar.
    """
    a = Anatomy.of(model)
    if not a.causal:
        raise SpikeSinkError("streaming attention needs a causal model; this one attends both ways")
    windows, sinks = tuple(int(w) for w in windows), tuple(int(k) for k in sinks)
    if not windows or not sinks or min(windows) < 1 or min(sinks) < 0:
        raise SpikeSinkError(
            f"windows must be ≥ 1 and sinks ≥ 0 (each at least one), got {windows} and {sinks}"
        )
    seq_len = min(int(seq_len), int(model.cfg.n_ctx))
    if max(windows) >= seq_len:
        raise SpikeSinkError(
            f"window {max(windows)} does not fit in sequences of {seq_len} tokens: no query would "
            "lose a key; pass a longer seq_len or smaller windows"
        )
    stream = "\n\n".join([texts] if isinstance(texts, str) else (texts or default_texts()))
    corpus: Corpus = tokenize(model, stream, name="stream", max_seq_len=seq_len,
                              max_tokens=max_tokens)  # fmt: skip
    if isinstance(heads, str):
        if heads == "all":
            pairs = tuple((la, h) for la in range(a.n_layers) for h in range(a.n_heads))
        elif heads == "sink":
            if scan is None:
                from tl_spikesink.probes.scan import scan as run_scan

                scan = run_scan(model, corpus, progress=False)
            pairs = tuple(scan.sinks.sink_heads)
            if not pairs:
                raise SpikeSinkError("heads='sink': the scan found no sink head")
        else:
            raise SpikeSinkError(
                f"heads must be 'all', 'sink' or (layer, head) pairs, got {heads!r}"
            )
        label = heads
    else:
        pairs, label = tuple((int(x), int(y)) for x, y in heads), f"{len(heads)} chosen"
    settings = [(w, k) for w in windows for k in sinks]
    full = _PositionLoss(windows)
    probes = [_PositionLoss(windows) for _ in settings]
    passes = [Pass([full])] + [
        Pass([p], fwd_hooks=window_attention(pairs, w, sinks=k, model=model).fwd_hooks)
        for p, (w, k) in zip(probes, settings, strict=True)
    ]
    run(model, corpus, passes=passes, batch_size=batch_size, progress=progress,
        desc=f"streaming ({len(passes)} passes a batch)")  # fmt: skip
    rows = tuple(
        StreamingRow(w, k, p.mean(), p.mean(w), p.mean() - full.mean())
        for p, (w, k) in zip(probes, settings, strict=True)
    )
    return Streaming(
        model=a.model_name,
        heads=label,
        n_heads_restricted=len(pairs),
        seq_len=seq_len,
        n_tokens=corpus.n_tokens,
        full_loss=full.mean(),
        full_loss_beyond={w: full.mean(w) for w in windows},
        rows=rows,
        corpus=(corpus.describe(),),
    )


__all__ = ["SINKS", "WINDOWS", "Streaming", "StreamingRow", "streaming"]
