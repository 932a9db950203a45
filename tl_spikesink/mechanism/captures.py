"""Shared plumbing of the mechanism analyses: the spike site of a scan and read-only capture passes.

A capture pass runs the model over a corpus with read-only hooks (``model.hooks``, removed on
exit, also on error) under ``torch.inference_mode`` and keeps chosen activations at real tokens
only, flattened to rows [token, ...].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from tl_spikesink.anatomy import Anatomy, block_hook
from tl_spikesink.config import ANALYSIS_MAX_TOKENS
from tl_spikesink.corpus import Corpus, tokenize
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.probes.capture import Capture, Captured, Reduce
from tl_spikesink.probes.engine import Probe, run

# The spike-site rule lives with the probes (one rule for every analysis); these names stay
# importable from here for the mechanism modules and their users.
from tl_spikesink.probes.site import NoStepUpBlock as NoStepUpBlock
from tl_spikesink.probes.site import SpikeSite as SpikeSite
from tl_spikesink.probes.site import spike_site as spike_site

Texts = Sequence[str] | str | Corpus
DEFAULT_MAX_TOKENS = ANALYSIS_MAX_TOKENS
"""Tokens read by an analysis when it is given raw texts: enough for tens of spike tokens."""


def as_corpus(model: Any, texts: Texts, max_tokens: int) -> Corpus:
    if isinstance(texts, Corpus):
        return texts
    return tokenize(model, texts, max_seq_len=min(128, int(model.cfg.n_ctx)), max_tokens=max_tokens)


def scan_of(model: Any, corpus: Corpus, scan: Any) -> Any:
    if scan is not None:
        return scan
    from tl_spikesink.probes.scan import scan as run_scan

    return run_scan(model, corpus, progress=False)


def require(model: Any, names: Sequence[str], analysis: str) -> None:
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise SpikeSinkError(
            f"{analysis} needs the hook point {missing[0]!r}, which {type(model).__name__} "
            f"({model.cfg.model_name}) does not have"
        )


def require_gated(model: Any, analysis: str) -> None:
    if not getattr(model.cfg, "gated_mlp", False):
        raise SpikeSinkError(
            f"{analysis} needs a gated (SwiGLU-style) MLP; this model has gated_mlp=False"
        )


def require_rms(model: Any, analysis: str) -> None:
    anatomy = Anatomy.of(model)
    if not anatomy.rms_norm or anatomy.norm_placement == "post":
        raise SpikeSinkError(
            f"{analysis} needs pre-norm RMSNorm; this model has normalization_type="
            f"{anatomy.normalization_type!r}, placed {anatomy.norm_placement!r}"
        )


def capture(
    model: Any,
    corpus: Corpus,
    names: Sequence[str],
    reducers: Sequence[tuple[str, Callable[[torch.Tensor, torch.Tensor], None]]] = (),
    batch_size: int = 8,
    probes: Sequence[Probe] = (),
) -> Captured:
    """One read-only pass over `corpus` keeping `names` at real tokens (right padding).

    `reducers` are (hook name, fn(activation, mask)) pairs for activations too big to keep
    (attention scores), called once per batch; extra `probes` ride along in the same pass.
    """
    keep = Capture(names)
    require(model, keep.names + [n for n, _ in reducers], "this analysis")
    run(
        model,
        corpus,
        [*probes, keep, Reduce(reducers)],
        batch_size=batch_size,
        padding_side="right",
        progress=False,
    )
    return keep.result()


def spike_mask(cap: Captured, site: SpikeSite) -> torch.Tensor:
    resid = cap.acts[block_hook(site.layer, "hook_resid_post")]
    return resid[:, list(site.channels)].abs().amax(-1) > site.cut


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of rows (NaN with fewer than two rows)."""
    if x.shape[0] < 2:
        return float("nan")
    u = torch.nn.functional.normalize(x.double(), dim=-1)
    g = u @ u.T
    n = x.shape[0]
    return float((g.sum() - g.diagonal().sum()) / (n * (n - 1)))


def mean_or_nan(x: torch.Tensor) -> float:
    return float(x.double().mean()) if x.numel() else float("nan")


def nanmean(x: torch.Tensor) -> float:
    x = x[~x.isnan()]
    return mean_or_nan(x)


TOKENS = ("spike tokens", "other tokens")
"""The two groups of a per-token split, for :func:`group_means`."""
HEADS = ("sink heads", "other heads")
"""The two groups of a per-head split."""


def head_mask(heads: Sequence[tuple[int, int]], like: torch.Tensor) -> torch.Tensor:
    """The [layer, head] mask of `heads` (e.g. a scan's sink heads), shaped like `like`."""
    m = torch.zeros_like(like, dtype=torch.bool)
    for layer, head in heads:
        m[layer, head] = True
    return m


def group_mean(values: str, mask: str, inside: bool, doc: str) -> property:
    """A result's property: the mean of its `values` where its `mask` is set (or, not set).

    NaN entries are left out and an empty group gives NaN, so every result splits its tokens or
    heads into "spike / other" or "sink / other" by the same rule.
    """

    def get(self: Any) -> float:
        m = getattr(self, mask)
        return nanmean(getattr(self, values)[m if inside else ~m])

    return property(get, doc=doc)


def group_means(
    values: str, mask: str, groups: tuple[str, str], note: str = ""
) -> tuple[property, property]:
    """The two :func:`group_mean` properties of `values`: inside `mask` and outside it.

    `groups` names the two sides ("spike tokens", "other tokens") in the docstrings.
    """
    what = f"Mean `{values}` over the {{}}{f' ({note})' if note else ''}."
    return (group_mean(values, mask, True, what.format(groups[0])),
            group_mean(values, mask, False, what.format(groups[1])))  # fmt: skip
