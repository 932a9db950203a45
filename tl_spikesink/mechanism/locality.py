"""Are sink heads local? The paper's §4.3.3 observation, measured two ways.

The paper states without a metric that sink heads "predominantly attend to nearby tokens of the
query" (citing DuoAttention, whose streaming heads keep only the sink and a recent window), and
tests it causally by training (Table 8). Here:

1. **Window share**: per head, the share of its non-sink attention (keys after the first token,
   at queries i ≥ `min_query`) that falls in the recent window i − w + 1 … i, for w = 8, 16, 32;
   sink heads are compared with the other heads *of the same layers* (depth changes locality).
2. **Causal test**: restrict the sink heads to the first token plus a recent window of w keys
   (:func:`~tl_spikesink.interventions.window_attention`) and, separately, as many non-sink heads
   of the same layers (those with the lowest first-token score); compare the two |Δloss|. If
   sink heads are local, restricting them moves the loss less (the size of the change counts,
   as DuoAttention scores heads by the deviation a restriction causes).

Sink heads are the scan's (first-token sink score > ε). Right padding; positions are columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float

from tl_spikesink.anatomy import Anatomy, hook_name
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.mechanism.captures import DEFAULT_MAX_TOKENS, Texts, as_corpus, scan_of
from tl_spikesink.probes.engine import HookFn, Probe, Step, run
from tl_spikesink.results import Result
from tl_spikesink.views.format import json_clean, num, pct

WINDOWS = (8, 16, 32)
MIN_QUERY = 32
"""Queries before this position see too few keys for a window to exclude anything."""


@dataclass(frozen=True, repr=False)
class Locality(Result):
    """Window shares of every head and the causal window test, sink heads vs the others."""

    model: str
    windows: tuple[int, ...]
    min_query: int
    share: Float[torch.Tensor, "window layer head"]
    """Share of each head's non-sink attention inside the recent window (NaN: none to share)."""
    sink_heads: tuple[tuple[int, int], ...]
    control_heads: tuple[tuple[int, int], ...]
    """Non-sink heads of the sink heads' layers, as many as the sink heads where possible."""
    causal_window: int
    delta_loss_sink: float
    """Δloss when the sink heads keep only the first token and the recent window."""
    delta_loss_control: float
    """Δloss when the control heads do."""
    n_queries: int

    def _mean(self, heads: tuple[tuple[int, int], ...], w: int) -> float:
        values = torch.stack([self.share[w, la, h] for la, h in heads]) if heads else None
        if values is None:
            return float("nan")
        values = values[~values.isnan()]
        return float(values.mean()) if values.numel() else float("nan")

    def sink_share(self, w: int) -> float:
        """Mean window share of the sink heads at window index `w`."""
        return self._mean(self.sink_heads, w)

    def other_share(self, w: int) -> float:
        """Mean window share of the other heads of the sink heads' layers."""
        layers = {la for la, _ in self.sink_heads}
        others = tuple(
            (la, h)
            for la in sorted(layers)
            for h in range(self.share.shape[2])
            if (la, h) not in self.sink_heads
        )
        return self._mean(others, w)

    @property
    def verdict(self) -> tuple[str, str]:
        """("holds" | "does not hold" | "not applicable", the reason) for "sink heads are local"."""
        if not self.sink_heads:
            return "not applicable", "no sink head"
        if not self.control_heads:
            return "not applicable", "every head of the sink heads' layers is a sink head"
        if not self.n_queries:
            return "not applicable", f"no query at position ≥ {self.min_query}: texts too short"
        shares = [(self.sink_share(i), self.other_share(i)) for i in range(len(self.windows))]
        if all(s != s or o != o for s, o in shares):
            return "not applicable", "sink heads give no attention beyond the first token"
        local = all(s > o for s, o in shares if s == s and o == o)
        cost_sink, cost_control = abs(self.delta_loss_sink), abs(self.delta_loss_control)
        causal = cost_sink < cost_control
        verdict = "holds" if local and causal else "does not hold"
        return verdict, (
            f"window share {'above' if local else 'not above'} the other heads at every w; "
            f"restricting them moves the loss by {num(self.delta_loss_sink)} vs "
            f"{num(self.delta_loss_control)} nats"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: shares per window for sink and other heads, the causal Δloss, verdict."""
        verdict, reason = self.verdict
        return json_clean(
            {
                "model": self.model,
                "windows": list(self.windows),
                "min_query": self.min_query,
                "sink_share": [self.sink_share(i) for i in range(len(self.windows))],
                "other_share": [self.other_share(i) for i in range(len(self.windows))],
                "sink_heads": [list(h) for h in self.sink_heads],
                "control_heads": [list(h) for h in self.control_heads],
                "causal_window": self.causal_window,
                "delta_loss_sink": self.delta_loss_sink,
                "delta_loss_control": self.delta_loss_control,
                "verdict": verdict,
                "reason": reason,
            }
        )

    def __str__(self) -> str:
        verdict, reason = self.verdict
        lines = [f"locality of {self.model}'s sink heads ({self.n_queries} queries ≥ pos "
                 f"{self.min_query})"]  # fmt: skip
        for i, w in enumerate(self.windows):
            lines.append(
                f"  window {w:>3}: sink heads {pct(self.sink_share(i), 1)} of their non-sink "
                f"attention, other heads {pct(self.other_share(i), 1)}"
            )
        lines.append(
            f"  window {self.causal_window} + first token: Δloss sink heads "
            f"{num(self.delta_loss_sink)}, as many other heads {num(self.delta_loss_control)}"
        )
        lines.append(f"  {verdict}: {reason}")
        return "\n".join(lines)


class _WindowShare(Probe):
    def __init__(self, n_layers: int, n_heads: int, windows: tuple[int, ...], min_query: int):
        self.windows, self.min_query = windows, min_query
        self.inside = torch.zeros(len(windows), n_layers, n_heads, dtype=torch.float64)
        self.rest = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.n_queries, self.n_layers = 0, n_layers

    def hooks(self) -> list[tuple[str, HookFn]]:
        return [(hook_name("pattern", la), self._hook(la)) for la in range(self.n_layers)]

    def start_batch(self, step: Step) -> None:
        t = step.mask.shape[1]
        q = torch.arange(t, device=step.mask.device)[:, None]
        k = torch.arange(t, device=step.mask.device)[None, :]
        self.nonsink = ((k >= 1) & (k <= q)).float()
        self.in_window = [((k >= 1) & (k <= q) & (k > q - w)).float() for w in self.windows]
        self.queries = (step.mask & (q[:, 0] >= self.min_query)[None, :]).float()  # [b, q]
        self.n_queries += int(self.queries.sum())

    def _hook(self, layer: int) -> HookFn:
        def hook(pattern: torch.Tensor, hook: Any) -> None:
            p = pattern.detach().float().nan_to_num(0.0) * self.queries[:, None, :, None]
            self.rest[layer] += (p * self.nonsink).sum((0, 2, 3)).double().cpu()
            for i, win in enumerate(self.in_window):
                self.inside[i, layer] += (p * win).sum((0, 2, 3)).double().cpu()

        return hook


def locality(
    model: Any,
    texts: Texts | None = None,
    scan: Any = None,
    *,
    windows: tuple[int, ...] = WINDOWS,
    causal_window: int = 16,
    min_query: int = MIN_QUERY,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = 8,
) -> Locality:
    """Window shares of every head and the causal window test (see the module docstring)."""
    from tl_spikesink.config import ScanConfig
    from tl_spikesink.corpus import default_texts
    from tl_spikesink.evaluation.scoring import evaluate_all
    from tl_spikesink.interventions.attention import window_attention

    a = Anatomy.of(model)
    if not a.causal:
        raise SpikeSinkError(
            "locality needs causal attention (a recent window of earlier keys); "
            f"{a.model_name} attends both ways"
        )
    corpus = as_corpus(model, default_texts() if texts is None else texts, max_tokens)
    scan = scan_of(model, corpus, scan)
    probe = _WindowShare(a.n_layers, a.n_heads, tuple(windows), min_query)
    run(model, corpus, [probe], batch_size=batch_size, progress=False)
    share = probe.inside / probe.rest.where(probe.rest > 1e-9, float("nan"))
    sink_heads = tuple(tuple(h) for h in scan.sinks.sink_heads)
    control: list[tuple[int, int]] = []
    scores = scan.sinks.scores
    for layer in sorted({la for la, _ in sink_heads}):
        n_sink = sum(1 for la, _ in sink_heads if la == layer)
        others = [h for h in range(a.n_heads) if (layer, h) not in sink_heads]
        others.sort(key=lambda h: float(scores[layer, h]))
        control += [(layer, h) for h in others[:n_sink]]
    d_sink = d_control = float("nan")
    if sink_heads and control:
        ivs = [
            window_attention(sink_heads, causal_window, model=model, name="sink heads"),
            window_attention(control, causal_window, model=model, name="other heads"),
        ]
        config = ScanConfig(batch_size=batch_size)
        clean, *rows = evaluate_all(model, corpus, [None, *ivs], config=config, progress=False)
        d_sink, d_control = (r.loss - clean.loss for r in rows)
    return Locality(
        model=a.model_name,
        windows=tuple(windows),
        min_query=min_query,
        share=share.float(),
        sink_heads=sink_heads,
        control_heads=tuple(control),
        causal_window=causal_window,
        delta_loss_sink=d_sink,
        delta_loss_control=d_control,
        n_queries=probe.n_queries,
    )


__all__ = ["MIN_QUERY", "WINDOWS", "Locality", "locality"]
