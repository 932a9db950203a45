"""Near-constant representations and the RMSNorm bound (link 3).

Reconstruction (docs/definitions.md): RMSNorm fixes ‖x̂/γ‖₂ = √d, so |x̂_i| ≤ √d·|γ_i|; once
a spike dominates the residual, x̂ puts nearly all its energy in the spike channels and different
spike tokens normalize to nearly the same vector. Measured on ``ln1.hook_normalized`` of the block
after the spike layer (the attention input that makes sinks; taken before γ, so the bound reads
max_i |x̂_i| ≤ √d), and on resid_post pairwise cosines at every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float

from tl_spikesink.anatomy import block_hook
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.mechanism.captures import (
    DEFAULT_MAX_TOKENS,
    TOKENS,
    Captured,
    SpikeSite,
    Texts,
    as_corpus,
    capture,
    group_mean,
    group_means,
    mean_pairwise_cosine,
    require_rms,
    scan_of,
    spike_mask,
    spike_site,
)
from tl_spikesink.results import Result

# ---------------------------------------------------------------- 3. representations and RMSNorm


@dataclass(frozen=True, repr=False)
class Representations(Result):
    """How alike spike tokens become, before and after normalization."""

    layer: int
    """Spike layer; the normalized vectors are ``blocks.{layer+1}.ln1.hook_normalized``."""
    channels: tuple[int, ...]
    resid_cosine: Float[torch.Tensor, " layer"]
    """Mean pairwise cosine of spike tokens' resid_post at every layer (before and after)."""
    other_resid_cosine: Float[torch.Tensor, " layer"]
    """The same for an equal number of other tokens (seeded sample)."""
    resid_pre_cosine: float
    """Mean pairwise cosine of spike tokens' residual entering the spike layer."""
    normalized_cosine: float
    """Mean pairwise cosine of spike tokens' γ ⊙ x̂ after the spike layer (equal to the residual's
    cosine when the norm weight is folded, since cosine ignores the 1/rms scale)."""
    other_normalized_cosine: float
    bound_ratio: Float[torch.Tensor, " token"]
    """max_i |x̂_i| / √d per token, x̂ taken before γ; the RMSNorm bound says ≤ 1."""
    channel_energy: Float[torch.Tensor, " token"]
    """Share of ‖x̂‖² in the spike channels."""
    is_spike: Bool[torch.Tensor, " token"]

    @property
    def bound_holds(self) -> bool:
        """Whether |x̂_i| ≤ √d·|γ_i| held at every token (float tolerance 1e-4)."""
        return bool((self.bound_ratio <= 1 + 1e-4).all())

    spike_energy, other_energy = group_means(
        "channel_energy", "is_spike", TOKENS, "spike-channel energy share"
    )
    spike_bound_ratio = group_mean(
        "bound_ratio",
        "is_spike",
        True,
        "Mean max_i |x̂_i| / √d of spike tokens (near 1: the spike saturates the bound).",
    )


def representations(
    model: Any,
    texts: Texts,
    scan: Any = None,
    *,
    seed: int = 0,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> Representations:
    """Pairwise cosines of spike tokens through depth, and the RMSNorm bound after the spike layer.

    Raises:
        SpikeSinkError: the model has no RMSNorm, the scan found no spike, or the spike layer is
            the last block.
    """
    require_rms(model, "the RMSNorm bound")
    corpus = as_corpus(model, texts, max_tokens)
    site = spike_site(scan_of(model, corpus, scan))
    cap = capture(model, corpus, representation_names(model, site))
    return representations_from(model, cap, site, seed)


def representation_names(model: Any, site: SpikeSite) -> list[str]:
    if site.layer + 1 >= model.cfg.n_layers:
        raise SpikeSinkError(
            f"the spike layer {site.layer} is the last block; no normalized input follows it"
        )
    return [
        *(block_hook(i, "hook_resid_post") for i in range(model.cfg.n_layers)),
        block_hook(site.layer, "hook_resid_pre"),
        block_hook(site.layer + 1, "ln1.hook_normalized"),
    ]


def representations_from(model: Any, cap: Captured, site: SpikeSite, seed: int) -> Representations:
    require_rms(model, "the RMSNorm bound")
    spike = spike_mask(cap, site)
    n_spike = int(spike.sum())
    gen = torch.Generator().manual_seed(seed)
    others = (~spike).nonzero()[:, 0]
    others = others[torch.randperm(len(others), generator=gen)[: max(n_spike, 2)]]
    n_layers = int(model.cfg.n_layers)
    resid = [cap.acts[block_hook(i, "hook_resid_post")] for i in range(n_layers)]
    x = cap.acts[block_hook(site.layer + 1, "ln1.hook_normalized")]
    # Cosine ignores the 1/rms scale, so only γ can make x̂'s cosines differ from the residual's;
    # with fold_ln γ lives in W_Q/W_K/W_V and the two coincide.
    w = getattr(model.blocks[site.layer + 1].ln1, "w", None)
    weighted = x if w is None else x * w.detach().float().cpu()
    d = x.shape[-1]
    energy = x[:, list(site.channels)].pow(2).sum(-1) / x.pow(2).sum(-1).clamp(min=1e-30)
    return Representations(
        layer=site.layer,
        channels=site.channels,
        resid_cosine=torch.tensor([mean_pairwise_cosine(r[spike]) for r in resid]),
        other_resid_cosine=torch.tensor([mean_pairwise_cosine(r[others]) for r in resid]),
        resid_pre_cosine=mean_pairwise_cosine(
            cap.acts[block_hook(site.layer, "hook_resid_pre")][spike]
        ),
        normalized_cosine=mean_pairwise_cosine(weighted[spike]),
        other_normalized_cosine=mean_pairwise_cosine(weighted[others]),
        bound_ratio=x.abs().amax(-1) / math.sqrt(d),
        channel_energy=energy,
        is_spike=spike,
    )
