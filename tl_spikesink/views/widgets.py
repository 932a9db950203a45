"""Interactive widgets: attention heads with the sink marked, tokens colored by spike size, top-k.

Each widget reads one short text through the model (one forward pass whose read-only hooks keep
only what the widget shows, added and removed with `model.hooks` as in the scan) and/or a
:class:`ScanResult`, and *returns* a CircuitsVis `RenderedHTML` (or a plotly figure); nothing is
displayed. In a notebook the returned object renders itself;
:func:`tl_spikesink.views.html.write_html` puts several on one offline page with the CircuitsVis
bundle embedded once.

`str(widget)` loads CircuitsVis from a CDN; `widget.local_src` embeds the ~1.3 MB bundle and works
offline. :func:`widget_props` reads back what a widget shows (the component and its props), which
is how the report re-embeds widgets and how tests check them.

Example:
    >>> w = attention_heads_widget(model, "The cat sat on the mat.", layer=5)  # doctest: +SKIP
    >>> open("heads.html", "w").write(w.local_src)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import html
import json
import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from circuitsvis.topk_tokens import topk_tokens
from circuitsvis.utils.render import RenderedHTML, render
from jaxtyping import Float

from tl_spikesink.anatomy import Anatomy, Site, hook_name
from tl_spikesink.config import SPIKE_SITES
from tl_spikesink.corpus import tokenize
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.probes.engine import HookFn, Probe, run

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from tl_spikesink.probes.scan import ScanResult

SINK_MARK = " [sink]"
"""Appended to the label of a token that some head of the shown layer uses as a sink."""
_DECIMALS = 3
"""Attention is sent to the browser with this many decimals: enough to see, 3x smaller pages."""
_MIN_QUERIES = 4
"""As in the scan: keys seen by fewer queries are not judged as sinks."""


def attention_heads_widget(
    model: Any,
    text: str,
    layer: int,
    *,
    result: ScanResult | None = None,
    epsilon: float | None = None,
    max_tokens: int | None = None,
) -> RenderedHTML:
    """A layer's attention heads on one text, with sink heads and sink columns marked.

    Heads are named like ``"L5H3 sink 0.94"`` (a sink head and its first-token sink score) or
    ``"L5H4 0.12"`` and ordered by that score, strongest first, so the widget opens on the
    strongest sink head (CircuitsVis zooms on the first head). Scores and sink heads come from
    `result` (pooled over its corpus) when given, else from this text alone
    (α_0 = Σ_i A_i0 / T). A key token whose α_k in this text exceeds ε in some head of the
    layer gets :data:`SINK_MARK` appended to its label.

    Args:
        model: a HookedTransformer-like model; only read.
        text: one short text: CircuitsVis draws heads × T² cells, which takes seconds in a
            browser from T ≈ 50 on (about 5 s for T = 48 and 9 heads), so cap it with
            `max_tokens`.
        layer: which layer's heads to show.
        result: a scan of this model, for corpus-level sink scores and ε.
        epsilon: sink threshold (default: the result's, else 0.3).
        max_tokens: read at most this many tokens of `text`.

    Returns:
        A CircuitsVis ``AttentionHeads`` widget.
    """
    anatomy = Anatomy.of(model)
    _check_layer(layer, anatomy.n_layers)
    eps = _epsilon(epsilon, result)
    tokens, kept = _forward(model, text, {hook_name("pattern", layer): _first}, result, max_tokens)
    pattern = kept[hook_name("pattern", layer)].float()  # [head, query, key]
    alpha = _alpha(pattern)
    scores = result.sinks.scores[layer].tolist() if result is not None else alpha[:, 0].tolist()
    order = sorted(range(len(scores)), key=lambda h: -scores[h])  # stable: ties keep head order
    names = [
        f"L{layer}H{h} sink {scores[h]:.2f}" if scores[h] > eps else f"L{layer}H{h} {scores[h]:.2f}"
        for h in order
    ]
    seen = torch.arange(len(tokens), 0, -1)
    sink_keys = ((alpha > eps) & (seen >= min(_MIN_QUERIES, len(tokens)))).any(0)
    labels = [t + SINK_MARK if s else t for t, s in zip(tokens, sink_keys.tolist(), strict=True)]
    return render(
        "AttentionHeads",
        attention=_compact(pattern[order]),
        tokens=labels,
        attentionHeadNames=names,
        maxValue=1.0,
        minValue=0.0,
    )


def spike_tokens_widget(
    model: Any,
    text: str,
    *,
    site: Site = "resid_post",
    result: ScanResult | None = None,
    max_tokens: int | None = None,
) -> RenderedHTML:
    """Tokens colored by spike magnitude, log scale, one button per layer.

    The value of a token at layer L (button "L5") is log10(1 + max_c |x_c|) over the channels of
    `site` at L, so 3.48 means a 3,000 activation. Every layer shares one color scale (the
    largest value of the text), so the spike appears where it steps up and fades where it steps
    down. CircuitsVis opens on its first button, so the first button, ``"L11 peak"``, repeats
    the layer where the text's largest value first appears (within a factor 2 of it); the
    buttons ``"L0"``, ``"L1"``, ... follow in order.

    Args:
        model: a HookedTransformer-like model; only read.
        text: one short text.
        site: which activation to measure (residual stream by default; or a block output).
        result: a scan of this model, only for its `prepend_bos`.
        max_tokens: read at most this many tokens of `text`.

    Returns:
        A CircuitsVis ``ColoredTokensMulti`` widget (values [token, 1 + layer]: column 0 is the
        peak layer again); token strings are HTML-escaped, because the component renders them
        as HTML.
    """
    names = [hook_name(site, layer) for layer in range(Anatomy.of(model).n_layers)]
    tokens, kept = _forward(model, text, dict.fromkeys(names, _log_magnitude), result, max_tokens)
    values = torch.stack([kept[n] for n in names], dim=1)
    peak = peak_layer(values.amax(0), log=True)
    values = torch.cat([values[:, peak : peak + 1], values], dim=1)
    n_values = values.shape[1]
    top = round(float(values.max()), _DECIMALS)
    return render(
        "ColoredTokensMulti",
        tokens=_as_html(tokens),
        values=_round(values),
        labels=[f"L{peak} peak"] + [f"L{layer}" for layer in range(len(names))],
        positiveBounds=[max(top, 1e-6)] * n_values,
        negativeBounds=[-1e-6] * n_values,
    )


def peak_layer(per_layer: torch.Tensor, *, log: bool = False) -> int:
    """The first layer whose value is within a factor 2 of the largest: where a spike appears.

    Args:
        per_layer: one value per layer, e.g. the largest |x| of a text at each layer.
        log: the values are log10 magnitudes (then "a factor 2" is log10(2) below the top).
    """
    top = float(per_layer.max())
    cut = top - math.log10(2) if log else top / 2
    return int((per_layer >= cut).nonzero()[0]) if per_layer.numel() else 0


def spike_topk_widget(
    model: Any,
    texts: str | Sequence[str],
    *,
    result: ScanResult | None = None,
    channels: Sequence[int] | None = None,
    sites: Sequence[Site] = SPIKE_SITES,
    k: int = 10,
    max_tokens: int | None = None,
) -> RenderedHTML:
    """The tokens with the largest (and smallest) values of each spike channel, layer by layer.

    Channels are `channels`, else the scan's spike channels, else (no spikes found) the three
    channels with the largest |x| in these texts, so the widget always shows something.
    Selectors: "Sample" picks a (text, channel) pair ("text 0 · ch 507 · max |x| 2.4e+04");
    "Site" the residual stream or a block output (the MLP output shows which tokens a step-up
    block writes the spike into, and the negative values of a step-down block); columns are
    layers (CircuitsVis numbers that axis itself, and layer numbers are what it counts).

    CircuitsVis colors a cell by its value on a fixed scale from 0 to 1 (blue) and 0 to -1
    (red), so raw activations of hundreds would all be one solid color. Each sample's values
    are therefore divided by that sample's largest |x| over all sites and layers (named in its
    label): the spike is 1 and dark, ordinary tokens are pale, and hovering a cell gives this
    fraction.

    Args:
        model: a HookedTransformer-like model; only read.
        texts: one or a few short texts (one forward each).
        result: a scan of this model, for its spike channels and `prepend_bos`.
        channels: residual channels to show.
        sites: activations to rank tokens by (default: residual stream, attention and MLP out).
        k: top and bottom tokens shown per (site, layer).
        max_tokens: read at most this many tokens of each text.

    Returns:
        A CircuitsVis ``TopkTokens`` widget (token strings HTML-escaped, as it renders HTML;
        values are fractions of each sample's largest |x|). With a single sample (one text,
        one channel) CircuitsVis shows one layer column until a layer range is picked.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise SpikeSinkError("spike_topk_widget needs at least one text")
    n_layers = Anatomy.of(model).n_layers
    names = [[hook_name(site, layer) for layer in range(n_layers)] for site in sites]
    if channels is None and result is not None:
        channels = result.spikes.channels
    # Keep only the channels shown; with none known yet, keep all and pick the largest after.
    keep = _first if not channels else functools.partial(_channels, channels=list(channels))
    hooks = {name: keep for row in names for name in row}
    runs = [_forward(model, t, hooks, result, max_tokens) for t in texts]
    # [text][site, layer, pos, channel]
    acts = [torch.stack([torch.stack([kept[n] for n in row]) for row in names]) for _, kept in runs]
    if not channels:
        resid = sites.index("resid_post") if "resid_post" in sites else 0
        peak = torch.stack([a[resid].abs().amax((0, 1)) for a in acts]).amax(0)
        channels = peak.topk(min(3, peak.numel())).indices.tolist()
        acts = [a[..., channels] for a in acts]
    channels = [int(c) for c in channels]
    # One sample per (text, channel): CircuitsVis shows all layer columns only with 2+ samples,
    # and its first selector can then name the sites. Arrays are [site, token, layer].
    samples = [(i, j) for i in range(len(texts)) for j in range(len(channels))]
    arrays = [acts[i][..., j].transpose(1, 2).double() for i, j in samples]
    peaks = [float(a.abs().max()) for a in arrays]
    return topk_tokens(
        tokens=[_as_html(runs[i][0]) for i, _ in samples],
        activations=[_fraction(a, peak).numpy() for a, peak in zip(arrays, peaks, strict=True)],
        max_k=k,
        first_dimension_name="Site",
        third_dimension_name="Layer",
        first_dimension_labels=list(sites),
        sample_labels=[
            f"text {i} · ch {channels[j]} · max |x| {peak:.3g}"
            for (i, j), peak in zip(samples, peaks, strict=True)
        ],
    )


def _fraction(x: torch.Tensor, peak: float) -> torch.Tensor:
    """`x / peak` rounded for the browser (all zeros stay zeros)."""
    return (x / peak if peak > 0 else x).mul(10**_DECIMALS).round().div(10**_DECIMALS)


def plot_text_sink_scores(
    model: Any, text: str, *, epsilon: float = 0.3, max_tokens: int | None = None
) -> go.Figure:
    """Layers × heads heatmap (plotly) of the first-token sink score α_0 on one text.

    For scores pooled over a corpus, plot the scan:
    :func:`~tl_spikesink.views.plots.plot_sink_scores`.
    (Named ``sink_scores_widget`` before 0.2, although it returns a plotly figure.)

    Args:
        model: a HookedTransformer-like model; only read.
        text: one short text.
        epsilon: heads above it are outlined as sink heads.
        max_tokens: read at most this many tokens of `text`.

    Returns:
        A plotly heatmap figure.
    """
    from tl_spikesink.views.plots import score_heatmap

    names = [hook_name("pattern", layer) for layer in range(Anatomy.of(model).n_layers)]
    tokens, kept = _forward(model, text, dict.fromkeys(names, _first_key_alpha), None, max_tokens)
    scores = torch.stack([kept[n] for n in names])
    return score_heatmap(
        scores, epsilon, f"First-token sink score on one text ({len(tokens)} tokens)"
    )


def sink_scores_widget(*args: Any, **kwargs: Any) -> go.Figure:
    """Deprecated name of :func:`plot_text_sink_scores` (it returns a plotly figure)."""
    warnings.warn(
        "sink_scores_widget is now plot_text_sink_scores (it returns a plotly figure)",
        DeprecationWarning,
        stacklevel=2,
    )
    return plot_text_sink_scores(*args, **kwargs)


_CDN_CALL = re.compile(
    r"render\(\s*\"[^\"]*\",\s*(?P<name>\w+),\s*(?P<props>.*)\)\s*</script>\s*$", re.S
)


def widget_props(widget: RenderedHTML) -> tuple[str, dict[str, Any]]:
    """The CircuitsVis component name and props a rendered widget shows.

    Args:
        widget: any CircuitsVis `RenderedHTML` (ours or one made with circuitsvis directly).

    Returns:
        (component name, e.g. "AttentionHeads"; props as plain Python data).
    """
    m = _CDN_CALL.search(widget.cdn_src)
    if m is None:
        raise SpikeSinkError(
            "cannot read the component and props of this CircuitsVis widget (its HTML does not end "
            "with a render(...) call); was it made by a different circuitsvis version?"
        )
    return m.group("name"), json.loads(m.group("props"))


def _forward(
    model: Any,
    text: str,
    keep: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    result: ScanResult | None,
    max_tokens: int | None,
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Token strings of `text` and, per hook name, what `keep[name]` makes of its activation.

    One forward pass with read-only hooks that reduce as they go (like the scan), so a widget on
    a long text never holds more than it shows: not every layer's [head, T, T] pattern.
    """
    # Tokenized as the scan tokenizes (same BOS rule, first chunk only), so positions agree.
    corpus = tokenize(
        model,
        [text],
        max_tokens=max_tokens,
        long_texts="truncate",
        prepend_bos=result.prepend_bos if result is not None else None,
    )
    missing = sorted(set(keep) - set(model.hook_dict))
    if missing:
        raise SpikeSinkError(
            f"the widget needs the hook point {missing[0]!r}, which this model lacks"
        )
    probe = _Keep(keep)
    run(model, corpus, [probe], batch_size=1, progress=False)
    return [str(t) for t in model.to_str_tokens(torch.tensor(corpus.chunks[0].tokens))], probe.kept


class _Keep(Probe):
    """What `keep[name]` makes of each hook's activation, for a batch of one sequence."""

    def __init__(self, keep: dict[str, Callable[[torch.Tensor], torch.Tensor]]):
        self.keep, self.kept = keep, {}

    def hooks(self) -> list[tuple[str, HookFn]]:
        return [(name, self._hook) for name in self.keep]

    def _hook(self, act: torch.Tensor, hook: Any) -> None:
        self.kept[hook.name] = self.keep[hook.name](act.detach()).cpu()


def _first(act: torch.Tensor) -> torch.Tensor:
    """The one sequence of a batch of one."""
    return act[0]


def _channels(act: torch.Tensor, channels: list[int]) -> torch.Tensor:
    return act[0][:, channels]


def _first_key_alpha(
    pattern: Float[torch.Tensor, "batch head query key"],
) -> Float[torch.Tensor, " head"]:
    return _alpha(pattern[0].float())[:, 0]


def _as_html(tokens: list[str]) -> list[str]:
    # ColoredTokens and TopkTokens put tokens into innerHTML unescaped: "<bos>" would vanish as a
    # tag (and a corpus could inject markup). AttentionHeads draws on a canvas: no escaping there.
    return [html.escape(t, quote=False) for t in tokens]


def _alpha(pattern: Float[torch.Tensor, "head query key"]) -> Float[torch.Tensor, "head key"]:
    """Gu et al.'s α_k of one text: Σ_i A_ik / (T − k)."""
    t = pattern.shape[-1]
    return pattern.sum(1) / torch.arange(t, 0, -1, dtype=pattern.dtype)


def _log_magnitude(act: Float[torch.Tensor, "batch pos d_model"]) -> Float[torch.Tensor, " pos"]:
    return torch.log10(1 + act[0].float().abs().amax(-1))


def _round(x: torch.Tensor) -> list:
    # Through float64, so 0.123 stays "0.123" in JSON instead of float32's 0.12300000339746475.
    return (x.double() * 10**_DECIMALS).round().div(10**_DECIMALS).tolist()


def _compact(pattern: torch.Tensor) -> list:
    """Rounded attention with exact zeros as int 0 (the masked upper triangle is half the data)."""
    return [[[v if v else 0 for v in row] for row in head] for head in _round(pattern)]


def _epsilon(epsilon: float | None, result: ScanResult | None) -> float:
    if epsilon is not None:
        return epsilon
    return result.sinks.epsilon if result is not None else 0.3


def _check_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer < n_layers:
        raise SpikeSinkError(
            f"layer {layer} does not exist; the model has layers 0..{n_layers - 1}"
        )


__all__ = [
    "SINK_MARK",
    "attention_heads_widget",
    "peak_layer",
    "plot_text_sink_scores",
    "sink_scores_widget",
    "spike_tokens_widget",
    "spike_topk_widget",
    "widget_props",
]
