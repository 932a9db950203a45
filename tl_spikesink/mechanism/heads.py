"""Head decomposition (link 6; Thm 2.1 of the seed paper, as we read it).

The attention output of block l is a sum over heads, attn_out[i] = Σ_h o_h[i] + b_O with
o_h[i] = Σ_j A_h[i, j] v_h[j] W_O[h]. Splitting the keys j into *sink tokens* S (every sequence's
first token, plus the spike tokens when the scan found a spike) and the rest splits each head's
output into what flows from the sink tokens' values and what flows from the others. A sink head
puts most of its attention on S; when the sink tokens' values v_h[j] W_O[h] are small, that head
writes little at ordinary tokens: it parks attention and is close to a no-op.

Everything is measured at *ordinary queries*: real tokens that are not in S. With
``fold_value_biases`` (how :func:`tl_spikesink.load` converts) the value bias lives in b_O; since
Σ_j A_ij = 1 it adds the same vector whatever a head attends to, so it belongs to neither part.
On sandwich-norm models (Gemma 3) the decomposition is of the attention output before ``ln1_post``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float

from tl_spikesink.anatomy import Anatomy, block_hook, hook_name
from tl_spikesink.mechanism.captures import (
    DEFAULT_MAX_TOKENS,
    HEADS,
    Texts,
    as_corpus,
    capture,
    group_mean,
    group_means,
    head_mask,
    scan_of,
    spike_mask,
    spike_site,
)
from tl_spikesink.probes.engine import HookFn, Probe, Step
from tl_spikesink.results import Result


@dataclass(frozen=True, repr=False)
class HeadDecomposition(Result):
    """Per head, what it writes at ordinary tokens and how much of it comes from sink tokens."""

    sink_heads: tuple[tuple[int, int], ...]
    """Sink heads of the scan."""
    spike_layer: int | None
    """Layer whose spike tokens join S; None when S holds only each sequence's first token."""
    n_sink_tokens: int
    """Tokens in S over the corpus."""
    n_queries: int
    """Ordinary queries measured (real tokens not in S)."""
    sink_attention: Float[torch.Tensor, "layer head"]
    """Mean attention Σ_{j∈S} A_ij that an ordinary query i gives to the sink tokens."""
    sink_part: Float[torch.Tensor, "layer head"]
    """Mean ‖Σ_{j∈S} A_ij v_j W_O‖: what the head writes from the sink tokens' values."""
    rest_part: Float[torch.Tensor, "layer head"]
    """Mean ‖Σ_{j∉S} A_ij v_j W_O‖: what it writes from the other tokens' values."""
    head_norm: Float[torch.Tensor, "layer head"]
    """Mean ‖o_h[i]‖, the whole head output (sink part plus rest, as vectors)."""
    layer_norm: Float[torch.Tensor, " layer"]
    """Mean ‖Σ_h o_h[i]‖, the layer's attention output without b_O."""
    sink_value_norm: Float[torch.Tensor, "layer head"]
    """Mean ‖v_j W_O‖ over sink tokens j: the value a head would copy from S."""
    other_value_norm: Float[torch.Tensor, "layer head"]
    """Mean ‖v_j W_O‖ over the other real tokens."""

    @property
    def is_sink(self) -> torch.Tensor:
        """[layer, head] mask of the sink heads."""
        return head_mask(self.sink_heads, self.head_norm)

    @property
    def share(self) -> Float[torch.Tensor, "layer head"]:
        """Each head's share of its layer's writing, ‖o_h‖ / Σ_h' ‖o_h'‖ (NaN if none writes)."""
        total = self.head_norm.sum(-1, keepdim=True)
        return torch.where(total > 0, self.head_norm / total.clamp(min=1e-30), float("nan"))

    @property
    def relative_norm(self) -> Float[torch.Tensor, "layer head"]:
        """‖o_h‖ over the mean head of its layer: below 1 for a head that writes less."""
        return self.share * self.head_norm.shape[-1]

    @property
    def value_ratio(self) -> Float[torch.Tensor, "layer head"]:
        """‖v W_O‖ of sink tokens over that of other tokens, per head."""
        o = self.other_value_norm
        return torch.where(o > 0, self.sink_value_norm / o.clamp(min=1e-30), float("nan"))

    sink_relative_norm, other_relative_norm = group_means("relative_norm", "is_sink", HEADS)
    sink_value_ratio = group_mean(
        "value_ratio",
        "is_sink",
        True,
        "Mean `value_ratio` of the sink heads (below 1: the sink tokens' values are small).",
    )
    sink_heads_sink_attention = group_mean(
        "sink_attention",
        "is_sink",
        True,
        "Mean attention that sink heads give S at ordinary queries.",
    )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (tensors as nested lists)."""
        from tl_spikesink.views.format import json_clean

        return json_clean(dict(self.__dict__))

    def __str__(self) -> str:
        return (
            f"head decomposition: {self.n_queries} ordinary queries, {self.n_sink_tokens} sink "
            f"tokens, {len(self.sink_heads)} sink heads\n"
            f"  ‖head output‖ / layer mean: sink heads {self.sink_relative_norm:.3g}, "
            f"other heads {self.other_relative_norm:.3g}\n"
            f"  sink heads: attention on S {self.sink_heads_sink_attention:.3g}, "
            f"‖v W_O‖ sink / other tokens {self.sink_value_ratio:.3g}"
        )


class _HeadFlow(Probe):
    """Per head, the output at ordinary queries split into the part from sink tokens S and the rest.

    S is every sequence's first token plus, when a scan found spikes, the spike tokens of a first
    pass (`spike_rows`, one flag per real token in batch order).
    """

    def __init__(self, model: Any, n_layers: int, n_heads: int, spike_rows: Any):
        self.n_heads, self.spike_rows, self.offset = n_heads, spike_rows, 0
        self.w_o = [model.blocks[i].attn.W_O.detach().float() for i in range(n_layers)]
        self.sums = {
            k: torch.zeros(n_layers, n_heads, dtype=torch.float64)
            for k in ("attn", "sink", "rest", "head", "value_s", "value_o")
        }
        self.layer_sum = torch.zeros(n_layers, dtype=torch.float64)
        self.counts = {"query": 0, "sink": 0, "other": 0}
        self.n_layers = n_layers

    def hooks(self) -> list[tuple[str, HookFn]]:
        return [
            h
            for i in range(self.n_layers)
            for h in (
                (block_hook(i, "attn.hook_v"), self._keep(i, "v")),
                (hook_name("pattern", i), self._keep(i, "pattern")),
            )
        ]

    def start_batch(self, step: Step) -> None:
        mask = step.mask
        sink = torch.zeros_like(mask)
        sink[:, 0] = mask[:, 0]
        if self.spike_rows is not None:
            n = int(mask.sum())
            sink[mask] |= self.spike_rows[self.offset : self.offset + n].to(mask.device)
            self.offset += n
        self.sink, self.other = sink, mask & ~sink
        self.counts["query"] += int(self.other.sum())
        self.counts["sink"] += int(sink.sum())
        self.counts["other"] += int(self.other.sum())
        self.pending: list[dict[str, torch.Tensor]] = [{} for _ in range(self.n_layers)]

    def _keep(self, layer: int, key: str) -> HookFn:
        # hook_v and hook_pattern fire in either order depending on the model class.
        def hook(act: torch.Tensor, hook: Any) -> None:
            pending = self.pending[layer]
            pending[key] = act.detach().float()
            if len(pending) == 2:
                self._reduce(layer, pending.pop("v"), pending.pop("pattern"))

        return hook

    def _reduce(self, layer: int, v: torch.Tensor, a: torch.Tensor) -> None:
        sums, sink, other, w_o = self.sums, self.sink, self.other, self.w_o[layer]
        v = v.repeat_interleave(self.n_heads // v.shape[2], dim=2)  # grouped values per head
        a_sink = a * sink[:, None, None, :]
        # Mix values in d_head first and project once: far cheaper than mixing d_model vectors.
        z_all = torch.einsum("bhqk,bkhd->bqhd", a, v)[other]  # [query, head, d_head]
        z_sink = torch.einsum("bhqk,bkhd->bqhd", a_sink, v)[other]
        o_all = torch.einsum("nhd,hdm->nhm", z_all, w_o)
        o_sink = torch.einsum("nhd,hdm->nhm", z_sink, w_o)
        sums["head"][layer] += o_all.norm(dim=-1).sum(0).double().cpu()
        sums["sink"][layer] += o_sink.norm(dim=-1).sum(0).double().cpu()
        sums["rest"][layer] += (o_all - o_sink).norm(dim=-1).sum(0).double().cpu()
        self.layer_sum[layer] += o_all.sum(1).norm(dim=-1).sum().double().cpu()
        sums["attn"][layer] += a_sink.sum(-1).transpose(1, 2)[other].sum(0).double().cpu()
        written = torch.einsum("bkhd,hdm->bkhm", v, w_o).norm(dim=-1)  # [b, k, head]
        sums["value_s"][layer] += written[sink].sum(0).double().cpu()
        sums["value_o"][layer] += written[other].sum(0).double().cpu()


def head_decomposition(
    model: Any,
    texts: Texts | None = None,
    scan: Any = None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = 8,
) -> HeadDecomposition:
    """Split every head's output at ordinary tokens into the part from sink tokens and the rest.

    Args:
        model: a TransformerLens model; only read (hooks removed, parameters untouched).
        texts: strings or a :class:`~tl_spikesink.Corpus`; None reads the default offline corpus.
        scan: the model's scan (sink heads, spike site); run on `texts` when None.
        max_tokens: tokens read from raw texts.
        batch_size: sequences per forward pass.

    Returns:
        A :class:`HeadDecomposition`. One pass when the scan found no spike (S is the first
        tokens), two otherwise (the first finds the spike tokens, which exist only after the
        spike layer, i.e. after earlier layers' attention has run).
    """
    from tl_spikesink.corpus import default_texts

    corpus = as_corpus(model, default_texts() if texts is None else texts, max_tokens)
    scan = scan_of(model, corpus, scan)
    anatomy = Anatomy.of(model)
    n_layers, n_heads = anatomy.n_layers, anatomy.n_heads
    site = spike_site(scan) if scan.spikes.massive else None
    spike_rows = None
    if site is not None:
        first = capture(model, corpus, [hook_name("resid_post", site.layer)], batch_size=batch_size)
        spike_rows = spike_mask(first, site)

    probe = _HeadFlow(model, n_layers, n_heads, spike_rows)
    capture(model, corpus, [], batch_size=batch_size, probes=[probe])
    sums, layer_sum, counts = probe.sums, probe.layer_sum, probe.counts

    def mean(x: torch.Tensor, n: int) -> torch.Tensor:
        return (x / n).float() if n else torch.full_like(x, float("nan")).float()

    return HeadDecomposition(
        sink_heads=tuple(scan.sinks.sink_heads),
        spike_layer=None if site is None else site.layer,
        n_sink_tokens=counts["sink"],
        n_queries=counts["query"],
        sink_attention=mean(sums["attn"], counts["query"]),
        sink_part=mean(sums["sink"], counts["query"]),
        rest_part=mean(sums["rest"], counts["query"]),
        head_norm=mean(sums["head"], counts["query"]),
        layer_norm=mean(layer_sum, counts["query"]),
        sink_value_norm=mean(sums["value_s"], counts["sink"]),
        other_value_norm=mean(sums["value_o"], counts["other"]),
    )
