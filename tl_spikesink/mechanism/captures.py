"""Shared plumbing of the mechanism analyses: the spike site of a scan and read-only capture passes.

A capture pass runs the model over a corpus with read-only hooks (``model.hooks``, removed on
exit, also on error) under ``torch.inference_mode`` and keeps chosen activations at real tokens
only, flattened to rows [token, ...].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tl_spikesink.anatomy import Anatomy
from tl_spikesink.corpus import Corpus, tokenize
from tl_spikesink.errors import SpikeSinkError

Texts = Sequence[str] | str | Corpus
DEFAULT_MAX_TOKENS = 1024
"""Tokens read by an analysis when it is given raw texts: enough for tens of spike tokens."""
_MAIN_SPIKE_SHARE = 0.5
"""The spike layer is the first whose resid_post top-1 reaches this share of the largest."""


# ---------------------------------------------------------------- hook names and shared plumbing


def _hook(layer: int | None, site: str) -> str:
    """Hook names this module needs beyond :func:`tl_spikesink.anatomy.hook_name`'s sites.

    `site` is the path under ``blocks.{layer}`` (e.g. ``"mlp.hook_pre"``, ``"ln2.hook_normalized"``,
    ``"attn.hook_k"``, ``"hook_resid_post"``).
    """
    return site if layer is None else f"blocks.{layer}.{site}"


@dataclass(frozen=True)
class SpikeSite:
    """Where the main spike lives, as read from a scan."""

    layer: int
    """Block that creates the main spike (its resid_post first carries it)."""
    channels: tuple[int, ...]
    """Spike channels massive at `layer`, most spike tokens first."""
    cut: float
    """|resid_post| at `layer` above which a token is a spike token (the scan's own cut)."""
    step_down: int | None
    """First block after `layer` that cancels a spike, if any."""


def spike_site(scan: Any) -> SpikeSite:
    """The main spike of a scan: its layer, channels and cut.

    Raises:
        SpikeSinkError: the scan found no massive activation.
    """
    spikes = scan.spikes
    if not spikes.massive:
        raise SpikeSinkError(
            f"the scan of {scan.model} found no massive activation; spike mechanism checks need one"
        )
    top = spikes.top("resid_post", 1)[:, 0]
    layer = int((top >= _MAIN_SPIKE_SHARE * top.max()).nonzero()[0, 0])
    here = {a.channel for a in spikes.massive if a.layer == layer}
    channels = tuple(c for c in spikes.channels if c in here) or spikes.channels
    median = float(spikes.median("resid_post").nan_to_num(0.0)[layer])
    cut = max(scan.config.abs_threshold, scan.config.rel_threshold * median)
    later = [x for x in spikes.step_down_layers if x > layer]
    return SpikeSite(layer, channels, cut, later[0] if later else None)


def _as_corpus(model: Any, texts: Texts, max_tokens: int) -> Corpus:
    if isinstance(texts, Corpus):
        return texts
    return tokenize(model, texts, max_seq_len=min(128, int(model.cfg.n_ctx)), max_tokens=max_tokens)


def _scan_of(model: Any, corpus: Corpus, scan: Any) -> Any:
    if scan is not None:
        return scan
    from tl_spikesink.probes.scan import scan as run_scan

    return run_scan(model, corpus, progress=False)


def _require(model: Any, names: Sequence[str], analysis: str) -> None:
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise SpikeSinkError(
            f"{analysis} needs the hook point {missing[0]!r}, which {type(model).__name__} "
            f"({model.cfg.model_name}) does not have"
        )


def _require_gated(model: Any, analysis: str) -> None:
    if not getattr(model.cfg, "gated_mlp", False):
        raise SpikeSinkError(
            f"{analysis} needs a gated (SwiGLU-style) MLP; this model has gated_mlp=False"
        )


def _require_rms(model: Any, analysis: str) -> None:
    anatomy = Anatomy.of(model)
    if not anatomy.rms_norm or anatomy.norm_placement == "post":
        raise SpikeSinkError(
            f"{analysis} needs pre-norm RMSNorm; this model has normalization_type="
            f"{anatomy.normalization_type!r}, placed {anatomy.norm_placement!r}"
        )


@dataclass(frozen=True)
class _Captured:
    """Activations of the real tokens of a corpus, flattened to rows [token, ...]."""

    acts: dict[str, torch.Tensor]
    position: torch.Tensor
    token_id: torch.Tensor
    sequence: torch.Tensor


def _capture(
    model: Any,
    corpus: Corpus,
    names: Sequence[str],
    reducers: Sequence[tuple[str, Callable[[torch.Tensor, torch.Tensor], None]]] = (),
    batch_size: int = 8,
    on_batch: Callable[[int, torch.Tensor], None] | None = None,
) -> _Captured:
    """One read-only pass over `corpus` keeping `names` at real tokens.

    `reducers` are (hook name, fn(activation, mask)) pairs for activations too big to keep
    (attention scores); they are called once per batch. `on_batch(index, mask)` runs before each
    batch's forward; batches come in the same order on every pass over the same corpus.
    """
    names = list(dict.fromkeys(names))
    _require(model, names + [n for n, _ in reducers], "this analysis")
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    state: dict[str, torch.Tensor] = {}

    seen: set[str] = set()

    def keep(act: torch.Tensor, hook: Any) -> None:
        # TransformerLens calls ln1 once each for the query, key and value inputs; the three are
        # the same tensor without split inputs, so the first call per batch is kept.
        if hook.name in seen:
            return
        seen.add(hook.name)
        store[hook.name].append(act.detach().float()[state["mask"]].cpu())

    def reduce_with(fn: Callable) -> Callable:
        def hook(act: torch.Tensor, hook: Any) -> None:
            fn(act.detach().float(), state["mask"])

        return hook

    hooks = [(n, keep) for n in names] + [(n, reduce_with(fn)) for n, fn in reducers]
    positions, ids, seqs = [], [], []
    device = next(model.parameters()).device
    seq = 0
    with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
        for index, batch in enumerate(corpus.batches(batch_size, "right")):
            mask = batch.mask.to(device)
            state["mask"] = mask
            seen.clear()
            if on_batch is not None:
                on_batch(index, mask)
            model(batch.tokens.to(device), attention_mask=mask.long(), return_type=None)
            pos = torch.arange(batch.tokens.shape[1]).expand_as(batch.tokens)
            positions.append(pos[batch.mask])
            ids.append(batch.tokens[batch.mask])
            rows = torch.arange(seq, seq + len(batch.lengths))[:, None].expand_as(batch.tokens)
            seqs.append(rows[batch.mask])
            seq += len(batch.lengths)
    return _Captured(
        {n: torch.cat(v) for n, v in store.items()},
        torch.cat(positions),
        torch.cat(ids),
        torch.cat(seqs),
    )


def _spike_mask(cap: _Captured, site: SpikeSite) -> torch.Tensor:
    resid = cap.acts[_hook(site.layer, "hook_resid_post")]
    return resid[:, list(site.channels)].abs().amax(-1) > site.cut


def _mean_pairwise_cosine(x: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of rows (NaN with fewer than two rows)."""
    if x.shape[0] < 2:
        return float("nan")
    u = torch.nn.functional.normalize(x.double(), dim=-1)
    g = u @ u.T
    n = x.shape[0]
    return float((g.sum() - g.diagonal().sum()) / (n * (n - 1)))


def _mean(x: torch.Tensor) -> float:
    return float(x.double().mean()) if x.numel() else float("nan")


def _nanmean(x: torch.Tensor) -> float:
    x = x[~x.isnan()]
    return _mean(x)
