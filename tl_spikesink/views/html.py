"""One self-contained HTML page of a scan: summary, plots, widgets and extra tables, offline.

The page loads nothing from the network. plotly.js (~4.8 MB) is inlined once in the head and every
figure is embedded without it (`fig.to_html(include_plotlyjs=False)`). CircuitsVis widgets carry
the ~1.3 MB CircuitsVis bundle each in `widget.local_src` (and a CDN link in `str(widget)`);
here the bundle is inlined once as a classic script, which makes `CircuitsVis` a page global,
and each widget is reduced to its component name and props (:func:`widgets.widget_props`) and
mounted with the `CircuitsVis.render(...)` call `local_src` itself makes, one widget per task
as the page opens (the attention widget is capped at `max_attention_tokens`, so all of them
draw within a few seconds). Each widget's container gets `data-drawn-ms`, the time since the
page was opened at which its content appeared.

    >>> write_html(result, "report.html", model=model, texts=["The cat sat."])  # doctest: +SKIP

Extra tables (interventions, claims, ...) are any objects whose `to_dict()` holds `rows`, a list of
dicts; they are rendered generically, one column per key, and the decoupling table
(:class:`~tl_spikesink.evaluation.decoupling.ExperimentTable`) also as its chart. Extra figures
(any plotly figures, e.g. of the mechanism checks) follow the scan's plots.
"""

from __future__ import annotations

import dataclasses
import html
import json
import re
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.views.format import block_events, layer_list, num, pct

if TYPE_CHECKING:
    import plotly.graph_objects as go
    from circuitsvis.utils.render import RenderedHTML

    from tl_spikesink.probes.scan import ScanResult

_SHOWN_TOKENS = 10
_SOURCE_MAP = re.compile(r"^//# sourceMappingURL=.*$", re.M)
_PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}


def write_html(result: ScanResult, path: str | Path, **options: Any) -> Path:
    """Write the report of `result` to `path`: the page :func:`render_html` builds.

    Args:
        result: the scan to report.
        path: where to write the page.
        **options: keyword arguments of :func:`render_html` (`model`, `texts`, `extra_tables`,
            `extra_figures`, `title`, `layers`, `max_widget_tokens`, `max_attention_tokens`).

    Returns:
        The path written.
    """
    path = Path(path).expanduser()
    if not path.resolve().parent.is_dir() or path.is_dir():  # before the widgets' forwards
        raise SpikeSinkError(
            f"cannot write {path}: "
            + ("it is a folder" if path.is_dir() else f"the folder {path.parent} does not exist")
        )
    path.write_text(render_html(result, **options), encoding="utf-8")
    return path


def render_html(
    result: ScanResult,
    *,
    model: Any = None,
    texts: Sequence[str] | str | None = None,
    extra_tables: Iterable[Any] = (),
    extra_figures: Iterable[go.Figure] = (),
    title: str | None = None,
    layers: Sequence[int] | None = None,
    max_widget_tokens: int = 512,
    max_attention_tokens: int = 48,
) -> str:
    """The report of `result` as one self-contained, offline HTML page (a string).

    Args:
        result: the scan to report.
        model: the scanned model; when given, the page adds interactive widgets (one forward
            pass per widget text; the model is only read).
        texts: texts the widgets read: the first for the attention heads and the spike-colored
            tokens, all of them for the top-k table (default: two paragraphs of the default
            corpus).
        extra_tables: objects with `to_dict()` holding `rows` (a list of dicts), or such dicts,
            or plain lists of dicts; each becomes a table. An
            :class:`~tl_spikesink.evaluation.decoupling.ExperimentTable` also gets its chart
            (:func:`tl_spikesink.views.plots.plot_interventions`), and an
            :class:`~tl_spikesink.training.AblationTable` its bars and emergence curves.
        extra_figures: plotly figures drawn after the scan's plots (e.g. mechanism plots).
        title: page title (default: names the model).
        layers: layers whose attention heads are shown (default: the layer of the strongest
            sink head).
        max_widget_tokens: the token widgets (spike colors, top-k, per-text sink scores) read
            at most this many tokens of each text.
        max_attention_tokens: the attention widget reads at most this many: CircuitsVis draws
            heads × T² cells, which took about 1 s for T = 48 with SmolLM2's 9 heads and
            grows as T² (headless Chromium, busy 2-core CPU); at T = 500 it would freeze the
            page for minutes.

    Returns:
        The page, ready to write to a file.

    Raises:
        SpikeSinkError: an extra table holds no `rows` list, or an extra figure is not a plotly
            figure.
    """
    from tl_spikesink.views import plots

    title = title or f"tl_spikesink report: {result.model}"
    figures = [
        plots.plot_massive_activations(result),
        plots.plot_sink_ratio(result),
        plots.plot_sink_scores(result),
        plots.plot_alpha(result),
        plots.plot_attention_distance(result),
    ]
    if result.kurtosis is not None:  # scans from before the kurtosis probe have none
        from tl_spikesink.views.kurtosis import plot_kurtosis

        figures.append(plot_kurtosis(result))
    body = [f"<h1>{_esc(title)}</h1>", _summary(result)]
    for fig in extra_figures:
        if not _is_figure(fig):
            raise SpikeSinkError(
                f"extra_figures holds a {type(fig).__name__}; pass plotly figures "
                "(plotly.graph_objects.Figure)"
            )
        figures.append(fig)
    body += ["<h2>Plots</h2>", *(_figure(fig, f"plot-{i}") for i, fig in enumerate(figures))]
    widgets: list[tuple[str, str, RenderedHTML | go.Figure]] = []
    if model is not None:
        widgets = _widgets(result, model, texts, layers, max_widget_tokens, max_attention_tokens)
        body += ["<h2>Widgets</h2>"]
        for i, (heading, caption, w) in enumerate(widgets):
            body += [f"<h3>{_esc(heading)}</h3>", f'<p class="caption">{_esc(caption)}</p>']
            body.append(
                _figure(w, f"widget-plot-{i}") if _is_figure(w) else _mount(w, f"cv-widget-{i}")
            )
    tables = [_extra_table(t, f"table-plot-{i}") for i, t in enumerate(extra_tables)]
    if tables:
        body += ["<h2>Tables</h2>", *tables]
    body.append(_settings(result))
    head = [
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(title)}</title>",
        f"<style>{_CSS}</style>",
        "<script>window.PlotlyConfig = {MathJaxConfig: 'local'};</script>",
        f'<script charset="utf-8">{_inline_js(_plotly_js())}</script>',
    ]
    if any(not _is_figure(w) for _, _, w in widgets):
        head.append(f'<script charset="utf-8">{_inline_js(_circuitsvis_js())}</script>')
        head.append(f"<script>{_MOUNT_JS}</script>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n'
        + "\n".join(head)
        + "\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + "\n</main>\n</body>\n</html>\n"
    )


def _widgets(
    result: ScanResult,
    model: Any,
    texts: Sequence[str] | str | None,
    layers: Sequence[int] | None,
    max_tokens: int,
    max_attention_tokens: int,
) -> list[tuple[str, str, Any]]:
    from tl_spikesink.corpus import default_texts
    from tl_spikesink.views import widgets as w

    if texts is None:
        # Two texts: the top-k widget then has two samples (its layer columns need two).
        texts = default_texts(2)
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise SpikeSinkError("texts is empty; pass at least one text for the widgets, or None")
    k = result.sinks
    if layers is None:
        layers = [int(k.scores.amax(-1).argmax())] if k.scores.numel() else []
    text, note = texts[0], f"text 0 ({_preview(texts[0])}), at most {max_tokens} tokens"
    out: list[tuple[str, str, Any]] = []
    for layer in layers:
        out.append(
            (
                f"Attention heads of layer {layer}",
                f"On text 0 ({_preview(text)}), at most {max_attention_tokens} tokens (CircuitsVis "
                "draws every head's T × T cells). "
                "Head names give the first-token sink score pooled over the scan "
                f"('sink' when above ε = {k.epsilon}); heads are ordered by it, so the zoomed "
                f"head is the layer's strongest. '{w.SINK_MARK.strip()}' marks key tokens "
                "that some head of this layer sinks on in this text. Hover a head to zoom, click "
                "to lock.",
                w.attention_heads_widget(
                    model, text, layer, result=result, max_tokens=max_attention_tokens
                ),
            )
        )
    out.append(
        (
            "Tokens colored by spike magnitude",
            f"On {note}. Value log10(1 + max over channels |x|) of the residual stream after each "
            "layer (3.5 is about 3,000), one color scale for all layers. It opens on the first "
            "button, the layer where this text's largest value appears ('peak'); the buttons "
            "after it are every layer in order. Hover a token for all layers.",
            w.spike_tokens_widget(model, text, result=result, max_tokens=max_tokens),
        )
    )
    channels = ", ".join(map(str, result.spikes.channels)) or "none found; the 3 largest"
    out.append(
        (
            "Top tokens of the spike channels",
            f"On {len(texts)} text(s), at most {max_tokens} tokens each. Channels: {channels}. "
            "Sample picks (text, channel); Site picks the residual stream or a block output "
            "(the MLP output shows the blocks that write and cancel the spike); columns are "
            "layers, opening on the range where the spike appears. Colors and hover values are "
            "fractions of the sample's largest |x| (in its label): 1 and dark blue is the "
            "spike, -1 and dark red its negative, pale is ordinary.",
            w.spike_topk_widget(model, texts, result=result, max_tokens=max_tokens),
        )
    )
    out.append(
        (
            "Sink scores on this text",
            f"On {note}: α_0 of every head on this one text (the Plots section pools the corpus).",
            w.plot_text_sink_scores(model, text, epsilon=k.epsilon, max_tokens=max_tokens),
        )
    )
    return out


def _summary(r: ScanResult) -> str:
    from tl_spikesink.views.text import summary, token_shares

    s, k = r.spikes, r.sinks
    heads = sorted(k.sink_heads, key=lambda lh: -float(k.scores[lh]))
    corpus = ", ".join(c["name"] for c in r.corpus)
    facts = [
        ("model", f"{r.model} ({r.n_layers} layers × {r.n_heads} heads, d_model {r.d_model})"),
        (
            "corpus",
            f"{corpus}: {r.n_texts:,} texts, {r.n_tokens:,} tokens in {r.n_sequences:,} "
            f"sequences (prepend_bos={r.prepend_bos})",
        ),
        (
            "spike rule",
            f"|x| > {num(s.abs_threshold)} and > {num(s.rel_threshold)} × layer median "
            "(hook_resid_post)",
        ),
        ("spike channels", ", ".join(map(str, s.channels)) or "none"),
        ("massive layers", layer_list(s.massive_layers)),
        ("step-up blocks", block_events(s.lifecycle["step_up"], "created")),
        ("step-down blocks", block_events(s.lifecycle["step_down"], "cancelled")),
        (
            "spike tokens",
            f"{len(s.tokens)} ({token_shares(s)})"
            + (" — truncated, raise max_candidates" if s.truncated else ""),
        ),
        (
            "sink ratio (Eq. 28)",
            f"{num(k.sink_ratio)} (mean share of heads with α_k > ε = {k.epsilon} at some key "
            f"k < T/2, over {k.n_ratio_sequences:,} sequences)",
        ),
        (
            "first-token sink ratio",
            f"{num(k.first_token_sink_ratio)} ({len(k.sink_heads)} of "
            f"{r.n_layers * r.n_heads} heads with α₀ > ε = {k.epsilon})",
        ),
        (
            "top sink heads",
            ", ".join(f"L{a}H{b} {float(k.scores[a, b]):.2f}" for a, b in heads[:8]) or "none",
        ),
        (
            "sink tokens",
            f"{len(k.tokens)} ({token_shares(k)}; {pct(r.sink_spike_overlap)} are also spike "
            "tokens)",
        ),
    ]
    rows = "".join(f"<tr><th>{_esc(a)}</th><td>{_esc(b)}</td></tr>" for a, b in facts)
    spike_rows = [
        {
            "text": t.token.text_index,
            "start": t.token.start,
            "position": t.token.position,
            "token": repr(t.text),
            "max value": t.max_value,
            "channels": t.channels,
            "layers": t.layers,
        }
        for t in s.tokens[:_SHOWN_TOKENS]
    ]
    parts = ["<h2>Summary</h2>", f'<table class="facts">{rows}</table>']
    if spike_rows:
        parts.append(_rows_table(f"Largest spike tokens (of {len(s.tokens)})", spike_rows))
    parts.append(f"<details><summary>Text summary</summary><pre>{_esc(summary(r))}</pre></details>")
    return "\n".join(parts)


def _settings(r: ScanResult) -> str:
    settings = {
        "config": dataclasses.asdict(r.config),
        "corpus": list(r.corpus),
        "environment": r.environment,
    }
    text = json.dumps(settings, indent=1, default=str)
    return f"<details><summary>Settings and environment</summary><pre>{_esc(text)}</pre></details>"


def _figure(fig: go.Figure, div_id: str) -> str:
    inner = fig.to_html(
        full_html=False, include_plotlyjs=False, div_id=div_id, config=_PLOTLY_CONFIG
    )
    return f'<div class="figure">{inner}</div>'


def _mount(widget: RenderedHTML, div_id: str) -> str:
    from tl_spikesink.views.widgets import widget_props

    name, props = widget_props(widget)
    # `<` only occurs inside JSON strings, where \u003c means the same and cannot end the script.
    data = json.dumps(props, separators=(",", ":")).replace("<", "\\u003c")
    layer = _open_layer(name, props)
    opens = "" if layer is None else f' data-open-layer="{layer}"'
    return (
        f'<div id="{div_id}" class="cv-widget pending" data-component="{name}"{opens}></div>\n'
        f'<script>tlSpikesink.mount("{div_id}", "{name}", {data});</script>'
    )


def _open_layer(component: str, props: dict[str, Any]) -> int | None:
    """The layer a TopkTokens widget should open on: where sample 0's first site peaks.

    CircuitsVis opens it on layers 0-4; the page's script then picks the range holding this
    layer (:data:`_MOUNT_JS`).
    """
    if component != "TopkTokens" or not props.get("topkVals"):
        return None
    import torch

    from tl_spikesink.views.widgets import peak_layer

    top = torch.tensor(props["topkVals"][0][0], dtype=torch.float64)  # [rank, layer]
    bottom = torch.tensor(props["bottomkVals"][0][0], dtype=torch.float64)
    if not top.numel():
        return None
    return peak_layer(torch.maximum(top.abs().amax(0), bottom.abs().amax(0)))


def _is_figure(x: Any) -> bool:
    return hasattr(x, "to_html") and hasattr(x, "data")


def _extra_table(obj: Any, plot_id: str) -> str:
    from tl_spikesink.evaluation.decoupling import ExperimentTable
    from tl_spikesink.training.ablation import AblationTable

    if isinstance(obj, AblationTable):
        return _ablation_table(obj, plot_id)
    data = obj.to_dict() if hasattr(obj, "to_dict") else obj
    if isinstance(data, list):
        data = {"rows": data}
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise SpikeSinkError(
            f"cannot render a {type(obj).__name__} as a table: give an object whose to_dict() "
            "holds 'rows' (a list of dicts), such a dict, or a list of dicts"
        )
    meta = {k: v for k, v in data.items() if k != "rows"}
    title = str(meta.pop("title", None) or meta.pop("name", None) or type(obj).__name__)
    scalars = {k: v for k, v in meta.items() if not isinstance(v, (list, dict, tuple))}
    note = "; ".join(f"{k}: {_cell(v)}" for k, v in scalars.items())
    table = _rows_table(title, data["rows"], note)
    if isinstance(obj, ExperimentTable):
        from tl_spikesink.views.plots import plot_interventions

        table += "\n" + _figure(plot_interventions(obj), plot_id)
    return table


def _ablation_table(table: Any, plot_id: str) -> str:
    from tl_spikesink.training.ablation import settings_line, summary_rows
    from tl_spikesink.views.training import plot_ablation, plot_emergence

    return "\n".join(
        [
            _rows_table(
                "Ablation (mean ± sd over seeds)", summary_rows(table), settings_line(table)
            ),
            _figure(plot_ablation(table), f"{plot_id}-bars"),
            _figure(plot_emergence(table), f"{plot_id}-emergence"),
        ]
    )


def _rows_table(title: str, rows: list[dict[str, Any]], note: str = "") -> str:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(map(str, row)))
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = []
    for row in rows:
        row = {str(k): v for k, v in row.items()}
        cells = "".join(
            f'<td class="num">{_esc(_cell(row.get(c)))}</td>'
            if isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool)
            else f"<td>{_esc(_cell(row.get(c)))}</td>"
            for c in columns
        )
        body.append(f"<tr>{cells}</tr>")
    caption = f"<h3>{_esc(title)}</h3>" + (f'<p class="caption">{_esc(note)}</p>' if note else "")
    empty = "" if rows else '<p class="caption">(no rows)</p>'
    rows_html = "".join(body)
    table = f'<table class="rows"><thead><tr>{head}</tr></thead><tbody>{rows_html}</tbody></table>'
    return caption + empty + table


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return num(v)
    if isinstance(v, (list, tuple)):
        return ", ".join(map(_cell, v))
    if isinstance(v, dict):
        return json.dumps(v, default=str)
    if hasattr(v, "tolist"):  # tensors and arrays
        return _cell(v.tolist())
    return str(v)


def _preview(text: str, n: int = 40) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= n else text[: n - 1] + "…")


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _inline_js(source: str) -> str:
    """A bundle made safe to inline: no early end of the script element, no source-map fetch."""
    return _SOURCE_MAP.sub("", source).replace("</script", "<\\/script")


@cache
def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


@cache
def _circuitsvis_js() -> str:
    # The file CircuitsVis's own `render_local` inlines into every widget's `local_src`.
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpikeSinkError(
            f"the CircuitsVis bundle {path} cannot be read ({e.strerror}); reinstall circuitsvis"
        ) from None


_MOUNT_JS = """
window.tlSpikesink = {
  queue: [],
  // Every widget is drawn as the page opens, one per task in page order, so the page paints
  // between them. A container records when its content appeared (data-drawn-ms, ms since the
  // page was opened); a TopkTokens widget then opens on the layer range of its spike.
  mount(id, component, props) {
    this.queue.push(() => {
      const el = document.getElementById(id);
      const done = new MutationObserver(() => {
        if (!el.children.length) return;
        done.disconnect();
        el.classList.remove("pending");
        el.dataset.drawnMs = Math.round(performance.now());
        if (el.dataset.openLayer) tlSpikesink.openLayer(el, Number(el.dataset.openLayer));
      });
      done.observe(el, { childList: true });
      el.dataset.mounted = "1";
      CircuitsVis.render(id, CircuitsVis[component], props);
    });
    if (this.queue.length === 1) setTimeout(() => this.next(), 0);
  },
  next() {
    const draw = this.queue.shift();
    if (!draw) return;
    draw();
    if (this.queue.length) setTimeout(() => this.next(), 0);
  },
  // Pick the option of the layer-range selector ("10-14") that holds `layer`, as a reader would.
  openLayer(el, layer) {
    const select = el.querySelector("#neuron-selector");
    if (!select) return;
    const holds = (o) => {
      const [a, b] = o.value.split("-").map(Number);
      return a <= layer && layer <= (Number.isNaN(b) ? a : b);
    };
    const option = [...select.options].find(holds);
    if (!option) return;
    // Also when it looks selected: CircuitsVis's first range ("0-4") is no option when there
    // are fewer layers, and the table then has empty columns until one is picked.
    select.value = option.value;
    select.dispatchEvent(new Event("change", { bubbles: true }));
  },
};
"""

_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; color: #222; margin: 0; background: #fafafa; }
main { max-width: 1200px; margin: 0 auto; padding: 16px 28px 60px; background: white; }
h1 { font-size: 24px; margin: 8px 0 4px; } h2 { margin-top: 34px; border-bottom: 1px solid #ddd; }
h3 { margin: 22px 0 4px; font-size: 16px; }
.caption { color: #555; margin: 2px 0 8px; font-size: 13px; }
table { border-collapse: collapse; margin: 6px 0 14px; font-size: 13px; }
th, td { border: 1px solid #e2e2e2; padding: 3px 8px; text-align: left; vertical-align: top; }
table.facts th { background: #f3f5f8; white-space: nowrap; }
table.rows thead th { background: #f3f5f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: 10px; overflow-x: auto; font-size: 12px; }
.figure { margin: 10px 0 18px; }
.cv-widget { margin: 8px 0 24px; position: relative; }
.cv-widget.pending { min-height: 80px; background: #f6f7f9; }
.cv-widget.pending::before { content: "drawing…"; color: #888; padding: 10px; display: block; }
/* ColoredTokensMulti pads itself by 20 px per layer for its hover table: a blank gap of 600 px
   under a 30-layer model. The hover table floats over what follows instead. */
.cv-widget[data-component="ColoredTokensMulti"] > div { padding-bottom: 8px !important; }
details { margin: 14px 0; } summary { cursor: pointer; color: #335; }
"""


__all__ = ["render_html", "write_html"]
