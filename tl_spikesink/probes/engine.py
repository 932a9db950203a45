"""The engine: one loop that streams a corpus through a model, probes reading, interventions writing.

Every analysis in the package is a set of :class:`Probe` objects handed to :func:`run`. For each
batch the engine moves the tokens and the padding mask to the model's device, tells every probe
which batch is coming (:meth:`Probe.start_batch`), runs one forward pass per :class:`Pass` with
that pass's write hooks (an intervention) and its probes' read hooks installed, and hands each
probe the logits if it asked for them (:meth:`Probe.end_batch`). Hooks go in as
``model.hooks`` puts them in (:func:`installed`), and exactly those come out, also on error;
everything runs under ``torch.inference_mode``. A batch without pads goes into a
HookedTransformer without its all-ones mask, which would cost every layer a masking step and
change no output.

A probe keeps its own reduction and learns the current batch from the :class:`Step` it is given,
so no hook reads shared mutable state. Several passes over the same batch (a clean pass, then
one per intervention) let a later probe compare with what an earlier one saw in that batch.

Example:
    >>> class TokenCounter(Probe):  # doctest: +SKIP
    ...     def __init__(self):
    ...         self.n = 0
    ...     def start_batch(self, step):
    ...         self.n += int(step.mask.sum())
    >>> counter = TokenCounter()  # doctest: +SKIP
    >>> run(model, corpus, [counter])  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm

from tl_spikesink.anatomy import check_weights
from tl_spikesink.corpus import Batch, Corpus, PaddingSide

R = TypeVar("R")

HookFn = Callable[[torch.Tensor, Any], torch.Tensor | None]
"""A TransformerLens forward hook: fn(activation, hook) -> None, or a replacement activation."""


@dataclass(frozen=True)
class Step:
    """One batch as the probes see it: where it came from, and its tensors on the model's device."""

    index: int
    """Batch number; batches come in the same order on every run over the same corpus."""
    batch: Batch
    tokens: Int[torch.Tensor, "batch pos"]
    mask: Bool[torch.Tensor, "batch pos"]
    """True at real tokens, False at pads."""
    has_pads: bool


class Probe:
    """Something that watches forward passes; override what you need.

    A probe that writes (its hook returns a tensor) must say so with ``writes = True``: the
    engine installs writers before readers at every hook point, so readers see what was written.
    """

    needs_logits: ClassVar[bool] = False
    """Ask the model for logits and hand them to :meth:`end_batch`."""
    writes: ClassVar[bool] = False

    def hooks(self) -> Sequence[tuple[str, HookFn]]:
        """(hook_name, fn) pairs to install for each forward pass of the probe's pass."""
        return ()

    def start_batch(self, step: Step) -> None:
        """Called before the batch's first forward pass."""

    def end_batch(self, step: Step, logits: Float[torch.Tensor, "batch pos vocab"] | None) -> None:
        """Called after this probe's forward pass of the batch (logits if `needs_logits`)."""

    def freeze(self, result_type: type[R], **changes: Any) -> R:
        """A `result_type` made of this probe's attributes named like its fields, and `changes`.

        For a probe whose running sums are its result's fields: every field without a default
        comes from the attribute of that name (unless in `changes`); fields with a default keep it.
        """
        needed = [
            f.name
            for f in dataclasses.fields(result_type)  # type: ignore[arg-type]
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        return result_type(**{n: getattr(self, n) for n in needed if n not in changes}, **changes)


@dataclass(frozen=True)
class Pass:
    """One forward pass per batch: write hooks (an intervention), then the probes' read hooks."""

    probes: Sequence[Probe] = ()
    fwd_hooks: Sequence[tuple[str, HookFn]] = ()
    skip: Callable[[Step], bool] | None = None
    """Leave this pass out for a batch when it returns True (its probes get no end_batch)."""


def run(
    model: Any,
    corpus: Corpus,
    probes: Sequence[Probe] = (),
    *,
    fwd_hooks: Sequence[tuple[str, HookFn]] = (),
    passes: Sequence[Pass] | None = None,
    batch_size: int = 8,
    padding_side: PaddingSide = "right",
    stop_at_layer: int | None = None,
    progress: bool = True,
    desc: str = "forward",
) -> None:
    """Stream `corpus` through `model` once, batch by batch, with `probes` watching.

    Args:
        model: a HookedTransformer, HookedEncoder, HookedSAETransformer or TransformerBridge.
        corpus: the tokenized corpus.
        probes: probes of the single pass (ignored when `passes` is given).
        fwd_hooks: write hooks of the single pass, e.g. ``intervention.fwd_hooks``.
        passes: several forward passes per batch instead, in order.
        batch_size: sequences per forward pass.
        padding_side: side on which batches are padded.
        stop_at_layer: stop the forward after this block when no probe needs logits and the
            model supports it (the blocks after the last hook are not needed).
        progress: show a progress bar (tokens).
        desc: the bar's label.
    """
    passes = list(passes) if passes is not None else [Pass(tuple(probes), tuple(fwd_hooks))]
    every = [p for ps in passes for p in ps.probes]
    check_weights(model)
    device = device_of(model)
    forward = _forward_kwargs(model, stop_at_layer)
    drop_mask = _may_drop_mask(model)
    stopper = _bridge_stopper(model)
    bar = tqdm(total=corpus.n_tokens, unit="tok", desc=desc, disable=not progress, leave=False)
    single = passes[0] if len(passes) == 1 and passes[0].skip is None else None
    try:
        with torch.inference_mode():
            # One pass: install the hooks once for the whole corpus (the scan's hot path).
            with installed(model, _hooks(single, stopper) if single else []):
                for index, batch in enumerate(corpus.batches(batch_size, padding_side)):
                    mask = batch.mask.to(device)
                    step = Step(
                        index, batch, batch.tokens.to(device), mask, not bool(batch.mask.all())
                    )
                    for probe in every:
                        probe.start_batch(step)
                    for ps in passes:
                        if ps.skip is not None and ps.skip(step):
                            continue
                        if single:
                            logits = _call(model, step, ps, forward, drop_mask)
                        else:
                            with installed(model, _hooks(ps, stopper)):
                                logits = _call(model, step, ps, forward, drop_mask)
                        for probe in ps.probes:
                            probe.end_batch(step, logits if probe.needs_logits else None)
                        del logits
                    bar.update(int(batch.lengths.sum()))
    finally:
        bar.close()


Stopper = Callable[[list[str]], list[tuple[str, HookFn]]]
"""Given a pass's hook names, the hooks that end its forward early (none: run to the end)."""


def _hooks(ps: Pass, stopper: Stopper | None = None) -> list[tuple[str, HookFn]]:
    writers = [h for p in ps.probes if p.writes for h in p.hooks()]
    readers = [h for p in ps.probes if not p.writes for h in p.hooks()]
    hooks = [*ps.fwd_hooks, *writers, *readers]
    if stopper is None or any(p.needs_logits for p in ps.probes):
        return hooks
    return hooks + stopper([name for name, _ in hooks])


_BLOCK = re.compile(r"blocks\.(\d+)\.")


def _bridge_stopper(model: Any) -> Stopper | None:
    """For a TransformerBridge: a last hook that ends the forward after the last hooked block.

    The bridge runs HF's forward, which computes the final norm and the logits even with
    ``return_type=None`` (a fifth of a SmolLM2 forward at batch 8), and its own
    ``stop_at_layer`` stops only *before* a block. Raising the bridge's StopAtLayerException
    from a hook installed after every probe's (hooks at one point run in the order they were
    added) ends the forward where nothing reads any more; the bridge's forward catches it.
    A HookedTransformer needs none of this: ``return_type=None`` already skips the unembedding.
    """
    if type(model).__name__ != "TransformerBridge":
        return None
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    def stop(x: torch.Tensor, hook: Any) -> None:
        raise StopAtLayerException(x)

    def stopper(names: list[str]) -> list[tuple[str, HookFn]]:
        layers = [_BLOCK.match(n) for n in names]
        if not names or not all(layers):  # a hook outside the blocks (embedding, final norm)
            return []
        last = max(int(m.group(1)) for m in layers if m)
        return [(f"blocks.{last}.hook_resid_post", stop)]

    return stopper


@contextlib.contextmanager
def installed(model: Any, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[None]:
    """``model.hooks(fwd_hooks=...)``, removing the hooks from the points that have them only.

    TransformerLens's context adds each hook at a new context level and, on exit, walks every
    hook point of the model to remove that level's (3.7 ms for a SmolLM2's 785 points, about
    as much as a scan's reductions of a 100-token batch). Here the same level comes off the
    hook points that got a hook, also on error; any other model goes through ``model.hooks``.
    """
    from transformer_lens import HookedRootModule

    if not isinstance(model, HookedRootModule) or not fwd_hooks:
        with model.hooks(fwd_hooks=list(fwd_hooks)):
            yield
        return
    model.context_level += 1
    level, points = model.context_level, {}
    try:
        for name, fn in fwd_hooks:
            point = model.mod_dict[name]
            point.add_hook(fn, dir="fwd", level=level)
            points[id(point)] = point
        yield
    finally:
        for point in points.values():
            point.remove_hooks("fwd", level=level)
        model.context_level -= 1


def _call(
    model: Any, step: Step, ps: Pass, forward: dict[str, Any], drop_mask: bool
) -> torch.Tensor | None:
    mask = None if drop_mask and not step.has_pads else step.mask.long()
    if any(p.needs_logits for p in ps.probes):
        return model(step.tokens, attention_mask=mask)
    return model(step.tokens, attention_mask=mask, return_type=None, **forward)


def _may_drop_mask(model: Any) -> bool:
    """Whether a batch without pads may go in without its (all-ones) mask: same outputs, faster.

    A HookedTransformer given a mask combines it with the causal mask in every layer (3 % of a
    SmolLM2 forward at batch 1, bit-identical outputs without it). Only where it would not make
    one up: with a tokenizer that pads on the left it infers a mask from the pad token, which
    may also be a real token of the text (as our encoder wrapper does for every model).
    """
    from transformer_lens import HookedTransformer

    side = getattr(getattr(model, "tokenizer", None), "padding_side", None)
    return isinstance(model, HookedTransformer) and side != "left"


def _forward_kwargs(model: Any, stop_at_layer: int | None) -> dict[str, Any]:
    if stop_at_layer is None:
        return {}
    if "stop_at_layer" not in inspect.signature(model.forward).parameters:
        return {}
    return {"stop_at_layer": stop_at_layer}


def device_of(model: Any) -> torch.device:
    """The device of the model's parameters (CPU for a model without any)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


__all__ = ["HookFn", "Pass", "Probe", "Step", "device_of", "installed", "run"]
