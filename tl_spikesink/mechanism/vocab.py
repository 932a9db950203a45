"""Which vocabulary items spike at the first position, and after a first token (paper Table 2).

Every vocabulary item t is read twice, through the engine, as one-token sequences ``[t]``
(position 0) and as two-token sequences ``[f, t]`` (position 1), with f a fixed first token: the
model's BOS when it prepends one (so position 1 is where text starts), else the first token of
"The" (SmolLM2 prepends nothing). The sequences are built as :class:`~tl_spikesink.corpus.Chunk`
objects straight from token ids and batched (512 per forward by default); every forward stops
after the last layer read (``stop_at_layer``), so the blocks after it, the final norm and the
unembedding never run.

Criterion (exact): with the spike site of a scan (spike layer L, spike channels C) and the scan's
massive cut c_ℓ = max(abs_threshold, rel_threshold × median |resid_post| of layer ℓ), a token is
a *spike token* at a position when, for some plateau layer ℓ in L … L + plateau_layers − 1
(never at or past the first step-down block), max over c ∈ C of |resid_post_ℓ[position, c]| > c_ℓ.
The score kept per token is max over those layers of that maximum divided by c_ℓ, so score > 1
is the criterion. The cut is the scan's, measured on ordinary text, so a token is a spike token
when it reaches the magnitude that marks massive activations in running text.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from jaxtyping import Float

from tl_spikesink.anatomy import block_hook
from tl_spikesink.corpus import Chunk, Corpus
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.mechanism.captures import DEFAULT_MAX_TOKENS, as_corpus, scan_of, spike_site
from tl_spikesink.probes.engine import HookFn, Probe, Step, run
from tl_spikesink.results import Result

DEFAULT_BATCH = 512
DEFAULT_PLATEAU_LAYERS = 2
_SHOWN = 10


@dataclass(frozen=True, repr=False)
class VocabSpikes(Result):
    """Spike tokens among all vocabulary items, at position 0 and at position 1 (Table 2)."""

    model: str
    token_ids: tuple[int, ...] | None
    """The items probed; None means every id 0 … vocab_size − 1."""
    vocab_size: int
    first_token: int
    """The fixed token f of the position-1 sequences [f, t]."""
    first_token_text: str
    first_token_rule: str
    """Why f: "the model's BOS" or "first token of 'The' (the model prepends no BOS)"."""
    layers: tuple[int, ...]
    """Plateau layers read."""
    channels: tuple[int, ...]
    """Spike channels read."""
    cuts: tuple[float, ...]
    """The scan's massive cut at each of `layers`."""
    score_position0: Float[torch.Tensor, " item"]
    """max over `layers` of max_c |resid_post[0, c]| / cut: > 1 is a spike token."""
    score_position1: Float[torch.Tensor, " item"]
    """The same at position 1 of [f, t]."""
    embedding_norm: Float[torch.Tensor, " item"]
    """‖W_E[t]‖ of each item."""
    exception_strings: tuple[str, ...]
    """Decoded strings of the exceptions, in the order of :attr:`exceptions`."""
    runtime_s: float

    @property
    def ids(self) -> torch.Tensor:
        """Token id of each probed item."""
        if self.token_ids is None:
            return torch.arange(self.vocab_size)
        return torch.tensor(self.token_ids, dtype=torch.long)

    @property
    def n_items(self) -> int:
        """Items probed (the vocabulary size unless `token_ids` was given)."""
        return int(self.score_position0.numel())

    @property
    def spike_position0(self) -> torch.Tensor:
        """Which items are spike tokens at position 0."""
        return self.score_position0 > 1

    @property
    def spike_position1(self) -> torch.Tensor:
        """Which items are spike tokens at position 1 (after the first token)."""
        return self.score_position1 > 1

    @property
    def count_position0(self) -> int:
        """Spike tokens at position 0 (Table 2's count)."""
        return int(self.spike_position0.sum())

    @property
    def count_position1(self) -> int:
        """Spike tokens at position 1."""
        return int(self.spike_position1.sum())

    @property
    def share_position0(self) -> float:
        """Share of the items that spike at position 0 (Table 2's share)."""
        return self.count_position0 / self.n_items if self.n_items else math.nan

    @property
    def share_position1(self) -> float:
        """Share of the items that spike at position 1."""
        return self.count_position1 / self.n_items if self.n_items else math.nan

    @property
    def exceptions(self) -> tuple[int, ...]:
        """Token ids that do not spike at position 0, lowest score first."""
        idx = (~self.spike_position0).nonzero()[:, 0]
        idx = idx[self.score_position0[idx].argsort()]
        return tuple(int(i) for i in self.ids[idx])

    @property
    def mean_embedding_norm(self) -> float:
        """Mean ‖W_E[t]‖ over the probed items, to compare the exceptions with."""
        return float(self.embedding_norm.double().mean()) if self.n_items else math.nan

    @property
    def exception_embedding_norm(self) -> float:
        """Mean ‖W_E[t]‖ over the exceptions (NaN when there is none)."""
        mask = ~self.spike_position0
        return float(self.embedding_norm[mask].double().mean()) if bool(mask.any()) else math.nan

    def _row(self, token_id: int) -> int:
        if self.token_ids is None:
            return token_id
        return self.token_ids.index(token_id)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN as null), with every exception and its embedding norm."""
        from tl_spikesink.views.format import json_clean

        exceptions = []
        for t, text in zip(self.exceptions, self.exception_strings, strict=True):
            i = self._row(t)
            exceptions.append(
                {
                    "token_id": t,
                    "token": text,
                    "score": float(self.score_position0[i]),
                    "embedding_norm": float(self.embedding_norm[i]),
                }
            )
        return json_clean(
            {
                "model": self.model,
                "vocab": self.n_items,
                "vocab_size": self.vocab_size,
                "first_token": self.first_token,
                "first_token_text": self.first_token_text,
                "first_token_rule": self.first_token_rule,
                "layers": list(self.layers),
                "channels": list(self.channels),
                "cuts": list(self.cuts),
                "spike_tokens_position0": self.count_position0,
                "share_position0": self.share_position0,
                "spike_tokens_position1": self.count_position1,
                "share_position1": self.share_position1,
                "mean_embedding_norm": self.mean_embedding_norm,
                "exception_embedding_norm": self.exception_embedding_norm,
                "exceptions": exceptions,
                "runtime_s": self.runtime_s,
            }
        )

    def __str__(self) -> str:
        from tl_spikesink.views.format import layer_list, num, pct

        shown = ", ".join(repr(s) for s in self.exception_strings[:_SHOWN])
        more = len(self.exceptions) - _SHOWN
        return "\n".join(
            [
                f"vocabulary probe of {self.model}: {self.n_items} items, spike channels "
                f"{layer_list(self.channels)} at layers {layer_list(self.layers)}",
                f"  position 0: {self.count_position0} spike tokens ({pct(self.share_position0, 2)})",
                f"  position 1 after {self.first_token_text!r} ({self.first_token_rule}): "
                f"{self.count_position1} ({pct(self.share_position1, 2)})",
                f"  exceptions at position 0: {len(self.exceptions)}, mean ‖W_E‖ "
                f"{num(self.exception_embedding_norm)} vs {num(self.mean_embedding_norm)} overall"
                + (f": {shown}" + (f" and {more} more" if more > 0 else "") if shown else ""),
                f"  runtime {self.runtime_s:.1f} s",
            ]
        )


class _PeakProbe(Probe):
    """Per sequence, max over layers of max_c |resid_post[last, c]| / cut, at its last token."""

    def __init__(
        self, layers: Sequence[int], cuts: Sequence[float], channels: Sequence[int], n: int
    ):
        self.layers, self.cuts, self.channels = list(layers), list(cuts), list(channels)
        self.score = torch.zeros(n)

    def hooks(self) -> list[tuple[str, HookFn]]:
        return [
            (block_hook(layer, "hook_resid_post"), self._hook(cut))
            for layer, cut in zip(self.layers, self.cuts, strict=True)
        ]

    def start_batch(self, step: Step) -> None:
        self.rows = step.batch.text_index
        self.last = (step.batch.lengths - 1).to(step.tokens.device)

    def _hook(self, cut: float) -> HookFn:
        def hook(act: torch.Tensor, hook: Any) -> None:
            at = act[torch.arange(act.shape[0], device=act.device), self.last]
            peak = at[:, self.channels].abs().amax(-1).float().cpu() / cut
            self.score[self.rows] = torch.maximum(self.score[self.rows], peak)

        return hook


def _ids_corpus(name: str, sequences: list[tuple[int, ...]]) -> Corpus:
    digest = hashlib.sha256(repr(sequences[:4] + sequences[-4:]).encode())
    digest.update(str(len(sequences)).encode())
    return Corpus(
        name=name,
        n_texts=len(sequences),
        chunks=tuple(Chunk(i, 0, s) for i, s in enumerate(sequences)),
        prepend_bos=False,
        max_seq_len=max(len(s) for s in sequences),
        sha256=digest.hexdigest(),
    )


def first_token_of(model: Any, first_token: int | str | None = None) -> tuple[int, str]:
    """The fixed first token f of the position-1 sequences, and why it was chosen."""
    tok = getattr(model, "tokenizer", None)
    if isinstance(first_token, int):
        return first_token, "given"
    if isinstance(first_token, str):
        return int(
            model.to_tokens(first_token, prepend_bos=False)[0, 0]
        ), f"first token of {first_token!r}"
    bos = getattr(tok, "bos_token_id", None)
    if bool(getattr(model.cfg, "default_prepend_bos", True)) and bos is not None:
        return int(bos), "the model's BOS"
    if tok is None:
        return 0, "token 0 (the model has no tokenizer)"
    return (
        int(model.to_tokens("The", prepend_bos=False)[0, 0]),
        "first token of 'The' (the model prepends no BOS)",
    )


def token_strings(model: Any, ids: Sequence[int]) -> list[str]:
    """Each id decoded on its own (``<id>`` when the model has no tokenizer)."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return [f"<{i}>" for i in ids]
    return list(tok.batch_decode([[int(i)] for i in ids]))


def plateau_layers(site: Any, n_layers: int, n: int = DEFAULT_PLATEAU_LAYERS) -> tuple[int, ...]:
    """The spike layer and the next `n` − 1, stopping before the first step-down block."""
    end = min(site.layer + max(int(n), 1), n_layers)
    if site.step_down is not None:
        end = min(end, max(site.step_down, site.layer + 1))
    return tuple(range(site.layer, end))


def vocab_probe(
    model: Any,
    scan: Any = None,
    *,
    texts: Any = None,
    token_ids: Sequence[int] | None = None,
    first_token: int | str | None = None,
    batch_size: int = DEFAULT_BATCH,
    plateau: int = DEFAULT_PLATEAU_LAYERS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    progress: bool = True,
) -> VocabSpikes:
    """Put every vocabulary item at position 0, and at position 1 after `first_token`.

    Args:
        model: a causal TransformerLens model; only read.
        scan: the model's scan (spike site, cuts); run on `texts` when None.
        texts: texts for that scan (default: the default offline corpus).
        token_ids: probe only these ids (default: the whole vocabulary, ``cfg.d_vocab``).
        first_token: f of the [f, t] sequences: an id, a string (its first token), or None for
            the model's BOS if it prepends one, else the first token of "The".
        batch_size: sequences per forward.
        plateau: plateau layers read (from the spike layer on).
        max_tokens: tokens of `texts` the scan reads when it has to run.
        progress: show a progress bar per position.

    Raises:
        SpikeSinkError: the scan found no spike, or the spike site has no step-up block.
    """
    from tl_spikesink.corpus import default_texts

    start = time.perf_counter()
    if scan is None:
        scan = scan_of(model, as_corpus(model, texts or default_texts(), max_tokens), None)
    site = spike_site(scan)
    n_layers = int(model.cfg.n_layers)
    layers = plateau_layers(site, n_layers, plateau)
    cut_all = scan.spikes.cut
    cuts = tuple(float(cut_all[layer]) for layer in layers)
    vocab_size = int(model.cfg.d_vocab)
    ids = list(range(vocab_size)) if token_ids is None else [int(t) for t in token_ids]
    if not ids:
        raise SpikeSinkError("token_ids is empty; pass at least one id (or None for all)")
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise SpikeSinkError(f"token ids must lie in 0..{vocab_size - 1}")
    f, rule = first_token_of(model, first_token)
    scores = []
    for position, sequences in (
        (0, [(t,) for t in ids]),
        (1, [(f, t) for t in ids]),
    ):
        probe = _PeakProbe(layers, cuts, site.channels, len(ids))
        run(
            model,
            _ids_corpus(f"vocabulary at position {position}", sequences),
            [probe],
            batch_size=batch_size,
            padding_side="right",
            stop_at_layer=layers[-1] + 1,
            progress=progress,
            desc=f"vocabulary probe, position {position}",
        )
        scores.append(probe.score)
    with torch.inference_mode():
        norms = model.W_E.detach().float().cpu()[torch.tensor(ids)].norm(dim=-1)
    # Exceptions are decoded here so the result needs no tokenizer later.
    result = VocabSpikes(
        model=str(getattr(model.cfg, "model_name", type(model).__name__)),
        token_ids=None if token_ids is None else tuple(ids),
        vocab_size=vocab_size,
        first_token=f,
        first_token_text=token_strings(model, [f])[0],
        first_token_rule=rule,
        layers=layers,
        channels=tuple(site.channels),
        cuts=cuts,
        score_position0=scores[0],
        score_position1=scores[1],
        embedding_norm=norms,
        exception_strings=(),
        runtime_s=0.0,
    )
    strings = tuple(token_strings(model, result.exceptions))
    return replace(result, exception_strings=strings, runtime_s=time.perf_counter() - start)


__all__ = ["VocabSpikes", "first_token_of", "plateau_layers", "token_strings", "vocab_probe"]
