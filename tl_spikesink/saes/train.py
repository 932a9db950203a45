"""Train small sae-lens SAEs offline, with or without spike tokens in the training activations.

sae-lens's ``SAETrainer`` trains from any iterator of activation batches (its ``DataProvider``),
so no Hugging Face dataset is needed: :func:`collect_activations` reads the activations at one
hook point from a corpus into memory (dropping spike tokens, on the fly, if asked), and
:func:`train_sae` feeds shuffled batches of them to ``SAETrainer.step`` (sae-lens's own loss,
Adam, LR schedule and dead-latent tracking). The loop is ours only to show a progress bar that can
be switched off and to set the input scaling exactly: with ``normalize=True`` the activations are
scaled by √d_in / mean ‖x‖ of the training set (sae-lens's "expected_average_only_in"), folded
into the weights at the end, so the SAE reads raw activations.

Note that the mean norm is taken over the training activations as they are: with spike tokens in
them it is inflated, so ordinary tokens are scaled down. That is part of what spikes do to SAE
training under the standard recipe, and what the with/without comparison measures.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from tqdm.auto import tqdm

from tl_spikesink.anatomy import Anatomy
from tl_spikesink.corpus import Corpus, default_texts, tokenize
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.probes.engine import HookFn, Probe, Step, run
from tl_spikesink.results import Result
from tl_spikesink.saes.masks import SpikeRule
from tl_spikesink.saes.splice import activation_width, layer_of

Exclude = Literal["spikes"] | None
"""Which positions to drop from training activations: "spikes" (those the rule flags) or None."""


@dataclass(frozen=True, repr=False)
class Activations(Result):
    """Activations at one hook point over a corpus (pads dropped), with their spike flags."""

    x: Float[torch.Tensor, "n d_in"]
    spike: Bool[torch.Tensor, " n"]
    """Rows the spike rule marked (computed per forward batch, as in a spliced run)."""
    hook: str
    rule: dict[str, Any]
    corpus: dict[str, Any]

    def drop_spikes(self) -> Activations:
        """The same activations without the spike tokens."""
        keep = ~self.spike
        return replace(self, x=self.x[keep], spike=self.spike[keep])

    def __len__(self) -> int:
        return len(self.x)


def collect_activations(
    model: Any,
    hook: str,
    texts: Sequence[str] | Corpus | None = None,
    *,
    rule: SpikeRule | None = None,
    max_tokens: int | None = 32768,
    max_seq_len: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> Activations:
    """Read the activations at `hook` over `texts`, and which of them are spike tokens.

    Args:
        model: a HookedTransformer-like model (only borrowed; blocks after the hook are skipped).
        hook: the hook point, e.g. ``hook_name("resid_post", 15)``.
        texts: texts or a Corpus (default: :func:`tl_spikesink.default_texts`).
        rule: how to flag spike tokens (default: ``SpikeRule()``, the norm test).
        max_tokens: stop after this many tokens of the corpus (None: all of it).
        max_seq_len: chunk texts to this many tokens (default: the model's n_ctx).
        batch_size: sequences per forward pass.
        progress: show a progress bar.
    """
    Anatomy.of(model)
    if hook not in model.hook_dict:
        raise SpikeSinkError(f"{type(model).__name__} has no hook point {hook!r}")
    rule = rule or SpikeRule()
    corpus = (
        texts
        if isinstance(texts, Corpus)
        else tokenize(
            model,
            default_texts() if texts is None else texts,
            name="texts" if texts is not None else "pydoc_data.topics (default)",
            max_tokens=max_tokens,
            max_seq_len=max_seq_len,
        )
    )
    grab = _Collect(hook, rule)
    layer = layer_of(hook)
    run(
        model,
        corpus,
        [grab],
        batch_size=batch_size,
        stop_at_layer=None if layer is None else layer + 1,
        progress=progress,
        desc="activations",
    )
    rows, flags = grab.rows, grab.flags
    return Activations(
        x=torch.cat(rows),
        spike=torch.cat(flags),
        hook=hook,
        rule=rule.describe(),
        corpus=corpus.describe(),
    )


class _Collect(Probe):
    """The activation at one hook point at every real token, with the rule's spike flags."""

    def __init__(self, hook: str, rule: SpikeRule):
        self.hook, self.rule = hook, rule
        self.rows: list[torch.Tensor] = []
        self.flags: list[torch.Tensor] = []

    def hooks(self) -> list[tuple[str, HookFn]]:
        return [(self.hook, self._grab)]

    def start_batch(self, step: Step) -> None:
        self.mask = step.mask

    def _grab(self, act: Float[torch.Tensor, "batch pos d_in"], hook: Any) -> None:
        self.rows.append(act[self.mask].detach().float().cpu())
        self.flags.append(self.rule.mask(act, self.mask)[self.mask].cpu())


def _batches(x: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled mini-batches (a fresh permutation per epoch, seeded)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=gen)
        for lo in range(0, len(x) - batch_size + 1, batch_size):
            yield x[order[lo : lo + batch_size]]


def train_sae(
    model: Any,
    hook: str,
    texts: Sequence[str] | Corpus | None = None,
    *,
    exclude: Exclude = "spikes",
    d_sae: int | None = None,
    expansion: int = 4,
    steps: int = 1000,
    batch_size: int = 512,
    l1_coefficient: float = 5.0,
    lr: float = 1e-3,
    normalize: bool = True,
    seed: int = 0,
    activations: Activations | None = None,
    progress: bool = True,
    **collect: Any,
) -> Any:
    """Train a sae-lens StandardSAE at `hook` of `model`, with or without spike tokens.

    Args:
        model: a HookedTransformer-like model (only borrowed).
        hook: the hook point, e.g. ``hook_name("resid_post", 15)``.
        texts: training texts or a Corpus (default: the default corpus, capped by max_tokens).
        exclude: "spikes" drops the positions the spike rule flags (default rule:
            ``SpikeRule()``, the norm test; pass rule= to change it) from the training
            activations; None keeps them.
        d_sae: number of latents (default: `expansion` × d_in).
        expansion: latents per input channel when d_sae is not given.
        steps: optimizer steps.
        batch_size: activations per step.
        l1_coefficient: sae-lens's sparsity coefficient (on inputs scaled to norm √d_in when
            `normalize`), warmed up over the first 10 % of steps.
        lr: Adam learning rate (constant after a 5 % warm-up).
        normalize: scale inputs to mean norm √d_in while training (folded in at the end).
        seed: seeds the initialization and the shuffling.
        activations: reuse activations already collected (`texts` and `collect` are then
            ignored); they must be of this hook point. `exclude` still applies.
        progress: show progress bars.
        **collect: passed to :func:`collect_activations` (rule, max_tokens, max_seq_len;
            collect_batch_size= for its forward passes, since batch_size is the training one).

    Returns:
        An inference ``StandardSAE``; ``cfg.metadata`` records the hook, the model and
        ``tl_spikesink_training`` (settings, tokens seen and dropped, corpus, dead latents).
    """
    from sae_lens import SAE, StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    anatomy = Anatomy.of(model)
    if activations is None:
        if "collect_batch_size" in collect:
            collect["batch_size"] = collect.pop("collect_batch_size")
        activations = collect_activations(model, hook, texts, progress=progress, **collect)
    elif activations.hook != hook:
        raise SpikeSinkError(
            f"activations were read at {activations.hook!r}, not {hook!r}; collect them there"
        )
    if exclude not in ("spikes", None):
        raise SpikeSinkError(f"exclude must be 'spikes' or None, got {exclude!r}")
    train = activations.drop_spikes() if exclude == "spikes" else activations
    x = train.x
    d_in = activation_width(model, hook)
    if x.shape[-1] != d_in:
        raise SpikeSinkError(f"activations are {x.shape[-1]} wide but {hook!r} carries {d_in}")
    if len(x) < batch_size:
        raise SpikeSinkError(
            f"only {len(x)} training activations for batch_size={batch_size}; read more tokens "
            "(max_tokens=) or lower batch_size"
        )
    if steps < 1:
        raise SpikeSinkError(f"steps must be at least 1, got {steps}")
    d_sae = d_sae or expansion * d_in

    torch.manual_seed(seed)
    cfg = StandardTrainingSAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        l1_coefficient=l1_coefficient,
        l1_warm_up_steps=steps // 10,
        normalize_activations="expected_average_only_in" if normalize else "none",
        metadata=SAEMetadata(hook_name=hook, model_name=anatomy.model_name),
    )
    training = StandardTrainingSAE(cfg)
    trainer = SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=steps * batch_size,
            train_batch_size_samples=batch_size,
            lr=lr,
            lr_end=lr,
            lr_warm_up_steps=max(1, steps // 20),
            # Dead = no firing over the last ~quarter of the run (sae-lens counts steps).
            dead_feature_window=max(1, steps // 4),
            feature_sampling_window=steps + 1,
        ),
        sae=training,
        data_provider=_batches(x, batch_size, seed),
    )
    scale = math.sqrt(d_in) / float(x.norm(dim=-1).double().mean()) if normalize else None
    trainer.activation_scaler.scaling_factor = scale
    for _ in tqdm(range(steps), desc="train SAE", disable=not progress):
        trainer.step(next(trainer.data_provider))
        trainer.n_training_steps += 1
    if scale is not None:
        training.fold_activation_norm_scaling_factor(scale)
        trainer.activation_scaler.scaling_factor = None
    trainer.set_final_sae_metadata()

    sae = SAE.from_dict(training.cfg.get_inference_sae_cfg_dict())
    sae.load_state_dict(training.state_dict())
    sae.eval()
    sae.cfg.metadata.tl_spikesink_training = {
        "exclude": exclude,
        "spike_rule": activations.rule,
        "n_tokens_read": len(activations),
        "n_spike_tokens_read": int(activations.spike.sum()),
        "n_train_activations": len(x),
        "corpus": activations.corpus,
        "steps": steps,
        "batch_size": batch_size,
        "l1_coefficient": l1_coefficient,
        "lr": lr,
        "normalize": normalize,
        "input_scale": scale,
        "seed": seed,
        "dead_latents_last_quarter": training.cfg.metadata.num_dead_features,
        "l0_mean_over_training": training.cfg.metadata.l0,
    }
    return sae


__all__ = ["Activations", "Exclude", "collect_activations", "train_sae"]
