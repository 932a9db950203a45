"""The seed paper's row for any model: its Tables 1 and 2, sink ratio, Spike and the mechanism.

Sun, Canziani, LeCun & Zhu, *The Spike, the Sparse and the Sink* (arXiv 2603.05498) reports, per
model, the step-up and step-down blocks (Table 1, paper numbering), the share of the vocabulary
that spikes at position 0 (Table 2), and for its trained models the sink ratio (Eq. 27–28) and the
absolute Spike. :func:`paper_row` measures the same quantities on a TransformerLens model, by the
paper's definitions (see docs/paper.md for each one and where we deviate), and keeps the paper's
published rows beside it, so ``print(paper_row(model))`` sets the model next to Llama-2-7B and
Qwen3-8B.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tl_spikesink.anatomy import paper_block
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.results import Result
from tl_spikesink.views.format import MISSING, json_clean, num, pct, text_table

TABLE1: tuple[tuple[str, int, tuple[int, ...], tuple[int, ...]], ...] = (
    ("Llama-2-7B", 64, (4,), (62,)),
    ("Llama-2-13B", 80, (8,), (78, 79)),
    ("Llama-3-8B", 64, (4,), (64,)),
    ("Qwen2.5-7B", 56, (8, 10), (54, 55)),
    ("Qwen2.5-14B", 96, (10,), (90, 92, 94, 95)),
    ("Qwen3-8B", 72, (14,), (70, 72)),
    ("Qwen3-14B", 80, (14,), (79,)),
)
"""The paper's Table 1: (model, blocks 2L, step-up blocks, step-down blocks), paper numbering."""

TABLE2: tuple[tuple[str, int, int], ...] = (
    ("Llama-2-7B", 32000, 31887),
    ("Llama-2-13B", 32000, 31889),
    ("Llama-3-8B", 128256, 127956),
    ("Qwen2.5-7B", 152064, 149587),
    ("Qwen2.5-14B", 152064, 149645),
    ("Qwen3-8B", 151936, 151830),
    ("Qwen3-14B", 151936, 151824),
)
"""The paper's Table 2: (model, vocabulary size, spike tokens at position 0)."""

BASELINE = {"perplexity": 10.1, "sink_ratio": 0.460, "spike": 3818.0}
"""The paper's trained 7B baseline (Tables 3–8): perplexity, Eq. 28 sink ratio, Spike."""


@dataclass(frozen=True, repr=False)
class PaperRow(Result):
    """One model measured as the paper measures: Tables 1 and 2, sink ratio, Spike, claims."""

    model: str
    n_blocks: int
    """2L: the paper counts attention and FFN blocks separately."""
    sink_ratio: float
    """Eq. 27–28 (T = min(n, 64), max over the first half of keys > ε, mean over sequences)."""
    first_token_sink_ratio: float
    """Share of heads whose corpus-pooled first-token sink score exceeds ε (Gu et al.)."""
    spike: float
    """Largest |x| at resid_post in the spike channels over every layer (the tables' Spike)."""
    step_up: tuple[int, ...]
    """Step-up blocks from activations (the scan's lifecycle), paper numbering."""
    step_down: tuple[int, ...]
    """Step-down blocks from activations, paper numbering."""
    weights: Any
    """:class:`~tl_spikesink.mechanism.weights.WeightReading`, or None with `weights_reason`."""
    weights_reason: str
    vocab: Any
    """:class:`~tl_spikesink.mechanism.vocab.VocabSpikes`, or None with `vocab_reason`."""
    vocab_reason: str
    claims: Any
    """:class:`~tl_spikesink.mechanism.claims.ClaimsTable`, or None when not asked for."""
    corpus: tuple[dict[str, Any], ...]
    seconds: dict[str, float]
    """Wall time of each part (scan, weights, vocab, claims)."""

    @property
    def from_weights(self) -> dict[str, Any]:
        """Step-up / step-down FFN blocks and outlier channels read off ‖U_k‖_F, paper numbering."""
        w = self.weights
        if w is None:
            return {"step_up": None, "step_down": None, "channels": None}
        return {
            "step_up": [paper_block(la, "mlp") for la in w.step_up],
            "step_down": [paper_block(la, "mlp") for la in w.step_down],
            "channels": list(w.channels),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the issue's keys (table1, table2, claims, ...) and the published rows."""
        v = self.vocab
        table2 = {
            "vocab": None if v is None else v.n_items,
            "spike_tokens_position0": None if v is None else v.count_position0,
            "share_position0": None if v is None else v.share_position0,
            "spike_tokens_position1": None if v is None else v.count_position1,
            "share_position1": None if v is None else v.share_position1,
            "first_token": None if v is None else v.first_token_text,
            "reason": self.vocab_reason,
        }
        claims = None
        if self.claims is not None:
            claims = [
                {
                    "link": r.link,
                    "claim": r.claim,
                    "measured": r.measured,
                    "threshold": r.threshold,
                    "verdict": r.verdict,
                    "reason": r.note,
                }
                for r in self.claims.rows
            ]
        return json_clean(
            {
                "model": self.model,
                "n_blocks": self.n_blocks,
                "sink_ratio": self.sink_ratio,
                "first_token_sink_ratio": self.first_token_sink_ratio,
                "spike": self.spike,
                "table1": {
                    "step_up": list(self.step_up),
                    "step_down": list(self.step_down),
                    "from_weights": {**self.from_weights, "reason": self.weights_reason},
                },
                "table2": table2,
                "claims": claims,
                "corpus": list(self.corpus),
                "seconds": self.seconds,
                "paper": {
                    "table1": [
                        {"model": m, "blocks": b, "step_up": list(u), "step_down": list(d)}
                        for m, b, u, d in TABLE1
                    ],
                    "table2": [
                        {"model": m, "vocab": n, "spike_tokens_position0": k} for m, n, k in TABLE2
                    ],
                    "baseline": BASELINE,
                },
            }
        )

    def _repr_html_(self) -> str:
        from tl_spikesink.views.paper import paper_html

        return paper_html(self)

    def __str__(self) -> str:
        def blocks(x: Any) -> str:
            return MISSING if x is None else (", ".join(map(str, x)) or "none")

        fw = self.from_weights
        rows1 = [[m, str(b), blocks(u), blocks(d), MISSING, MISSING] for m, b, u, d in TABLE1] + [
            [
                f"{self.model} (ours)",
                str(self.n_blocks),
                blocks(self.step_up),
                blocks(self.step_down),
                blocks(fw["step_up"]),
                blocks(fw["step_down"]),
            ]
        ]
        head1 = ["Table 1", "blocks", "step-up", "step-down", "up (weights)", "down (weights)"]
        v = self.vocab
        rows2 = [[m, f"{n:,}", f"{k:,}", pct(k / n, 2)] for m, n, k in TABLE2]
        rows2.append(
            [f"{self.model} (ours)", MISSING, MISSING, MISSING]
            if v is None
            else [
                f"{self.model} (ours)",
                f"{v.n_items:,}",
                f"{v.count_position0:,}",
                pct(v.share_position0, 2),
            ]
        )
        lines = [f"{self.model} beside Sun et al. (2026)", ""]
        lines += text_table(head1, rows1)
        if self.weights_reason:
            lines.append(f"  from weights: {self.weights_reason}")
        lines += ["", *text_table(["Table 2", "vocab", "spike at pos 0", "share"], rows2)]
        if v is None:
            lines.append(f"  vocabulary probe: {self.vocab_reason}")
        else:
            lines.append(
                f"  at position 1 after {v.first_token_text!r}: {v.count_position1:,} "
                f"({pct(v.share_position1, 2)})"
            )
        lines += [
            "",
            f"sink ratio (Eq. 27-28)   {pct(self.sink_ratio, 1)}   "
            f"(paper's 7B baseline {pct(BASELINE['sink_ratio'], 1)})",
            f"first-token sink ratio   {pct(self.first_token_sink_ratio, 1)}   (Gu et al.)",
            f"Spike                    {num(self.spike)}   (paper's 7B baseline "
            f"{num(BASELINE['spike'])})",
        ]
        if self.claims is not None:
            lines += ["", str(self.claims)]
        lines.append("")
        lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def paper_row(
    model: Any,
    texts: Any = None,
    *,
    scan: Any = None,
    vocab: bool = True,
    claims: bool = True,
    max_tokens: int = 4096,
    progress: bool = True,
) -> PaperRow:
    """Measure `model` as the paper measures its models (see the module docstring).

    Args:
        model: a TransformerLens model; only read.
        texts: the corpus for the scan and the claims (default: the offline default corpus).
        scan: a scan of the model to reuse (else one is run on `texts`, at most `max_tokens`).
        vocab: run the vocabulary probe (Table 2): two batched passes over the whole vocabulary.
        claims: run the mechanism claims table.
        max_tokens: tokens of `texts` the scan reads.
        progress: show progress bars.

    Returns:
        A frozen :class:`PaperRow`; ``print(row)`` shows it beside the paper's rows. A part that
        does not apply (no gated MLP for the weights, no step-up block for the vocabulary probe)
        is None with the reason.
    """
    from tl_spikesink.anatomy import Anatomy
    from tl_spikesink.mechanism.claims import claims as run_claims
    from tl_spikesink.mechanism.vocab import vocab_probe
    from tl_spikesink.mechanism.weights import read_weights
    from tl_spikesink.probes.scan import scan as run_scan

    seconds: dict[str, float] = {}
    anatomy = Anatomy.of(model)
    start = time.perf_counter()
    if scan is None:
        scan = run_scan(model, texts, max_tokens=max_tokens, progress=progress)
    seconds["scan"] = time.perf_counter() - start
    life = scan.spikes.lifecycle
    step_up = tuple(sorted({paper_block(la, c) for la, c in life["step_up"]}))
    step_down = tuple(sorted({paper_block(la, c) for la, c in life["step_down"]}))

    start = time.perf_counter()
    weights, weights_reason = None, ""
    try:
        weights = read_weights(model, scan)
    except SpikeSinkError as e:
        weights_reason = f"not applicable: {e}"
    seconds["weights"] = time.perf_counter() - start

    start = time.perf_counter()
    table2, vocab_reason = None, "not run (vocab=False)"
    if vocab:
        try:
            table2, vocab_reason = vocab_probe(model, scan, progress=progress), ""
        except SpikeSinkError as e:
            vocab_reason = f"not applicable: {e}"
    seconds["vocab"] = time.perf_counter() - start

    start = time.perf_counter()
    table = None
    if claims:
        from tl_spikesink.corpus import default_texts

        table = run_claims(
            model, texts if texts is not None else default_texts(), scan, progress=progress
        )
    seconds["claims"] = time.perf_counter() - start
    return PaperRow(
        model=anatomy.model_name,
        n_blocks=2 * anatomy.n_layers,
        sink_ratio=scan.sinks.sink_ratio,
        first_token_sink_ratio=scan.sinks.first_token_sink_ratio,
        spike=scan.spikes.spike,
        step_up=step_up,
        step_down=step_down,
        weights=weights,
        weights_reason=weights_reason,
        vocab=table2,
        vocab_reason=vocab_reason,
        claims=table,
        corpus=scan.corpus,
        seconds=seconds,
    )


__all__ = ["BASELINE", "TABLE1", "TABLE2", "PaperRow", "paper_row"]
