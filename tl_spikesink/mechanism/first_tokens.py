"""Why first tokens and delimiters spike (the paper's §3.1.3), measured three ways.

1. **Eq. 22, a static map**: the first token attends only to itself, so each head's output there
   is its value, h̃₀ W_V + b_V, a fixed linear function of the token's own normalized residual
   whatever follows. Measured per layer as the largest relative error
   ‖z₀ − (h̃₀ W_V + b_V)‖ / ‖h̃₀ W_V + b_V‖ over sequences (``hook_z`` against ``ln1.hook_normalized``
   times the weights); near float precision in a causal model, undefined in an encoder.
2. **Delimiter self-sinking**: in the early layers (up to the step-up block's), the attention a
   token pays to itself, mean over heads, for delimiters (tokens that decode to punctuation or
   whitespace only, the scan's rule) vs the other tokens, first token excluded; also for the
   spike tokens after position 0, which the paper says self-sink strongly.
3. **Embedding–scale collinearity**: cos(W_E[t], γ) between each vocabulary item's embedding and
   layer 0's pre-attention RMSNorm gain γ, delimiters vs the rest of the vocabulary. γ is read
   from the norm when unfolded, or from what :func:`tl_spikesink.load` kept before folding it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float

from tl_spikesink.anatomy import Anatomy, first_norm_scale, hook_name
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.mechanism.captures import (
    DEFAULT_MAX_TOKENS,
    Texts,
    as_corpus,
    require,
    scan_of,
    spike_site,
)
from tl_spikesink.probes.engine import HookFn, Probe, Step, run
from tl_spikesink.results import Result
from tl_spikesink.tokens import is_delimiter
from tl_spikesink.views.format import json_clean, num, pct

STATIC_TOLERANCE = 1e-3
"""Eq. 22 holds when every layer's relative error is below this (float32 rounding is ~1e-6)."""


def delimiter_mask(model: Any) -> torch.Tensor:
    """[d_vocab] bool: the vocabulary items that are delimiters (the scan's rule)."""
    tokenizer = model.tokenizer
    n = int(model.cfg.d_vocab)
    texts = tokenizer.batch_decode([[i] for i in range(min(n, len(tokenizer)))])
    mask = torch.zeros(n, dtype=torch.bool)
    mask[: len(texts)] = torch.tensor([bool(t) and is_delimiter(t) for t in texts])
    return mask


@dataclass(frozen=True, repr=False)
class FirstTokens(Result):
    """Eq. 22, delimiter self-sinking and the embedding–scale cosine of one model."""

    model: str
    causal: bool
    static_error: Float[torch.Tensor, " layer"]
    """Largest relative error of Eq. 22 over sequences, per layer (NaN in an encoder)."""
    early_layers: tuple[int, ...]
    early_reason: str
    self_delimiter: Float[torch.Tensor, " layer"]
    """Mean attention to itself of delimiter tokens after position 0 (mean over heads)."""
    self_other: Float[torch.Tensor, " layer"]
    self_spike: Float[torch.Tensor, " layer"]
    """The same for spike tokens after position 0 (NaN: none in the corpus)."""
    n_delimiter: int
    n_other: int
    n_spike: int
    n_spike_delimiter: int
    """Spike tokens after position 0 that are delimiters."""
    scale_cos_delimiter: float
    """Mean cos(W_E[t], γ) over delimiter vocabulary items (NaN: γ unknown)."""
    scale_cos_other: float
    scale_reason: str
    """Why the cosine is missing, when it is."""

    def early(self, values: torch.Tensor) -> float:
        """Mean of a per-layer curve over the early layers, NaN layers left out."""
        v = values[list(self.early_layers)]
        v = v[~v.isnan()]
        return float(v.mean()) if v.numel() else float("nan")

    @property
    def static_verdict(self) -> tuple[str, str]:
        """Eq. 22: the first token's attention output is a static linear map."""
        if not self.causal:
            return "not applicable", "bidirectional attention: the first token sees every token"
        worst = float(self.static_error.max())
        verdict = "holds" if worst < STATIC_TOLERANCE else "does not hold"
        return verdict, f"largest relative error over layers {num(worst)}"

    @property
    def self_sink_verdict(self) -> tuple[str, str]:
        """Delimiters attend to themselves more than other tokens do in the early layers."""
        if not self.n_delimiter:
            return "not applicable", "no delimiter after the first token in the corpus"
        d, o = self.early(self.self_delimiter), self.early(self.self_other)
        verdict = "holds" if d > o else "does not hold"
        layers = f"layers {self.early_layers[0]}–{self.early_layers[-1]}"
        return verdict, f"self-attention over {layers}: delimiters {pct(d, 1)}, others {pct(o, 1)}"

    @property
    def scale_verdict(self) -> tuple[str, str]:
        """Delimiter embeddings are more collinear with the first norm's gain than others."""
        if self.scale_reason:
            return "not applicable", self.scale_reason
        d, o = self.scale_cos_delimiter, self.scale_cos_other
        verdict = "holds" if d > o else "does not hold"
        return verdict, f"mean cos(W_E, γ): delimiters {num(d)}, other items {num(o)}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per-layer curves, counts, the three verdicts with their reasons."""
        out: dict[str, Any] = {
            "model": self.model,
            "causal": self.causal,
            "static_error": self.static_error.tolist(),
            "early_layers": list(self.early_layers),
            "early_reason": self.early_reason,
            "self_attention": {
                "delimiter": self.self_delimiter.tolist(),
                "other": self.self_other.tolist(),
                "spike": self.self_spike.tolist(),
            },
            "counts": {
                "delimiter": self.n_delimiter,
                "other": self.n_other,
                "spike": self.n_spike,
                "spike_delimiter": self.n_spike_delimiter,
            },
            "scale_cosine": {
                "delimiter": self.scale_cos_delimiter,
                "other": self.scale_cos_other,
            },
        }
        for key in ("static", "self_sink", "scale"):
            verdict, reason = getattr(self, f"{key}_verdict")
            out[key] = {"verdict": verdict, "reason": reason}
        return json_clean(out)

    def __str__(self) -> str:
        lines = [f"first tokens and delimiters of {self.model} (§3.1.3)"]
        for label, key in (
            ("Eq. 22 static map", "static"),
            ("delimiter self-sinking", "self_sink"),
            ("embedding–scale cosine", "scale"),
        ):
            verdict, reason = getattr(self, f"{key}_verdict")
            lines.append(f"  {label:<24} {verdict}: {reason}")
        if self.n_spike:
            lines.append(
                f"  {self.n_spike} spike tokens after position 0 ({self.n_spike_delimiter} "
                f"delimiters) attend {pct(self.early(self.self_spike), 1)} to themselves early"
            )
        return "\n".join(lines)


class _FirstTokenProbe(Probe):
    """Eq. 22 errors at position 0 and per-token self-attention, in one read-only pass."""

    def __init__(self, model: Any, delimiters: torch.Tensor, site: Any):
        a = Anatomy.of(model)
        self.n_layers, self.causal = a.n_layers, a.causal
        self.delimiters, self.site = delimiters, site
        self.blocks = model.blocks
        self.error = torch.zeros(a.n_layers, dtype=torch.float64)
        self.sums = torch.zeros(3, a.n_layers, dtype=torch.float64)  # delimiter, other, spike
        self.counts = [0, 0, 0]
        self.n_spike_delimiter = 0
        self._normalized: dict[int, torch.Tensor] = {}

    def hooks(self) -> list[tuple[str, HookFn]]:
        out: list[tuple[str, HookFn]] = []
        for layer in range(self.n_layers):
            out.append((hook_name("pattern", layer), self._pattern_hook(layer)))
            if self.causal:
                out.append((hook_name("ln1_normalized", layer), self._normalized_hook(layer)))
                out.append((hook_name("z", layer), self._z_hook(layer)))
        if self.site is not None:
            out.append((hook_name("resid_post", self.site.layer), self._spike_hook))
        return out

    def start_batch(self, step: Step) -> None:
        later = step.mask.clone()
        later[:, 0] = False
        delim = self.delimiters.to(step.tokens.device)[step.tokens] & later
        self.groups = [delim, later & ~delim, torch.zeros_like(later)]
        self.later = later
        self._own: dict[int, torch.Tensor] = {}

    def _spike_hook(self, resid: torch.Tensor, hook: Any) -> None:
        spike = resid[..., list(self.site.channels)].abs().amax(-1) > self.site.cut
        self.groups[2] = spike & self.later

    def _normalized_hook(self, layer: int) -> HookFn:
        def hook(x: torch.Tensor, hook: Any) -> None:
            self._normalized[layer] = x[:, 0].detach().float()

        return hook

    def _z_hook(self, layer: int) -> HookFn:
        def hook(z: torch.Tensor, hook: Any) -> None:
            attn = self.blocks[layer].attn
            h = self._normalized.pop(layer)
            value = torch.einsum("bd,hde->bhe", h, attn.W_V.float()) + attn.b_V.float()
            diff = (z[:, 0].float() - value).flatten(1).norm(dim=1)
            rel = diff / value.flatten(1).norm(dim=1).clamp_min(1e-12)
            self.error[layer] = max(float(self.error[layer]), float(rel.max()))

        return hook

    def _pattern_hook(self, layer: int) -> HookFn:
        def hook(pattern: torch.Tensor, hook: Any) -> None:
            # Mean over heads of A[t, t]; grouped at end_batch, once the spike tokens are known.
            self._own[layer] = pattern.detach().float().diagonal(dim1=-2, dim2=-1).mean(1)

        return hook

    def end_batch(self, step: Step, logits: Any = None) -> None:
        for g, group in enumerate(self.groups):
            self.counts[g] += int(group.sum())
            for layer, own in self._own.items():
                self.sums[g, layer] += float(own[group].double().sum())
        self.n_spike_delimiter += int((self.groups[2] & self.groups[0]).sum())


def first_tokens(
    model: Any,
    texts: Texts | None = None,
    scan: Any = None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = 8,
) -> FirstTokens:
    """Eq. 22, delimiter self-sinking and the embedding–scale cosine (module docstring)."""
    from tl_spikesink.corpus import default_texts

    corpus = as_corpus(model, default_texts() if texts is None else texts, max_tokens)
    scan = scan_of(model, corpus, scan)
    a = Anatomy.of(model)
    require(model, [hook_name("pattern", 0)], "first_tokens")
    delimiters = delimiter_mask(model)
    try:
        site = spike_site(scan)
        early = tuple(range(site.layer + 1))
        early_reason = f"layers up to the step-up block's ({site.reason})"
    except SpikeSinkError as exc:  # no step-up block, or no massive activation at all
        site, early = None, tuple(range(max(1, a.n_layers // 4)))
        early_reason = f"first quarter of the layers ({exc})"
    probe = _FirstTokenProbe(model, delimiters, site)
    run(model, corpus, [probe], batch_size=batch_size, progress=False)
    means = probe.sums / torch.tensor(probe.counts, dtype=torch.float64).clamp_min(1)[:, None]
    for i, c in enumerate(probe.counts):
        if not c:
            means[i] = float("nan")
    gamma = first_norm_scale(model) if a.causal else None
    cos_d = cos_o = float("nan")
    if gamma is None:
        scale_reason = (
            "post-norm: no pre-attention norm"
            if not a.causal
            else "the norm gains are folded into the weights (fold_ln) and were not recorded; "
            "load with tl_spikesink.load or keep the norm unfolded"
        )
    else:
        scale_reason = ""
        emb = model.W_E.detach().float().cpu()
        cos = torch.nn.functional.cosine_similarity(emb, gamma.float().cpu()[None], dim=1)
        cos_d, cos_o = float(cos[delimiters].mean()), float(cos[~delimiters].mean())
    return FirstTokens(
        model=a.model_name,
        causal=a.causal,
        static_error=probe.error.float() if a.causal else torch.full((a.n_layers,), float("nan")),
        early_layers=early,
        early_reason=early_reason,
        self_delimiter=means[0].float(),
        self_other=means[1].float(),
        self_spike=means[2].float(),
        n_delimiter=probe.counts[0],
        n_other=probe.counts[1],
        n_spike=probe.counts[2],
        n_spike_delimiter=probe.n_spike_delimiter,
        scale_cos_delimiter=cos_d,
        scale_cos_other=cos_o,
        scale_reason=scale_reason,
    )


__all__ = ["FirstTokens", "delimiter_mask", "first_tokens"]
