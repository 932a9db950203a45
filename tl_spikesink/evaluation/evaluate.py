"""Evaluation: what an intervention does to a model's predictions, and to its spikes and sinks.

Over a corpus, an :class:`Evaluation` holds the mean next-token loss (real tokens only: a
position is scored when it and the next one are real), the perplexity, the mean per-token
KL(clean ‖ intervened), the top-1 agreement with the clean model, and the scan under the
intervention (max spike ratio, sink ratio, attention distance of the clean model's sink heads).

Design: two streams over the same deterministic batches (:meth:`Corpus.batches`), each holding
one batch at a time, so memory is bounded by a batch, never by the corpus:

1. *scoring*: per batch, a clean forward and one forward under each intervention (installed with
   :meth:`Intervention.applied` for that forward only); the clean log-probs live only while that
   batch is scored, and only sums are kept.
2. *scanning*: :func:`tl_spikesink.probes.scan.scan_corpus` under the intervention's hooks, which run
   before the probes, so the probes see what the intervention wrote.

Why not one forward per batch for both: ``scan_corpus`` keeps its probes installed for the whole
corpus, so a clean reference forward run from its ``on_logits`` callback would be probed too
(switching the intervention off is not enough: the probes would count the clean batch into the
intervened scan), and computing the clean pass first would need every batch's clean log-probs
kept until the scan reaches it (SmolLM2: 4k tokens × 49k vocabulary × 4 B = 800 MB). The price of
the bounded design is one extra forward per batch. The clean evaluation itself needs no
reference, and takes one forward per batch (the scan's, with ``on_logits``).

Evaluations keep sums, not means, so :meth:`Evaluation.merge` of two shards equals the
evaluation of both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from tl_spikesink.anatomy import Anatomy
from tl_spikesink.corpus import Batch, Corpus
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.interventions.base import Intervention
from tl_spikesink.probes.scan import ScanConfig, ScanResult, _as_corpus, _device_of, scan_corpus
from tl_spikesink.probes.sinks import SinkProbe


@dataclass(frozen=True)
class Evaluation:
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
        from tl_spikesink.views.text import _clean

        return _clean(
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
    corpus = _as_corpus(model, texts_or_corpus, config)
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
    """Evaluate several interventions on one corpus, sharing each batch's clean forward."""
    scored = [iv for iv in interventions if iv is not None]
    probe = None
    if sink_heads is None and scored:
        a = Anatomy.of(model)
        probe = SinkProbe(
            a.n_layers,
            a.n_heads,
            config.epsilon,
            config.sink_token_share,
            config.min_queries,
            config.top_k,
            config.max_candidates,
        )
    sums = _score(model, corpus, scored, config, probe, progress) if scored else []
    if probe is not None:
        sink_heads = probe.result().sink_heads
    out: list[Evaluation] = []
    rows = tqdm(
        interventions, desc="evaluate", unit="run", disable=not progress or len(interventions) < 2
    )
    for iv in rows:
        rows.set_postfix_str("clean" if iv is None else iv.name)
        if iv is None:
            out.append(_evaluate_clean(model, corpus, config, sink_heads, progress))
            continue
        n, loss, kl, agree, bad = sums.pop(0)
        scan = scan_corpus(
            model,
            corpus,
            config,
            fwd_hooks=iv.fwd_hooks,
            progress=progress,
            desc=f"scan: {iv.name}",
        )
        out.append(
            Evaluation(iv.name, dict(iv.settings), n, loss, kl, agree, scan, tuple(sink_heads), bad)
        )
    return out


def _evaluate_clean(
    model: Any,
    corpus: Corpus,
    config: ScanConfig,
    sink_heads: Sequence[tuple[int, int]] | None,
    progress: bool,
) -> Evaluation:
    totals = [0, 0.0, 0]

    def on_logits(batch: Batch, logits: torch.Tensor) -> None:
        logp, targets = _next_token_logprobs(logits, batch)
        totals[0] += int(targets.numel())
        totals[1] += float(_nll(logp, targets).double().sum())
        totals[2] += _count_nonfinite(logp)

    scan = scan_corpus(
        model, corpus, config, on_logits=on_logits, progress=progress, desc="scan: clean"
    )
    heads = scan.sinks.sink_heads if sink_heads is None else tuple(tuple(h) for h in sink_heads)
    n, loss, bad = totals
    return Evaluation("clean", {}, n, loss, 0.0, n, scan, heads, bad)


def _score(
    model: Any,
    corpus: Corpus,
    interventions: Sequence[Intervention],
    config: ScanConfig,
    probe: SinkProbe | None,
    progress: bool,
) -> list[tuple[int, float, float, int, int]]:
    """(n, Σ loss, Σ KL, Σ agreement, non-finite) per intervention; one batch in memory."""
    device = _device_of(model)
    totals = [[0, 0.0, 0.0, 0, 0] for _ in interventions]
    bar = tqdm(total=corpus.n_tokens, unit="tok", desc="score", disable=not progress, leave=False)
    with torch.inference_mode():
        for batch in corpus.batches(config.batch_size, config.padding_side):
            tokens, mask = batch.tokens.to(device), batch.mask.to(device)
            with model.hooks(fwd_hooks=probe.hooks() if probe is not None else []):
                if probe is not None:
                    probe.start_batch(batch, mask)
                clean = model(tokens, attention_mask=mask.long())
                if probe is not None:
                    probe.end_batch()
            clean_logp, targets = _next_token_logprobs(clean, batch)
            del clean
            clean_top = clean_logp.argmax(-1)
            for total, iv in zip(totals, interventions, strict=True):
                with iv.applied(model):
                    logits = model(tokens, attention_mask=mask.long())
                logp, _ = _next_token_logprobs(logits, batch)
                del logits
                total[0] += int(targets.numel())
                total[1] += float(_nll(logp, targets).double().sum())
                total[2] += float(_kl(clean_logp, logp).double().sum())
                total[3] += int((logp.argmax(-1) == clean_top).sum())
                total[4] += _count_nonfinite(logp)
            bar.update(int(batch.lengths.sum()))
    bar.close()
    return [tuple(t) for t in totals]


def _next_token_logprobs(
    logits: Float[torch.Tensor, "batch pos vocab"], batch: Batch
) -> tuple[Float[torch.Tensor, "n vocab"], Int[torch.Tensor, " n"]]:
    """Log-probs at every scored position (real, followed by a real token) and their targets."""
    mask = batch.mask.to(logits.device)
    scored = mask[:, :-1] & mask[:, 1:]
    logp = logits[:, :-1][scored].float().log_softmax(-1)
    return logp, batch.tokens.to(logits.device)[:, 1:][scored]


def _count_nonfinite(logp: Float[torch.Tensor, "n vocab"]) -> int:
    return int((~torch.isfinite(logp).all(-1)).sum())


def _nll(
    logp: Float[torch.Tensor, "n vocab"], targets: Int[torch.Tensor, " n"]
) -> Float[torch.Tensor, " n"]:
    return -logp.gather(-1, targets[:, None]).squeeze(-1)


def _kl(
    p_log: Float[torch.Tensor, "n vocab"], q_log: Float[torch.Tensor, "n vocab"]
) -> Float[torch.Tensor, " n"]:
    # Σ p (log p − log q); terms with p = 0 are 0 even where log q = −inf.
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), 0.0).sum(-1)


__all__ = ["Evaluation", "evaluate", "evaluate_all"]
