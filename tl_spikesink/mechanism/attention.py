"""Sink geometry and short-range bias (links 4 and 5).

Near-identical spike-token inputs give near-identical keys: the share of their (uncentered) key
energy in the top singular direction, per head, against an equal-size sample of other tokens.
Sink heads give the first-token key a large pre-softmax logit gap over the other keys. With the
sink key removed, sink heads are expected to attend more locally (distances from the scan).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float

from tl_spikesink.anatomy import block_hook
from tl_spikesink.mechanism.captures import (
    DEFAULT_MAX_TOKENS,
    HEADS,
    Texts,
    as_corpus,
    capture,
    group_means,
    head_mask,
    nanmean,
    scan_of,
    spike_mask,
    spike_site,
)
from tl_spikesink.results import Result

# ---------------------------------------------------------------- 4. sink geometry


@dataclass(frozen=True, repr=False)
class SinkGeometry(Result):
    """Keys of spike tokens and the logit advantage of the first-token key, per head."""

    sink_heads: tuple[tuple[int, int], ...]
    """Sink heads of the scan."""
    key_share_spike: Float[torch.Tensor, "layer head"]
    """Share of spike tokens' key energy (uncentered) in their top singular direction."""
    key_share_other: Float[torch.Tensor, "layer head"]
    """The same for an equal number of other tokens (seeded sample)."""
    logit_gap: Float[torch.Tensor, "layer head"]
    """Mean over queries i ≥ 1 of score(i, 0) − mean_{1≤j≤i} score(i, j) (pre-softmax)."""

    @property
    def _is_sink(self) -> torch.Tensor:
        return head_mask(self.sink_heads, self.logit_gap)

    sink_gap, other_gap = group_means("logit_gap", "_is_sink", HEADS)


def sink_geometry(
    model: Any,
    texts: Texts,
    scan: Any = None,
    *,
    seed: int = 0,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> SinkGeometry:
    """Key concentration of spike tokens and per-head first-key logit gaps.

    Keys are ``attn.hook_k`` (before rotary; grouped key heads repeated to query heads); logit gaps
    use ``attn.hook_attn_scores`` (after rotary and scaling), reduced per batch.

    Raises:
        SpikeSinkError: the scan found no spike token.
    """
    corpus = as_corpus(model, texts, max_tokens)
    scan = scan_of(model, corpus, scan)
    site = spike_site(scan)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    gap_sum = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    gap_count = torch.zeros(n_layers, n_heads, dtype=torch.float64)

    def gap_reducer(layer: int) -> Callable:
        def fn(scores: torch.Tensor, mask: torch.Tensor) -> None:
            # Right padding: column 0 is every sequence's first token; masked scores are -inf.
            q = scores.shape[-2]
            causal = torch.ones(q, q, dtype=torch.bool, device=scores.device).tril()
            causal[:, 0] = False
            valid = causal[None, None] & mask[:, None, None, :] & mask[:, None, :, None]
            n = valid.sum(-1)
            rest = torch.where(valid, scores, 0.0).sum(-1) / n.clamp(min=1)
            gap = scores[..., 0] - rest
            ok = n > 0
            gap_sum[layer] += torch.where(ok, gap, 0.0).sum((0, 2)).double().cpu()
            gap_count[layer] += ok.sum((0, 2)).double().cpu()

        return fn

    reducers = [(block_hook(i, "attn.hook_attn_scores"), gap_reducer(i)) for i in range(n_layers)]
    names = [block_hook(i, "attn.hook_k") for i in range(n_layers)] + [
        block_hook(site.layer, "hook_resid_post")
    ]
    cap = capture(model, corpus, names, reducers)
    spike = spike_mask(cap, site)
    gen = torch.Generator().manual_seed(seed)
    others = (~spike).nonzero()[:, 0]
    others = others[torch.randperm(len(others), generator=gen)[: max(int(spike.sum()), 2)]]
    share_s = torch.full((n_layers, n_heads), float("nan"))
    share_o = torch.full((n_layers, n_heads), float("nan"))
    for layer in range(n_layers):
        k = cap.acts[block_hook(layer, "attn.hook_k")]  # [token, kv_head, d_head]
        k = k.repeat_interleave(n_heads // k.shape[1], dim=1)
        share_s[layer] = _top_share(k[spike])
        share_o[layer] = _top_share(k[others])
    return SinkGeometry(
        sink_heads=tuple(scan.sinks.sink_heads),
        key_share_spike=share_s,
        key_share_other=share_o,
        logit_gap=(gap_sum / gap_count.clamp(min=1)).float(),
    )


def _top_share(k: torch.Tensor) -> torch.Tensor:
    """Per head, σ₁² / Σσ² of the token × d_head key matrix (NaN with fewer than two tokens)."""
    if k.shape[0] < 2:
        return torch.full((k.shape[1],), float("nan"))
    sv = torch.linalg.svdvals(k.transpose(0, 1).double())  # [head, min(token, d_head)]
    e = sv.pow(2)
    return (e[:, 0] / e.sum(-1).clamp(min=1e-30)).float()


# ---------------------------------------------------------------- 5. short-range bias


@dataclass(frozen=True, repr=False)
class ShortRange(Result):
    """Attention distance of sink heads vs other heads, from the scan."""

    sink_heads: tuple[tuple[int, int], ...]
    distance: Float[torch.Tensor, "layer head"]
    distance_without_sink: Float[torch.Tensor, "layer head"]

    def _split(self, x: torch.Tensor) -> tuple[float, float]:
        m = head_mask(self.sink_heads, x)
        return nanmean(x[m]), nanmean(x[~m])

    @property
    def sink_distance_without_sink(self) -> float:
        """Mean distance without the sink key, sink heads."""
        return self._split(self.distance_without_sink)[0]

    @property
    def other_distance_without_sink(self) -> float:
        """Mean distance without the sink key, other heads."""
        return self._split(self.distance_without_sink)[1]


def short_range(scan: Any) -> ShortRange:
    """Sink heads' attention distance with and without the sink key vs other heads'."""
    s = scan.sinks
    # A head that sends (almost) all attention to the sink key has no distance without it.
    without = s.attention_distance_without_sink.where(s.distance_nosink_count > 0, float("nan"))
    return ShortRange(tuple(s.sink_heads), s.attention_distance.float(), without.float())
