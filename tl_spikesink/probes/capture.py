"""Capture: keep chosen activations at real tokens only, flattened to rows [token, ...].

For the analyses that need the activations themselves (the mechanism checks, the widgets) rather
than a streaming reduction. Memory grows with the corpus, so those analyses read a few thousand
tokens; the scan never captures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int

from tl_spikesink.probes.engine import HookFn, Probe, Step


@dataclass(frozen=True)
class Captured:
    """Activations of the real tokens of a corpus, flattened to rows [token, ...]."""

    acts: dict[str, torch.Tensor]
    """Hook name → [token, ...] (float32, CPU), in batch order."""
    position: Int[torch.Tensor, " token"]
    """Column of each row in its padded batch (= position under right padding)."""
    token_id: Int[torch.Tensor, " token"]
    sequence: Int[torch.Tensor, " token"]
    """Index of each row's sequence, counting sequences in batch order."""


class Capture(Probe):
    """Keep the activations at `names` at every real token.

    TransformerLens calls a norm's hooks once each for the query, key and value inputs; without
    split inputs the three are the same tensor, so only the first call per batch is kept.
    """

    def __init__(self, names: Sequence[str]):
        self.names = list(dict.fromkeys(names))
        self.store: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        self.positions: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []
        self.seqs: list[torch.Tensor] = []
        self.n_sequences = 0

    def hooks(self) -> list[tuple[str, HookFn]]:
        return [(n, self._keep) for n in self.names]

    def start_batch(self, step: Step) -> None:
        self.mask, self.seen = step.mask, set()
        batch = step.batch
        pos = torch.arange(batch.tokens.shape[1]).expand_as(batch.tokens)
        self.positions.append(pos[batch.mask])
        self.ids.append(batch.tokens[batch.mask])
        rows = torch.arange(self.n_sequences, self.n_sequences + len(batch.lengths))
        self.seqs.append(rows[:, None].expand_as(batch.tokens)[batch.mask])
        self.n_sequences += len(batch.lengths)

    def _keep(self, act: torch.Tensor, hook: Any) -> None:
        if hook.name in self.seen:
            return
        self.seen.add(hook.name)
        self.store[hook.name].append(act.detach().float()[self.mask].cpu())

    def result(self) -> Captured:
        """Everything kept, concatenated."""
        empty = torch.zeros(0, dtype=torch.long)
        return Captured(
            {n: torch.cat(v) for n, v in self.store.items() if v},
            torch.cat(self.positions) if self.positions else empty,
            torch.cat(self.ids) if self.ids else empty,
            torch.cat(self.seqs) if self.seqs else empty,
        )


class Reduce(Probe):
    """Call fn(activation, mask) at each hook, for activations too big to keep (attention scores)."""

    def __init__(self, fns: Sequence[tuple[str, Callable[[torch.Tensor, torch.Tensor], None]]]):
        self.fns = list(fns)

    def hooks(self) -> list[tuple[str, HookFn]]:
        return [(name, self._wrap(fn)) for name, fn in self.fns]

    def start_batch(self, step: Step) -> None:
        self.mask = step.mask

    def _wrap(self, fn: Callable[[torch.Tensor, torch.Tensor], None]) -> HookFn:
        def hook(act: torch.Tensor, hook: Any) -> None:
            fn(act.detach().float(), self.mask)

        return hook


__all__ = ["Capture", "Captured", "Reduce"]
