"""Heal a pretrained model after surgery: the paper's decoupling on a model you did not train.

The paper shows decoupling by retraining from scratch. Here a pretrained model gets one of its
changes after the fact, and only the new parameters and the norm gains are trained briefly on
text, so the question becomes: does the spike go while the sinks stay (norm changes), or the
sinks go while the spike stays (gates, loss masking), and at what perplexity cost against the
clean model and against the surgery before healing?

Surgeries (on a deep copy; the model passed in is left as it is):

* "dyt": every RMSNorm becomes DynamicTanh, γ·tanh(α·x) + β, with α = 1 / (median RMS of the
  norm's non-spike inputs) (:func:`~tl_spikesink.interventions.norms.norm_scales`), γ = 1, β = 0,
  so ordinary tokens start about where RMSNorm put them while spike channels saturate.
* "qk_norm": an RMSNorm over d_head on every head's queries and keys (TransformerLens's
  ``use_qk_norm``; one gain vector per layer for q and one for k, shared by the heads), its gain
  started at the median RMS of that layer's queries (keys), so a typical logit keeps its size.
* "gate": a head gate σ(x̂ W + b) on every head's output (``hook_z``), x̂ the block's normalized
  input, with W = 0 and b = `gate_bias` (σ ≈ 1: the model starts almost unchanged).
* "loss_from": no new module; the loss counts only tokens at positions ≥ `loss_from`.

Trained in every case: the new parameters and a gain on every norm (models loaded with
``fold_ln`` have none: each RMSNormPre gets a unit gain of its own first). Everything else is
frozen. Measured on held-out text (the last `eval_texts` of the corpus, never trained on):
perplexity, the Eq. 28 sink ratio, the first-token sink ratio and the Spike, for the clean model,
the surgery before healing, and after.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn
from tqdm.auto import tqdm

from tl_spikesink.config import at_least, check_fields
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.probes.engine import device_of
from tl_spikesink.results import Result, find

Surgery = Literal["dyt", "qk_norm", "gate", "loss_from"]
SURGERIES: tuple[str, ...] = get_args(Surgery)


@dataclass(frozen=True)
class HealConfig:
    """How to operate and heal."""

    surgery: Surgery = "dyt"
    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 4
    seq_len: int = 128
    """Training window length, BOS included."""
    loss_from: int = 32
    """"loss_from": the first position (BOS = 0) whose token counts in the loss."""
    gate_bias: float = 6.0
    """"gate": the gates' starting bias (σ(6) = 0.998)."""
    eval_texts: int = 48
    """The corpus's last texts, kept out of training, for every measurement."""
    eval_tokens: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self)
        at_least(self, {"steps": 1, "batch_size": 1, "seq_len": 8, "eval_texts": 1,
                        "eval_tokens": 1})  # fmt: skip
        if not self.lr > 0:
            raise SpikeSinkError(f"HealConfig.lr must be positive, got {self.lr}")
        if not 1 <= self.loss_from < self.seq_len:
            raise SpikeSinkError(
                f"HealConfig.loss_from must lie in [1, seq_len), got {self.loss_from}"
            )


@dataclass(frozen=True)
class Stage:
    """One model measured on the held-out text."""

    name: str
    """"clean", "surgery" (before healing) or "healed"."""
    perplexity: float
    sink_ratio: float
    """Eq. 28."""
    first_token_sink_ratio: float
    spike: float
    """Largest |x| at any block's hook_resid_post."""
    first_token_spike_ratio: float
    """The first token's largest |x| over the median |x|, max over layers."""


@dataclass(frozen=True, repr=False)
class Healing(Result):
    """Clean model, surgery, healed model: perplexity, sinks and spike side by side."""

    model: str
    config: HealConfig
    stages: tuple[Stage, ...]
    trained: int
    """Number of trained parameters."""
    losses: tuple[float, ...]
    """Training loss, averaged over each tenth of the steps."""
    seconds: float
    corpus: dict[str, Any]

    def stage(self, name: str) -> Stage:
        """The stage called `name`."""
        return find(
            self.stages, "name", name, f"no stage {name!r}; stages are clean, surgery, healed"
        )

    @property
    def verdict(self) -> dict[str, str]:
        """What the healed model kept of the clean one: spike and sinks each "kept" or "gone".

        "gone" when the healed value is below half the clean one (Spike) or below half and
        more than 0.05 under it (sink ratio).
        """
        clean, healed = self.stage("clean"), self.stage("healed")
        spike_gone = healed.spike < 0.5 * clean.spike
        sink_gone = (
            healed.sink_ratio < 0.5 * clean.sink_ratio
            and healed.sink_ratio < clean.sink_ratio - 0.05
        )
        return {"spike": "gone" if spike_gone else "kept", "sinks": "gone" if sink_gone else "kept"}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record."""
        from tl_spikesink.views.format import json_clean

        return json_clean(
            {
                "model": self.model,
                "config": asdict(self.config),
                "stages": [asdict(s) for s in self.stages],
                "verdict": self.verdict,
                "trained": self.trained,
                "losses": list(self.losses),
                "seconds": self.seconds,
                "corpus": self.corpus,
            }
        )

    def __str__(self) -> str:
        from tl_spikesink.views.format import text_table

        c = self.config
        rows = [
            [
                s.name,
                f"{s.perplexity:.2f}",
                f"{s.sink_ratio:.3f}",
                f"{s.first_token_sink_ratio:.3f}",
                f"{s.spike:.1f}",
                f"{s.first_token_spike_ratio:.1f}",
            ]  # fmt: skip
            for s in self.stages
        ]
        v = self.verdict
        return "\n".join(
            [
                f"{self.model}: {c.surgery}, healed {c.steps} steps of {c.batch_size}x{c.seq_len} "
                f"(lr {c.lr:g}, {self.trained:,} parameters, {self.seconds:.0f} s)",
                "",
                *text_table(
                    [
                        "model",
                        "perplexity",
                        "sink ratio",
                        "first-token sinks",
                        "Spike",
                        "BOS |x|/med",
                    ],  # fmt: skip
                    rows,
                ),
                "",
                f"after healing: spike {v['spike']}, sinks {v['sinks']} (held-out text; sink "
                "ratio: Eq. 28; Spike: the largest |x| at resid_post)",
            ]
        )


def heal(
    model: Any,
    surgery: Surgery | HealConfig = "dyt",
    texts: list[str] | None = None,
    *,
    progress: bool = True,
) -> tuple[Any, Healing]:
    """Operate on a copy of `model`, heal it briefly on `texts`, and measure all three.

    Args:
        model: a pre-norm RMSNorm HookedTransformer (left as it is).
        surgery: a surgery name (default settings) or a :class:`HealConfig`.
        texts: the corpus (default: the offline default corpus); its last
            ``config.eval_texts`` texts are only measured, the rest trained on.
        progress: show progress bars.

    Returns:
        The healed copy and the :class:`Healing` record.
    """
    from tl_spikesink.anatomy import Anatomy
    from tl_spikesink.corpus import default_texts
    from tl_spikesink.probes.scan import ScanConfig, as_corpus

    config = surgery if isinstance(surgery, HealConfig) else HealConfig(surgery=surgery)
    anatomy = Anatomy.of(model)
    if not anatomy.rms_norm or anatomy.norm_placement == "post":
        raise SpikeSinkError(
            f"healing operates on pre-norm RMSNorm models; {anatomy.model_name} has "
            f"normalization_type={anatomy.normalization_type!r}, {anatomy.norm_placement} norms"
        )
    texts = list(default_texts() if texts is None else texts)
    if len(texts) <= config.eval_texts:
        raise SpikeSinkError(
            f"{len(texts)} texts leave none to train on after the last {config.eval_texts} "
            "held out; pass more texts or lower HealConfig.eval_texts"
        )
    train_texts, eval_texts = texts[: -config.eval_texts], texts[-config.eval_texts :]
    scan_config = ScanConfig(max_tokens=config.eval_tokens, max_seq_len=config.seq_len)
    held_out = as_corpus(model, eval_texts, scan_config, name="held-out texts")
    start = time.perf_counter()
    clean, clean_scan = _measure("clean", model, held_out, scan_config)
    patient = operate(model, config, train_texts[:64], scan=clean_scan)
    before, _ = _measure("surgery", patient, held_out, scan_config)
    trained, losses = _train(patient, config, train_texts, progress)
    healed, _ = _measure("healed", patient, held_out, scan_config)
    record = Healing(
        model=str(model.cfg.model_name),
        config=config,
        stages=(clean, before, healed),
        trained=trained,
        losses=losses,
        seconds=time.perf_counter() - start,
        corpus={"train_texts": len(train_texts), **held_out.describe()},
    )
    return patient, record


def operate(model: Any, config: HealConfig, calibration: list[str], scan: Any = None) -> Any:
    """A deep copy of `model` with the surgery done.

    Every parameter is frozen but the new ones and the norm gains (see the module docstring).
    `scan`, a clean scan of the model, sets the cut above which a token counts as a spike token
    where the DyT calibration leaves spike tokens out (default: the absolute 100).
    """
    patient = copy.deepcopy(model)
    patient.eval()
    for p in patient.parameters():
        p.requires_grad_(False)
    if config.surgery == "dyt":
        _swap_dyt(model, patient, calibration, scan)
    else:
        _add_norm_gains(patient)
        patient.setup()  # hook names must reach the new norms' hook points
        if config.surgery == "qk_norm":
            _add_qk_norm(patient, calibration)
        elif config.surgery == "gate":
            _add_gates(patient, config.gate_bias)
    patient.setup()
    return patient


def _norms(model: Any) -> list[tuple[str, Any, str]]:
    """(module name, parent module, attribute) of every RMSNorm of the model."""
    found = []
    for i, block in enumerate(model.blocks):
        for attr in ("ln1", "ln2", "ln1_post", "ln2_post"):
            if isinstance(getattr(block, attr, None), nn.Module) and not isinstance(
                getattr(block, attr), nn.Identity
            ):
                found.append((f"blocks.{i}.{attr}", block, attr))
    found.append(("ln_final", model, "ln_final"))
    return found


def _swap_dyt(model: Any, patient: Any, calibration: list[str], scan: Any) -> None:
    from tl_spikesink.interventions.norms import norm_scales
    from tl_spikesink.training.variants import DynamicTanh

    scales = norm_scales(model, calibration, scan=scan).medians
    for name, parent, attr in _norms(patient):
        old = getattr(parent, attr)
        dyt = DynamicTanh(patient.cfg.d_model, alpha=1.0 / scales.get(name, 1.0))
        weight = getattr(old, "w", None)
        if weight is not None:  # an unfolded gain carries over
            with torch.no_grad():
                dyt.w.copy_(weight)
        setattr(parent, attr, dyt.to(device_of(patient)))


def _add_norm_gains(patient: Any) -> None:
    from transformer_lens.components import RMSNorm

    for _, parent, attr in _norms(patient):
        old = getattr(parent, attr)
        if hasattr(old, "w"):
            old.w.requires_grad_(True)
            continue
        new = RMSNorm(patient.cfg, patient.cfg.d_model).to(device_of(patient))
        with torch.no_grad():
            new.w.fill_(1.0)
        setattr(parent, attr, new)


def _add_qk_norm(patient: Any, calibration: list[str]) -> None:
    from transformer_lens.components import RMSNorm

    from tl_spikesink.probes.capture import Reduce
    from tl_spikesink.probes.engine import run
    from tl_spikesink.probes.scan import ScanConfig, as_corpus

    rms: dict[str, list[torch.Tensor]] = {}

    def keep(name: str) -> Any:
        def fn(x: torch.Tensor, mask: torch.Tensor) -> None:
            rms.setdefault(name, []).append(x.pow(2).mean(-1).sqrt()[mask])

        return fn

    names = [f"blocks.{i}.attn.hook_{w}" for i in range(patient.cfg.n_layers) for w in "qk"]
    corpus = as_corpus(patient, calibration, ScanConfig(max_tokens=2048))
    run(patient, corpus, [Reduce([(n, keep(n)) for n in names])], progress=False)
    for i, block in enumerate(patient.blocks):
        for w in "qk":
            norm = RMSNorm(patient.cfg, patient.cfg.d_head).to(device_of(patient))
            with torch.no_grad():
                norm.w.fill_(float(torch.cat(rms[f"blocks.{i}.attn.hook_{w}"]).median()))
            setattr(block.attn, f"{w}_norm", norm)
    patient.cfg.use_qk_norm = True


class HeadGate(nn.Module):
    """σ(x̂ W + b) per head, applied to ``hook_z`` by the hooks :func:`heal` installs."""

    def __init__(self, d_model: int, n_heads: int, bias: float):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(d_model, n_heads))
        self.b = nn.Parameter(torch.full((n_heads,), float(bias)))
        self.x: torch.Tensor | None = None

    def read(self, x: torch.Tensor, hook: Any) -> None:
        """Keep the block's normalized input (``ln1.hook_normalized``)."""
        self.x = x

    def apply(self, z: torch.Tensor, hook: Any) -> torch.Tensor:
        """Gate ``hook_z`` [batch, pos, head, d_head]."""
        gate = torch.sigmoid(self.x @ self.W + self.b)
        return z * gate[..., None]


def _add_gates(patient: Any, bias: float) -> None:
    for i, block in enumerate(patient.blocks):
        gate = HeadGate(patient.cfg.d_model, patient.cfg.n_heads, bias).to(device_of(patient))
        block.head_gate = gate
        # Permanent hooks: every analysis of the healed copy sees the gated model.
        patient.add_hook(f"blocks.{i}.ln1.hook_normalized", gate.read, is_permanent=True)
        patient.add_hook(f"blocks.{i}.attn.hook_z", gate.apply, is_permanent=True)


def _train(
    patient: Any, config: HealConfig, texts: list[str], progress: bool
) -> tuple[int, tuple[float, ...]]:
    from tl_spikesink.training.runs import next_token_loss

    params = [p for p in patient.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(config.seed)
    stream = _stream(patient, texts)
    window = config.seq_len - 1
    if len(stream) <= window:
        raise SpikeSinkError("the training texts are shorter than one window; pass more text")
    bos = int(patient.tokenizer.bos_token_id)
    device = device_of(patient)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    loss_from = config.loss_from if config.surgery == "loss_from" else 0
    losses: list[float] = []
    patient.train()
    try:
        for _ in tqdm(range(config.steps), desc=f"heal ({config.surgery})", disable=not progress):
            starts = torch.randint(0, len(stream) - window, (config.batch_size,), generator=gen)
            body = stream[starts[:, None] + torch.arange(window)]
            tokens = torch.cat([torch.full((config.batch_size, 1), bos), body], 1).to(device)
            loss = next_token_loss(patient, tokens, loss_from)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
    finally:
        patient.eval()
        for p in params:
            p.requires_grad_(False)
    tenth = max(1, len(losses) // 10)
    means = tuple(sum(losses[i : i + tenth]) / len(losses[i : i + tenth])
                  for i in range(0, len(losses), tenth))  # fmt: skip
    return sum(p.numel() for p in params), means


def _stream(model: Any, texts: list[str]) -> torch.Tensor:
    ids = model.tokenizer(texts, add_special_tokens=False)["input_ids"]
    return torch.tensor([i for text in ids for i in text])


def _measure(name: str, model: Any, corpus: Any, config: Any) -> tuple[Stage, Any]:
    from tl_spikesink.evaluation.scoring import evaluate
    from tl_spikesink.training.runs import first_token_profile

    ev = evaluate(model, corpus, config=config, progress=False)
    sinks = ev.scan.sinks
    stage = Stage(
        name=name,
        perplexity=ev.perplexity,
        sink_ratio=sinks.sink_ratio,
        first_token_sink_ratio=sinks.first_token_sink_ratio,
        spike=float(ev.scan.spikes.top("resid_post", 1).max()),
        first_token_spike_ratio=_first_token_ratio(model, corpus, first_token_profile),
    )
    return stage, ev.scan


def _first_token_ratio(model: Any, corpus: Any, profile: Any) -> float:
    from tl_spikesink.corpus import Corpus

    length = min(len(c.tokens) for c in corpus.chunks)
    chunks = tuple(c for c in corpus.chunks[:16])
    trimmed = Corpus(
        name=corpus.name, n_texts=len(chunks),
        chunks=tuple(type(c)(c.text_index, c.start, c.tokens[:length]) for c in chunks),
        prepend_bos=corpus.prepend_bos, max_seq_len=length, sha256=corpus.sha256,
    )  # fmt: skip
    return profile(model, trimmed).bos_spike_ratio


__all__ = ["SURGERIES", "HealConfig", "Healing", "HeadGate", "Stage", "heal", "operate"]
