"""A seeded, deterministic training loop that logs how spikes and sinks emerge.

AdamW with linear warmup and cosine decay over a fixed number of steps. Every `log_every` steps
the model is measured on a fixed probe batch with the project's own
:func:`~tl_spikesink.evaluation.scoring.evaluate`
(the next-token loss and the scan) and :func:`first_token_profile` (one more forward of the small
probe batch), and a :class:`Snapshot` of plain floats is
kept, so the history never holds a tensor or a graph. The seed fixes the initialization (through
the TransformerLens config) and the data order (one `torch.Generator`), so two runs with the same
settings give bit-identical weights on the same machine and thread count; the probe batch has a
seed of its own (`probe_seed`), shared by every run it is to be compared with.

Checkpoints are folders (``meta.json``: TransformerLens config, variant, task, training settings
and history; ``weights.pt``; ``tokenizer/``) that :func:`load_checkpoint` turns back into a
HookedTransformer for every other analysis.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_spikesink.config import check_fields
from tl_spikesink.corpus import Corpus
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.evaluation.scoring import evaluate
from tl_spikesink.probes.engine import device_of
from tl_spikesink.probes.scan import ScanConfig
from tl_spikesink.results import Result
from tl_spikesink.training.tasks import BigramBackcopy, Task, probe_corpus, task_from_dict
from tl_spikesink.training.variants import Variant, build_model, model_config

_FORMAT = 2


@dataclass(frozen=True)
class TrainConfig:
    """Model size and optimization settings shared by every variant of an ablation."""

    n_layers: int = 2
    d_model: int = 64
    d_head: int = 16
    """Head dimension unless the variant sets its own (n_heads = d_model / d_head)."""
    d_mlp: int = 64
    """MLP hidden width, narrower than the usual 4×: a wide SwiGLU MLP can gate the copy head's
    output by itself, leaving no head a reason to park attention (at 256, no pre-norm run grew
    a sink head in 20,000 steps; at 32 one seed of two grew two)."""
    seq_len: int = 64
    """Training (and probe) sequence length, BOS included; also the model's n_ctx."""
    batch_size: int = 32
    steps: int = 8000
    lr: float = 1e-2
    warmup: int = 200
    """Linear warmup steps; then cosine decay to `min_lr_ratio` × lr."""
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    """AdamW decay on matrices (not on norm weights, gains or biases) unless the variant sets it."""
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 500
    """Measure the probe batch every this many steps (and at step 0 and the last step)."""
    probe_sequences: int = 32
    """Sequences in the fixed probe batch."""
    probe_seed: int = 0
    """Seed of the probe batch. Not the training seed: every run of an ablation is measured on
    the same sequences, so the spread over seeds is the models', not the probe batches'."""
    epsilon: float = 0.3
    """Sink-head threshold of the probe scan."""
    device: str = "cpu"
    """Where to train ("cuda" on a GPU); the probes read the model where it is."""
    precision: Literal["float32", "bfloat16"] = "float32"
    """"float32", or "bfloat16" (autocast of the training forward; weights stay float32)."""

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("n_layers", "d_model", "d_head", "d_mlp", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise SpikeSinkError(
                    f"TrainConfig.{name} must be positive, got {getattr(self, name)}"
                )
        if self.seq_len < 8:
            raise SpikeSinkError(f"TrainConfig.seq_len must be at least 8, got {self.seq_len}")
        if self.steps < 0 or self.warmup < 0:
            raise SpikeSinkError("TrainConfig.steps and warmup must be >= 0")
        if self.lr <= 0:
            raise SpikeSinkError(f"TrainConfig.lr must be positive, got {self.lr}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """The config `asdict` wrote to JSON (whose lists were tuples)."""
        return cls(**{**d, "betas": tuple(d["betas"])})


@dataclass(frozen=True)
class Snapshot:
    """The probe-batch measurements at one step (plain numbers only)."""

    step: int
    train_loss: float
    """Mean training loss over the steps since the last snapshot (NaN at step 0)."""
    loss: float
    """Next-token loss on the probe batch (nats)."""
    max_spike_ratio: float
    """Max over layers of resid_post top-1 |x| / median |x| (any token)."""
    bos_spike_ratio: float
    """Max over layers of the first token's largest |x_c| / median |x| (resid_post): the
    massive activation of the paper, which sits on the first token."""
    other_spike_ratio: float
    """The same for every other position: outliers on ordinary tokens, which are not the
    paper's spike."""
    bos_norm_ratio: float
    """Max over layers of ‖x_BOS‖ / median ‖x_t‖ over the other positions (Guo et al.'s
    residual-state peak)."""
    max_abs: float
    """Largest |x| of the residual stream (resid_post, any layer, any channel): the paper's
    absolute "Spike" (which it reads in the spike channels; a tiny model may have none)."""
    sink_ratio: float
    """The paper's Eq. 28 sink ratio on the probe batch (T = min(length, 64), ε)."""
    max_sink_score: float
    """Largest first-token sink score of any head."""
    sink_head_distance: float
    """Mean attention distance of the sink heads (NaN without sink heads)."""
    seconds: float
    """Wall time since training started."""


@dataclass(frozen=True, repr=False)
class TrainingRun(Result):
    """What one training run did: settings, emergence history, where the checkpoint is."""

    variant: Variant
    config: TrainConfig
    task: dict[str, Any]
    history: tuple[Snapshot, ...]
    checkpoint: str | None = None
    environment: dict[str, str] = field(default_factory=dict)
    perplexity: float = math.nan
    """Held-out perplexity at the end of training (:func:`held_out_perplexity`)."""

    @property
    def final(self) -> Snapshot:
        """The last snapshot (the end of training)."""
        return self.history[-1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record of the run."""
        from tl_spikesink.views.format import json_clean

        return json_clean(
            {
                "variant": self.variant.to_dict(),
                "config": asdict(self.config),
                "task": self.task,
                "history": [asdict(s) for s in self.history],
                "checkpoint": self.checkpoint,
                "environment": self.environment,
                "perplexity": self.perplexity,
            }
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainingRun:
        """The run :meth:`to_dict` wrote (JSON's nulls become NaN again)."""
        history = tuple(
            Snapshot(**{k: math.nan if v is None else v for k, v in h.items()})
            for h in d["history"]
        )
        perplexity = d.get("perplexity")
        return cls(
            Variant.from_dict(d["variant"]),
            TrainConfig.from_dict(d["config"]),
            dict(d["task"]),
            history,
            d.get("checkpoint"),
            dict(d.get("environment", {})),
            math.nan if perplexity is None else float(perplexity),
        )

    def __str__(self) -> str:
        head = f"{self.variant.name} (seed {self.config.seed}, {self.task.get('kind')})"
        if not math.isnan(self.perplexity):
            head += f", held-out perplexity {self.perplexity:.2f}"
        rows = [
            f"{'step':>6} {'train':>7} {'loss':>7} {'BOS/med':>8} {'other/med':>9} "
            f"{'BOS‖x‖':>7} {'sinks':>6} {'max α0':>7} {'dist':>6}"
        ]
        for s in self.history:
            rows.append(
                f"{s.step:>6} {s.train_loss:>7.3f} {s.loss:>7.3f} {s.bos_spike_ratio:>8.1f} "
                f"{s.other_spike_ratio:>9.1f} {s.bos_norm_ratio:>7.1f} {s.sink_ratio:>6.2f} "
                f"{s.max_sink_score:>7.2f} {s.sink_head_distance:>6.2f}"
            )
        return "\n".join([head, *rows])


def train(
    variant: Variant,
    config: TrainConfig | None = None,
    task: Task | None = None,
    *,
    out: str | Path | None = None,
    on_snapshot: Callable[[Snapshot], None] | None = None,
    progress: bool = True,
) -> tuple[HookedTransformer, TrainingRun]:
    """Train `variant` on `task` and log the emergence of spikes and sinks.

    Args:
        variant: the architecture and regime (see :mod:`tl_spikesink.training.variants`).
        config: size and optimization settings (default :class:`TrainConfig`).
        task: the data (default :class:`BigramBackcopy`).
        out: folder to save the checkpoint in (nothing saved when None).
        on_snapshot: called with each :class:`Snapshot` as it is taken (live logging).
        progress: show a progress bar.

    Returns:
        The trained HookedTransformer and the :class:`TrainingRun` record.
    """
    config = config or TrainConfig()
    task = task or BigramBackcopy()
    settings = Regime.of(variant, config)
    model = build_model(variant, _model_cfg(variant, config, task), task.tokenizer())
    if torch.device(config.device) != device_of(model):
        model.to(config.device)
    autocast = torch.autocast(
        torch.device(config.device).type,
        dtype=torch.bfloat16,
        enabled=config.precision == "bfloat16",
    )
    probe = probe_batch(task, config, min(settings.length, config.seq_len))
    scan_config = ScanConfig(batch_size=config.probe_sequences, epsilon=config.epsilon)
    optimizer = _optimizer(model, settings, config)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, settings, config)
    )
    gen = torch.Generator().manual_seed(config.seed)
    lengths = settings.lengths

    history: list[Snapshot] = []
    start = time.perf_counter()
    losses: list[float] = []

    def snapshot(step: int) -> None:
        train_loss = sum(losses) / len(losses) if losses else math.nan
        history.append(_measure(model, probe, scan_config, step, train_loss, start))
        losses.clear()
        if on_snapshot is not None:
            on_snapshot(history[-1])

    snapshot(0)
    bar = tqdm(range(1, settings.steps + 1), desc=variant.name, disable=not progress, leave=False)
    model.train()
    for step in bar:
        length = lengths[int(torch.randint(len(lengths), (1,), generator=gen))]
        tokens = task.sample(config.batch_size, length, gen).to(config.device)
        with autocast:
            loss = next_token_loss(model, tokens, settings.loss_from)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % config.log_every == 0 or step == settings.steps:
            snapshot(step)
            bar.set_postfix(
                loss=f"{history[-1].loss:.3f}",
                bos=f"{history[-1].bos_spike_ratio:.0f}",
                sink=f"{history[-1].max_sink_score:.2f}",
            )
    model.eval()
    # Free the optimizer's moments before returning: callers keep the model, not the optimizer.
    optimizer.zero_grad(set_to_none=True)
    del optimizer, schedule

    ppl = held_out_perplexity(model, task, settings.length, config.batch_size)
    run = TrainingRun(
        variant, config, task.to_dict(), tuple(history), environment=_env(), perplexity=ppl
    )
    if out is not None:
        run = dataclasses.replace(run, checkpoint=str(save_checkpoint(model, run, out)))
    return model, run


def probe_batch(task: Task, config: TrainConfig, length: int | None = None) -> Corpus:
    """The fixed batch a run with `config` is measured on (the same for every training seed).

    Its sequences have `length` tokens (default the config's seq_len), so the sink ratio reads
    T = min(length, 64) queries.
    """
    return probe_corpus(task, config.probe_sequences, length or config.seq_len, config.probe_seed)


@dataclass(frozen=True)
class Regime:
    """The training settings a variant ends up with: the config's, changed where it says."""

    length: int
    """Training sequence length L (BOS included)."""
    lengths: tuple[int, ...]
    """The lengths a step draws from (L alone for full-length training)."""
    loss_from: int
    """First position (BOS = 0) whose token counts in the loss."""
    steps: int
    lr: float
    min_lr_ratio: float
    betas: tuple[float, float]
    weight_decay: float

    @classmethod
    def of(cls, variant: Variant, config: TrainConfig) -> Regime:
        """The regime of `variant` trained under `config`."""
        length = max(8, round(config.seq_len * variant.seq_scale))
        if variant.context == "long":
            lengths: tuple[int, ...] = (length,)
        else:
            lengths = tuple(sorted({max(8, length // k) for k in (8, 4, 2, 1)}))
        loss_from = round(config.seq_len * variant.loss_from)
        if loss_from and (variant.context != "long" or loss_from >= length):
            raise SpikeSinkError(
                f"{variant.name}: a loss from position {loss_from} needs full-length sequences "
                f"(context='long') longer than it (L = {length})"
            )
        return cls(
            length=length,
            lengths=lengths,
            loss_from=loss_from,
            steps=round(config.steps * variant.token_scale),
            lr=config.lr * variant.lr_scale,
            min_lr_ratio=_default(variant.min_lr_ratio, config.min_lr_ratio),
            betas=(config.betas[0], _default(variant.beta2, config.betas[1])),
            weight_decay=_default(variant.weight_decay, config.weight_decay),
        )


def _default(value: float | None, fallback: float) -> float:
    return fallback if value is None else value


def _model_cfg(variant: Variant, config: TrainConfig, task: Task) -> HookedTransformerConfig:
    return model_config(
        variant,
        n_layers=config.n_layers,
        d_model=config.d_model,
        d_head=config.d_head,
        d_mlp=config.d_mlp,
        d_vocab=task.d_vocab,
        n_ctx=max(config.seq_len, Regime.of(variant, config).length),
        seed=config.seed,
        name=f"tl-spikesink/{variant.name}/seed{config.seed}",
    )


def _optimizer(model: torch.nn.Module, regime: Regime, config: TrainConfig) -> torch.optim.AdamW:
    # Decaying norm gains or gate biases would pull them to 0 (a closed gate, a dead norm).
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": regime.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=regime.lr,
        betas=regime.betas,
    )


def _lr_factor(step: int, regime: Regime, config: TrainConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    span = max(1, regime.steps - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
    floor = regime.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def next_token_loss(
    model: HookedTransformer, tokens: torch.Tensor, loss_from: int = 0
) -> torch.Tensor:
    """Mean next-token loss over the tokens at positions ≥ `loss_from` (BOS = 0; 0 or 1: all)."""
    # loss_per_token[:, i] scores the token at position i + 1.
    per_token = model(tokens, return_type="loss", loss_per_token=True)
    return per_token[:, max(loss_from - 1, 0) :].float().mean()


@torch.no_grad()
def held_out_perplexity(
    model: HookedTransformer, task: Task, length: int, batch_size: int = 32
) -> float:
    """exp(mean next-token loss) over held-out windows of `length` tokens, every position scored.

    Natural text: every disjoint window of the held-out end of the stream, which training never
    reads (the paper chunks C4 to the model's context). Other tasks: 256 fresh sequences from a
    generator no training run uses.
    """
    windows = getattr(task, "held_out_windows", None)
    if windows is not None:
        tokens = windows(length)
    else:
        tokens = task.sample(256, length, torch.Generator().manual_seed(7919))
    was_training = model.training
    model.eval()
    total = count = 0.0
    try:
        for batch in tokens.split(batch_size):
            per_token = model(batch.to(device_of(model)), return_type="loss", loss_per_token=True)
            total += float(per_token.double().sum())
            count += per_token.numel()
    finally:
        model.train(was_training)
    return math.exp(total / count)


def _measure(
    model: HookedTransformer,
    probe: Any,
    scan_config: ScanConfig,
    step: int,
    train_loss: float,
    start: float,
) -> Snapshot:
    ev = evaluate(model, probe, config=scan_config, progress=False)
    scores = ev.scan.sinks.scores
    first = first_token_profile(model, probe)
    return Snapshot(
        step=step,
        train_loss=train_loss,
        loss=ev.loss,
        max_spike_ratio=ev.max_spike_ratio,
        bos_spike_ratio=first.bos_spike_ratio,
        other_spike_ratio=first.other_spike_ratio,
        bos_norm_ratio=first.bos_norm_ratio,
        max_abs=float(ev.scan.spikes.top("resid_post", 1).max()),
        sink_ratio=ev.sink_ratio,
        max_sink_score=float(scores.max()),
        sink_head_distance=ev.sink_head_distance,
        seconds=time.perf_counter() - start,
    )


@dataclass(frozen=True)
class FirstTokenProfile:
    """Where the residual stream's large values sit: on the first token or elsewhere."""

    bos_spike_ratio: float
    other_spike_ratio: float
    bos_norm_ratio: float


@torch.no_grad()
def first_token_profile(model: HookedTransformer, probe: Any) -> FirstTokenProfile:
    """Split the probe batch's residual outliers into first-token and other positions.

    The scan's top-k names the largest values but cannot say how large the first token's are
    when others are larger; the probe batch is small (a few thousand tokens at d_model 64), so
    one more forward reading every ``hook_resid_post`` answers exactly.
    """
    tokens = torch.tensor([c.tokens for c in probe.chunks], device=device_of(model))
    names = [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(tokens, names_filter=names.__contains__)
    bos = other = peak = 0.0
    for name in names:
        x = cache[name].abs().float()
        median = float(x.median())
        norms = x.norm(dim=-1)
        bos = max(bos, float(x[:, 0].amax()) / median)
        other = max(other, float(x[:, 1:].amax()) / median)
        peak = max(peak, float(norms[:, 0].median() / norms[:, 1:].median()))
    return FirstTokenProfile(bos, other, peak)


def _env() -> dict[str, str]:
    import platform

    return {
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
    }


def save_checkpoint(model: HookedTransformer, run: TrainingRun, out: str | Path) -> Path:
    """Save `model` with its run record into folder `out` (created); returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    skip = {"device", "dtype", "n_devices"}  # chosen anew at every load
    cfg = {
        f.name: getattr(model.cfg, f.name)
        for f in dataclasses.fields(model.cfg)
        if f.init and f.name not in skip
    }
    meta = {"format": _FORMAT, "cfg": cfg, **run.to_dict()}
    (out / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / "weights.pt")
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(out / "tokenizer")
    return out


def load_checkpoint(path: str | Path, device: str | None = None) -> HookedTransformer:
    """Load a checkpoint folder written by :func:`train` back as a HookedTransformer.

    The record of the run is on ``model.training_run`` (a dict: variant, config, task, history).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        weights = torch.load(path / "weights.pt", "cpu", weights_only=True)
    except (OSError, ValueError) as e:
        raise SpikeSinkError(
            f"{path} is not a readable tl-spikesink training checkpoint ({e}); "
            "pass the folder that train(..., out=...) wrote"
        ) from None
    if meta.get("format") != _FORMAT:
        raise SpikeSinkError(f"{path}: checkpoint format {meta.get('format')}, expected {_FORMAT}")
    cfg = HookedTransformerConfig.from_dict(meta["cfg"])
    tok_dir = path / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tok_dir) if tok_dir.exists() else None
    variant = Variant.from_dict(meta["variant"])
    model = build_model(variant, cfg, tokenizer)
    model.load_state_dict(weights)
    model.training_run = {k: meta[k] for k in ("variant", "config", "task", "history")}
    if device is not None:
        model.to(device)
    return model.eval()


def rebuild_task(run: TrainingRun | dict[str, Any]) -> Task:
    """The task a run (or a loaded checkpoint's ``training_run``) was trained on."""
    record = run.task if isinstance(run, TrainingRun) else run["task"]
    return task_from_dict(record)


__all__ = [
    "Snapshot",
    "TrainConfig",
    "TrainingRun",
    "load_checkpoint",
    "Regime",
    "held_out_perplexity",
    "next_token_loss",
    "probe_batch",
    "rebuild_task",
    "save_checkpoint",
    "train",
]
