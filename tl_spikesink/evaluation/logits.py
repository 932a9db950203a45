"""Next-token scoring shared by every evaluation: log-probs at real positions, NLL, KL."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int

from tl_spikesink.corpus import Batch


def next_token_logprobs(
    logits: Float[torch.Tensor, "batch pos vocab"], batch: Batch
) -> tuple[Float[torch.Tensor, "n vocab"], Int[torch.Tensor, " n"]]:
    """Log-probs at every scored position (real, followed by a real token) and their targets."""
    mask = batch.mask.to(logits.device)
    scored = mask[:, :-1] & mask[:, 1:]
    logp = logits[:, :-1][scored].float().log_softmax(-1)
    return logp, batch.tokens.to(logits.device)[:, 1:][scored]


def count_nonfinite(logp: Float[torch.Tensor, "n vocab"]) -> int:
    """Scored positions whose log-probs are not all finite (the forward overflowed)."""
    return int((~torch.isfinite(logp).all(-1)).sum())


def nll(
    logp: Float[torch.Tensor, "n vocab"], targets: Int[torch.Tensor, " n"]
) -> Float[torch.Tensor, " n"]:
    """Negative log-likelihood of each target."""
    return -logp.gather(-1, targets[:, None]).squeeze(-1)


def kl(
    p_log: Float[torch.Tensor, "n vocab"], q_log: Float[torch.Tensor, "n vocab"]
) -> Float[torch.Tensor, " n"]:
    """KL(p ‖ q) per row, from log-probs."""
    # Σ p (log p − log q); terms with p = 0 are 0 even where log q = −inf.
    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), 0.0).sum(-1)


__all__ = ["count_nonfinite", "kl", "next_token_logprobs", "nll"]
