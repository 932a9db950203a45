"""The decoupling experiment: do spikes and sinks matter to the model, and do they need each other?

One table, one row per intervention, the clean model first: loss, Δloss, perplexity,
KL(clean ‖ intervened), top-1 agreement, and what is left of the spikes (max top-1/median ratio
over layers) and the sinks (sink ratio; attention distance of the clean model's sink heads with
and without their sink key). Zeroing the spikes tells whether the model needs them; setting them
to their mean tells whether it needs their *value* or only their presence (Sun et al. 2024);
removing the sink keys, and swapping the norm that turns a spike into a fixed direction, tell
whether the sinks survive without the spikes and the spikes without the sinks.

Corpora: fitted values (spike means, norm scales) come from a calibration corpus disjoint from
the evaluation corpus. By default both come from :func:`tl_spikesink.corpus.default_texts`,
split deterministically: the first quarter of its paragraphs calibrates, the rest evaluates.
Structural defaults (which block, which channels, which heads) come from the clean scan of the
evaluation corpus, which the clean row needs anyway: they describe the model, not the texts.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from tl_spikesink.anatomy import Anatomy
from tl_spikesink.corpus import Corpus, default_texts, tokenize
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.evaluation.scoring import Evaluation, evaluate_all
from tl_spikesink.interventions import Intervention, sink_key_removal, spike_ablation
from tl_spikesink.interventions.norms import NormKind, norm_scales, norm_swap
from tl_spikesink.probes.scan import ScanConfig, ScanResult, as_corpus, environment
from tl_spikesink.results import Result, find
from tl_spikesink.views.format import num, text_table

log = logging.getLogger(__name__)

CALIBRATION_SHARE = 0.25
"""Share of the default corpus's paragraphs (the first ones) kept for calibration."""
DEFAULT_EVAL_TOKENS = 4096
DEFAULT_CALIBRATION_TOKENS = 4096
NORM_KINDS: tuple[NormKind, ...] = ("layernorm", "dyt", "fixed_scale", "rms_no_spike")


@dataclass(frozen=True)
class ExperimentRow:
    """One intervention's line of the table."""

    name: str
    loss: float
    delta_loss: float
    """Loss minus the clean model's loss."""
    perplexity: float
    kl: float
    top1_agreement: float
    max_spike_ratio: float
    sink_ratio: float
    """The paper's Eq. 27–28 sink ratio under the intervention."""
    first_token_sink_ratio: float
    """Share of heads whose pooled first-token sink score exceeds ε (Gu et al.)."""
    sink_head_distance: float
    sink_head_distance_without_sink: float
    n_spike_tokens: int
    n_nonfinite: int
    """Positions with non-finite log-probs (the forward overflowed); they make loss and KL NaN."""
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, ev: Evaluation, clean_loss: float) -> ExperimentRow:
        """The row of one evaluation."""
        return cls(
            name=ev.name,
            loss=ev.loss,
            delta_loss=ev.loss - clean_loss,
            perplexity=ev.perplexity,
            kl=ev.kl,
            top1_agreement=ev.top1_agreement,
            max_spike_ratio=ev.max_spike_ratio,
            sink_ratio=ev.sink_ratio,
            first_token_sink_ratio=ev.scan.sinks.first_token_sink_ratio,
            sink_head_distance=ev.sink_head_distance,
            sink_head_distance_without_sink=ev.sink_head_distance_without_sink,
            n_spike_tokens=len(ev.scan.spikes.tokens),
            n_nonfinite=ev.n_nonfinite,
            settings=ev.settings,
        )


@dataclass(frozen=True, repr=False)
class ExperimentTable(Result):
    """The decoupling table, with everything needed to say what was run on what."""

    model: str
    rows: tuple[ExperimentRow, ...]
    """The clean model first, then one row per intervention."""
    corpus: dict[str, Any]
    """The evaluation corpus (name, sizes, sha256)."""
    calibration: dict[str, Any] | None
    """The calibration corpus, disjoint from the evaluation corpus."""
    split: str
    """How the two corpora were chosen."""
    config: ScanConfig
    sink_heads: tuple[tuple[int, int], ...]
    """The clean model's sink heads (the attention-distance columns average over them)."""
    spike_channels: tuple[int, ...]
    """The clean scan's spike channels."""
    environment: dict[str, str] = field(default_factory=dict)
    evaluations: tuple[Evaluation, ...] = field(default=(), repr=False, compare=False)
    """The full evaluations (with their scans), for a closer look."""

    def row(self, name: str) -> ExperimentRow:
        """The row called `name`."""
        error = f"no row {name!r}; rows are {[r.name for r in self.rows]}"
        return find(self.rows, "name", name, error)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record: ``rows`` plus model, corpora, split, settings and seed."""
        from tl_spikesink.views.format import json_clean

        return json_clean(
            {
                "model": self.model,
                "rows": [dataclasses.asdict(r) for r in self.rows],
                "corpus": self.corpus,
                "calibration": self.calibration,
                "split": self.split,
                "config": dataclasses.asdict(self.config),
                "seed": self.config.seed,
                "sink_heads": [list(h) for h in self.sink_heads],
                "spike_channels": list(self.spike_channels),
                "environment": self.environment,
            }
        )


    def __str__(self) -> str:
        return render(self)


def experiment(
    model: Any,
    texts: Sequence[str] | Corpus | None = None,
    interventions: Sequence[Intervention] | None = None,
    *,
    calibration: Sequence[str] | Corpus | None = None,
    config: ScanConfig | None = None,
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS,
    progress: bool = True,
    distributed: bool = False,
) -> ExperimentTable:
    """Run the decoupling experiment: the clean model and each intervention on held-out text.

    Args:
        model: a HookedTransformer-like model; it is only borrowed.
        texts: evaluation texts or Corpus (default: the later part of the default corpus).
        interventions: what to compare (default: :func:`standard_interventions`).
        calibration: texts or Corpus for fitted values (default: the first part of the default
            corpus); must share no sequence with the evaluation corpus.
        config: scan settings (default: ``ScanConfig(max_tokens=4096)``).
        calibration_tokens: tokens of calibration text to read when it is given as texts.
        progress: show progress bars.
        distributed: shard the evaluations over the ranks of a torch.distributed process group
            (:mod:`tl_spikesink.distributed`); every rank returns the same table. Calibration
            is not sharded: every rank fits the interventions on the whole calibration corpus.
    """
    config = config or ScanConfig(max_tokens=DEFAULT_EVAL_TOKENS)
    run = evaluate_all
    if distributed:
        from tl_spikesink.distributed import evaluate_all_distributed as run
    Anatomy.of(model)
    paragraphs = default_texts() if texts is None or calibration is None else []
    cut = int(len(paragraphs) * CALIBRATION_SHARE)
    split = []
    if texts is None:
        texts = as_corpus(
            model, paragraphs[cut:], config, "pydoc_data.topics (default), evaluation part"
        )
        split.append(f"evaluation: default corpus paragraphs {cut}..{len(paragraphs) - 1}")
    else:
        texts = as_corpus(model, texts, config)
        split.append(f"evaluation: {texts.name}")
    if calibration is None:
        calibration = paragraphs[:cut]
        split.append(f"calibration: default corpus paragraphs 0..{cut - 1}")
        cal_name = "pydoc_data.topics (default), calibration part"
    else:
        cal_name = calibration.name if isinstance(calibration, Corpus) else "calibration"
        split.append(f"calibration: {cal_name}")
    calibration = as_corpus(
        model, calibration, replace(config, max_tokens=calibration_tokens), cal_name
    )
    _check_disjoint(texts, calibration)

    clean = run(model, texts, [None], config=config, progress=progress)[0]
    if interventions is None:
        interventions = standard_interventions(model, clean.scan, calibration)
    # One call for all interventions, so each batch's clean forward is shared by all of them.
    evaluations = [
        clean,
        *run(
            model,
            texts,
            interventions,
            config=config,
            sink_heads=clean.sink_heads,
            progress=progress,
        ),
    ]
    return ExperimentTable(
        model=clean.scan.model,
        rows=tuple(ExperimentRow.of(ev, clean.loss) for ev in evaluations),
        corpus=texts.describe(),
        calibration=calibration.describe(),
        split="; ".join(split),
        config=config,
        sink_heads=clean.sink_heads,
        spike_channels=clean.scan.spikes.channels,
        environment=environment(model),
        evaluations=tuple(evaluations),
    )


def standard_interventions(
    model: Any, scan: ScanResult, calibration: Sequence[str] | Corpus
) -> list[Intervention]:
    """The standard set: zero / mean spikes, sink keys removed (all heads, sink heads), norm swaps.

    Interventions that do not apply are left out and logged (no spike: no spike ablation; no
    sink head: no sink-head removal; no RMSNorm: no norm swap). Norm swaps cover ln1, ln2 and
    ln_final; the calibration corpus is read once for all of them.
    """
    if not isinstance(calibration, Corpus):
        calibration = tokenize(model, calibration, name="calibration")
    out: list[Intervention] = []
    if scan.spikes.massive:
        out.append(spike_ablation(scan, mode="zero", model=model))
        out.append(spike_ablation(scan, mode="mean", calibration=calibration, model=model))
    else:
        log.info("no massive activation in the scan: spike ablations left out")
    out.append(sink_key_removal(scan, heads="all", model=model))
    if scan.sinks.sink_heads:
        out.append(sink_key_removal(scan, heads="sink", model=model))
    else:
        log.info("no sink head in the scan: sink-head key removal left out")
    if Anatomy.of(model).rms_norm:
        norms = ("ln1", "ln2", "ln_final")
        scales = norm_scales(model, calibration, norms=norms, scan=scan)
        for kind in NORM_KINDS:
            if kind == "rms_no_spike" and not scan.spikes.channels:
                log.info("no spike channel in the scan: rms_no_spike left out")
                continue
            out.append(norm_swap(kind, norms=norms, calibration=scales, scan=scan, model=model))
    else:
        log.info("the model has no RMSNorm: norm swaps left out")
    return out


def _check_disjoint(evaluation: Corpus, calibration: Corpus) -> None:
    # Sequences (chunks) are compared, so the same text given twice is caught however it came in.
    seen = {c.tokens for c in calibration.chunks}
    shared = sum(c.tokens in seen for c in evaluation.chunks)
    if shared:
        raise SpikeSinkError(
            f"the calibration corpus {calibration.name!r} and the evaluation corpus "
            f"{evaluation.name!r} share {shared} sequence(s); calibrate on held-out text"
        )




def render(t: ExperimentTable) -> str:
    """The text table `print(table)` and the CLI show."""
    header = [
        "intervention",
        "loss",
        "Δloss",
        "ppl",
        "KL",
        "top-1",
        "spike/med",
        "sink ratio",
        "sink dist",
        "w/o sink",
    ]
    lines_ = [
        [
            r.name,
            num(r.loss),
            num(r.delta_loss),
            num(r.perplexity),
            num(r.kl),
            f"{100 * r.top1_agreement:.1f}%" if r.top1_agreement == r.top1_agreement else "-",
            num(r.max_spike_ratio),
            f"{r.sink_ratio:.3f}",
            num(r.sink_head_distance),
            num(r.sink_head_distance_without_sink),
        ]
        for r in t.rows
    ]

    c = t.corpus
    out = [
        f"tl_spikesink decoupling experiment on {t.model}: {c['n_tokens']:,} tokens in "
        f"{c['n_sequences']:,} sequences of {c['name']!r}",
        f"  {t.split}",
        f"  spike channels {', '.join(map(str, t.spike_channels)) or 'none'}; "
        f"{len(t.sink_heads)} clean sink heads; seed {t.config.seed}",
        "",
        *text_table(header, lines_),
        "",
        "KL: mean KL(clean || intervened) per token (nats); spike/med: max over layers of",
        "resid_post top-1 |x| / median |x|; sink dist: mean attention distance of the clean sink",
        "heads (tokens); w/o sink: the same with the first-token key removed, rest renormalized.",
        *(
            f"{r.name}: {r.n_nonfinite:,} of the scored positions have non-finite logits (overflow)"
            for r in t.rows
            if r.n_nonfinite
        ),
    ]
    return "\n".join(out)


__all__ = ["ExperimentRow", "ExperimentTable", "experiment", "render", "standard_interventions"]
