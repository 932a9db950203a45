"""Evaluation: what an intervention does to a model's predictions, and to its spikes and sinks.

Over a corpus, an :class:`Evaluation` holds the mean next-token loss (real tokens only: a
position is scored when it and the next one are real), the perplexity, the mean per-token
KL(clean ‖ intervened), the top-1 agreement with the clean model, and the scan under the
intervention (max spike ratio, sink ratio, attention distance of the clean model's sink heads).

Design: one stream over the corpus (:func:`tl_spikesink.probes.engine.run`). Per batch, a clean
forward and one forward under each intervention, whose hooks are installed for that forward only
and run before the probes, so each intervention's scan sees what it wrote. The clean log-probs
of a batch live only while that batch is scored, so memory is bounded by one batch, never by the
corpus, and every forward both scores and scans.

Evaluations keep sums, not means, so :meth:`Evaluation.merge` of two shards equals the
evaluation of both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from tl_spikesink.anatomy import Anatomy
from tl_spikesink.corpus import Corpus
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.evaluation.logits import count_nonfinite, kl, next_token_logprobs, nll
from tl_spikesink.interventions.base import Intervention
from tl_spikesink.probes.engine import Pass, Probe, Step, run
from tl_spikesink.probes.scan import ScanConfig, ScanProbes, ScanResult, as_corpus
from tl_spikesink.probes.sinks import SinkProbe
from tl_spikesink.results import Result


@dataclass(frozen=True, repr=False)
class Evaluation(Result):
    """Predictions and the scan of a model under one intervention (or none), over one corpus."""

    name: str
    settings: dict[str, Any]
    """The intervention's settings (empty for the clean model)."""
    n_predicted: int
    """Scored positions: real tokens followed by a real token."""
    loss_sum: float
    """Σ next-token negative log-likelihood (nats)."""
    kl_sum: float
    """Σ KL(clean ‖ intervened) of the next-token distributions (nats)."""
    agree_sum: int
    """Positions where the intervened top-1 token equals the clean one."""
    scan: ScanResult
    """The scan under the intervention."""
    sink_heads: tuple[tuple[int, int], ...] = field(default=())
    """The clean model's sink heads, whose attention distance is reported."""
    n_nonfinite: int = 0
    """Scored positions whose next-token log-probs are not finite (the forward overflowed);
    any makes the loss and KL NaN rather than quietly leaving those positions out."""

    @property
    def loss(self) -> float:
        """Mean next-token loss (nats per token)."""
        return self.loss_sum / self.n_predicted if self.n_predicted else float("nan")

    @property
    def perplexity(self) -> float:
        """exp(loss)."""
        return math.exp(self.loss) if self.loss < 709 else float("inf")

    @property
    def kl(self) -> float:
        """Mean per-token KL(clean ‖ intervened), nats."""
        return self.kl_sum / self.n_predicted if self.n_predicted else float("nan")

    @property
    def top1_agreement(self) -> float:
        """Share of positions whose top-1 prediction is the clean model's."""
        return self.agree_sum / self.n_predicted if self.n_predicted else float("nan")

    @property
    def max_spike_ratio(self) -> float:
        """Max over layers of resid_post top-1 |x| / median |x| under the intervention."""
        s = self.scan.spikes
        ratio = s.top("resid_post", 1)[:, 0] / s.median("resid_post")
        ratio = ratio[torch.isfinite(ratio)]
        return float(ratio.max()) if ratio.numel() else float("nan")

    @property
    def sink_ratio(self) -> float:
        """Share of heads that are sink heads under the intervention."""
        return self.scan.sinks.sink_ratio

    @property
    def sink_head_distance(self) -> float:
        """Mean attention distance of the clean model's sink heads, under the intervention."""
        return self._over_sink_heads(self.scan.sinks.attention_distance)

    @property
    def sink_head_distance_without_sink(self) -> float:
        """The same with the first-token key removed and the rest renormalized."""
        return self._over_sink_heads(self.scan.sinks.attention_distance_without_sink)

    def _over_sink_heads(self, per_head: torch.Tensor) -> float:
        if not self.sink_heads:
            return float("nan")
        return float(torch.stack([per_head[layer, head] for layer, head in self.sink_heads]).mean())

    def merge(self, other: Evaluation) -> Evaluation:
        """The evaluation of both corpora (shards) together, under the same intervention."""
        if (self.name, self.settings, self.sink_heads) != (
            other.name,
            other.settings,
            other.sink_heads,
        ):
            raise SpikeSinkError(
                f"cannot merge evaluations of different interventions or sink heads ({self.name!r} "
                f"vs {other.name!r}); evaluate both shards with the same settings"
            )
        return replace(
            self,
            n_predicted=self.n_predicted + other.n_predicted,
            loss_sum=self.loss_sum + other.loss_sum,
            kl_sum=self.kl_sum + other.kl_sum,
            agree_sum=self.agree_sum + other.agree_sum,
            n_nonfinite=self.n_nonfinite + other.n_nonfinite,
            scan=self.scan.merge(other.scan),
        )

    def to_dict(self) -> dict[str, Any]:
        """The numbers of one table row (JSON-ready; NaN becomes null)."""
        from tl_spikesink.views.format import json_clean

        return json_clean(
            {
                "name": self.name,
                "loss": self.loss,
                "perplexity": self.perplexity,
                "kl": self.kl,
                "top1_agreement": self.top1_agreement,
                "max_spike_ratio": self.max_spike_ratio,
                "sink_ratio": self.sink_ratio,
                "sink_head_distance": self.sink_head_distance,
                "sink_head_distance_without_sink": self.sink_head_distance_without_sink,
                "n_predicted": self.n_predicted,
                "n_nonfinite": self.n_nonfinite,
                "spike_channels": list(self.scan.spikes.channels),
                "n_spike_tokens": len(self.scan.spikes.tokens),
                "settings": self.settings,
            }
        )


def evaluate(
    model: Any,
    texts_or_corpus: Sequence[str] | str | Corpus | None,
    intervention: Intervention | None = None,
    *,
    config: ScanConfig | None = None,
    sink_heads: Sequence[tuple[int, int]] | None = None,
    progress: bool = True,
) -> Evaluation:
    """Evaluate `model` under `intervention` (None: the clean model) over a corpus.

    Args:
        model: a HookedTransformer-like model; it is only borrowed.
        texts_or_corpus: texts, a tokenized Corpus, or None for the default offline corpus.
        intervention: hooks to run under; None evaluates the clean model (KL 0, agreement 1).
        config: scan settings (batching, thresholds); also used to tokenize texts.
        sink_heads: heads whose attention distance to report (default: the clean model's sink
            heads on this corpus, found on the clean forward passes that scoring runs anyway).
        progress: show progress bars.
    """
    config = config or ScanConfig()
    Anatomy.of(model)
    corpus = as_corpus(model, texts_or_corpus, config)
    return evaluate_all(
        model, corpus, [intervention], config=config, sink_heads=sink_heads, progress=progress
    )[0]


def evaluate_all(
    model: Any,
    corpus: Corpus,
    interventions: Sequence[Intervention | None],
    *,
    config: ScanConfig,
    sink_heads: Sequence[tuple[int, int]] | None = None,
    progress: bool = True,
) -> list[Evaluation]:
    """Evaluate several interventions (None: the clean model) on one corpus, in one stream.

    Per batch the engine runs the clean forward, then one forward per intervention with its
    hooks installed for that forward only; each keeps its own scan and its scores against the
    clean log-probs of the same batch, so memory is bounded by one batch.
    """
    if not interventions:
        raise SpikeSinkError(
            "evaluate_all got no interventions; pass [None] for the clean model, or some "
            "interventions (e.g. ts.evaluation.standard_interventions(scan, ...))"
        )
    if all(len(c.tokens) < 2 for c in corpus.chunks):
        raise SpikeSinkError(
            f"nothing to score: every sequence of corpus {corpus.name!r} has one token, and the "
            "next-token loss needs two; pass longer texts"
        )
    clean = _Scorer(None)
    clean_scan = ScanProbes(model, config) if None in interventions else None
    heads_probe = None
    if sink_heads is None and clean_scan is None:
        a = Anatomy.of(model)
        heads_probe = SinkProbe(
            a.n_layers,
            a.n_heads,
            config.epsilon,
            config.sink_token_share,
            config.min_queries,
            config.top_k,
            config.max_candidates,
        )
    first = [
        clean,
        *(clean_scan.probes if clean_scan else ()),
        *([heads_probe] if heads_probe else []),
    ]
    passes = [Pass(first)]
    runs: list[tuple[Intervention | None, _Scorer, ScanProbes | None]] = []
    for iv in interventions:
        if iv is None:
            runs.append((None, clean, clean_scan))
            continue
        scorer, scanned = _Scorer(clean), ScanProbes(model, config)
        passes.append(Pass([scorer, *scanned.probes], tuple(iv.fwd_hooks)))
        runs.append((iv, scorer, scanned))
    names = ", ".join("clean" if iv is None else iv.name for iv in interventions)
    desc = f"evaluate ({names})" if len(interventions) > 1 else f"evaluate: {names}"
    run(model, corpus, passes=passes, progress=progress, desc=desc, **config.batching())
    if sink_heads is None:
        sink_heads = (clean_scan.sinks.result() if clean_scan else heads_probe.result()).sink_heads
    heads = tuple(tuple(h) for h in sink_heads)
    out = []
    for iv, scorer, scanned in runs:
        name, settings = ("clean", {}) if iv is None else (iv.name, dict(iv.settings))
        out.append(
            Evaluation(
                name,
                settings,
                scorer.n,
                scorer.loss,
                scorer.kl,
                scorer.agree,
                scanned.result(model, corpus),
                heads,
                scorer.nonfinite,
            )
        )
    return out


class _Scorer(Probe):
    """Sums of next-token loss, and of KL and top-1 agreement against a clean reference."""

    needs_logits = True

    def __init__(self, reference: _Scorer | None):
        self.reference = reference
        self.n, self.loss, self.kl, self.agree, self.nonfinite = 0, 0.0, 0.0, 0, 0
        self.logp: torch.Tensor | None = None

    def end_batch(self, step: Step, logits: torch.Tensor | None) -> None:
        logp, targets = next_token_logprobs(logits, step.batch)
        self.n += int(targets.numel())
        self.loss += float(nll(logp, targets).double().sum())
        self.nonfinite += count_nonfinite(logp)
        if self.reference is None:
            # The clean pass: its log-probs are the reference of this batch's later passes.
            self.logp, self.top = logp, logp.argmax(-1)
            self.agree += int(targets.numel())
            return
        self.kl += float(kl(self.reference.logp, logp).double().sum())
        self.agree += int((logp.argmax(-1) == self.reference.top).sum())


__all__ = ["Evaluation", "evaluate", "evaluate_all"]
