"""The HTML report: one page, each bundle inlined once, nothing fetched, widgets and tables in."""

import json
import re
import warnings
from dataclasses import dataclass

import pytest
from checks import assert_untouched, state_snapshot
from planted import sentences
from plotly.offline import get_plotlyjs

import tl_spikesink as ts
from tl_spikesink.views.html import _circuitsvis_js, render_html, write_html

WIDGET_TEXTS = sentences(2, seed=3)


@pytest.fixture(scope="module")
def result(planted, texts):
    return ts.scan(planted, texts, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def page(planted, result):
    before = state_snapshot(planted)
    out = render_html(result, model=planted, texts=WIDGET_TEXTS)
    assert_untouched(planted, before)
    return out


@dataclass(frozen=True)
class FakeTable:
    """Stands in for the intervention and claims tables: `to_dict()` with `rows`."""

    def to_dict(self):
        return {
            "title": "Interventions",
            "model": "planted",
            "rows": [
                {"intervention": "zero spike", "ppl": 12.5, "ratio": float("nan")},
                {"intervention": "<b>mean</b>", "ppl": 3.25, "layers": [1, 2]},
            ],
        }


def test_each_bundle_is_inlined_exactly_once(page):
    plotly_head = get_plotlyjs()[:300]
    assert page.count(plotly_head) == 1
    assert page.count("var CircuitsVis=") == 1
    assert page.count(_circuitsvis_js()[:300]) == 1
    assert "sourceMappingURL" not in page  # a source map would be fetched when DevTools open


def test_nothing_is_loaded_from_elsewhere(page):
    assert not re.search(r"<script[^>]*\bsrc=", page)
    assert not re.search(r"<link\b", page)
    assert "unpkg.com" not in page and "cdn.plot.ly/plotly" not in page
    assert not re.search(r"""from\s*["']https?:""", page)  # no ES module imports from a CDN
    assert 'type="module"' not in page


def test_plots_and_widgets_are_all_on_the_page(page):
    # 5 scan plots, the kurtosis curve and the per-text sink-score heatmap, each a plotly div
    # with its own newPlot call.
    assert page.count('class="plotly-graph-div"') == 7
    assert page.count("Plotly.newPlot(") == 7
    mounts = re.findall(r'tlSpikesink\.mount\("(cv-widget-\d+)", "(\w+)", ', page)
    assert [name for _, name in mounts] == ["AttentionHeads", "ColoredTokensMulti", "TopkTokens"]
    for div_id, _ in mounts:
        assert page.count(f'<div id="{div_id}"') == 1
    # The planted sink head (layer 0 holds the strongest) is the one shown and named.
    assert "Attention heads of layer 0" in page and '"L0H0 sink 1.00"' in page
    # The top-k widget opens on the layer range of the planted spike (layer 1).
    assert 'data-component="TopkTokens" data-open-layer="1"' in page


def test_attention_widget_is_capped_and_token_widgets_are_not(planted, result):
    text = " ".join(sentences(8, seed=4))  # more tokens than both caps
    page = render_html(
        result, model=planted, texts=[text], max_attention_tokens=10, max_widget_tokens=50
    )
    props = {
        name: json.loads(data)
        for name, data in re.findall(
            r'tlSpikesink\.mount\("cv-widget-\d+", "(\w+)", (.*?)\);</script>', page
        )
    }
    assert len(props["AttentionHeads"]["tokens"]) == 10
    assert len(props["ColoredTokensMulti"]["tokens"]) == 50
    assert len(props["TopkTokens"]["tokens"][0]) == 50


def test_widget_props_survive_embedding(page, planted, result):
    from tl_spikesink.views.widgets import attention_heads_widget, widget_props

    widget = attention_heads_widget(planted, WIDGET_TEXTS[0], 0, result=result, max_tokens=48)
    _, expected = widget_props(widget)
    call = re.search(
        r'tlSpikesink\.mount\("cv-widget-0", "AttentionHeads", (.*?)\);</script>', page
    )
    assert json.loads(call.group(1)) == expected


def test_summary_facts(page):
    assert "<th>spike channels</th><td>7</td>" in page
    assert "<th>step-up blocks</th><td>layer 1 mlp = paper block " in page
    assert "<th>top sink heads</th><td>L0H0 1.00</td>" in page
    assert "&lt;bos&gt;" in page  # token strings escaped in the spike-token table


def test_no_model_means_no_widgets_and_no_circuitsvis(result):
    page = render_html(result)
    assert "var CircuitsVis=" not in page and "tlSpikesink.mount(" not in page
    assert page.count('class="plotly-graph-div"') == 6
    assert page.count(get_plotlyjs()[:300]) == 1


def test_extra_tables_render_rows_generically(result, tmp_path):
    path = write_html(
        result,
        tmp_path / "r.html",
        extra_tables=[
            FakeTable(),
            {"title": "Claims", "rows": [{"claim": "sink = spike", "holds": True}]},
        ],
    )
    page = path.read_text()
    assert "<h3>Interventions</h3>" in page and "model: planted" in page
    assert "<th>intervention</th><th>ppl</th><th>ratio</th><th>layers</th>" in page
    assert '<td class="num">12.5</td>' in page and "<td>1, 2</td>" in page
    assert "&lt;b&gt;mean&lt;/b&gt;" in page and "<b>mean</b>" not in page
    assert "<h3>Claims</h3>" in page and "<td>True</td>" in page
    with pytest.raises(ts.SpikeSinkError, match="to_dict"):
        render_html(result, extra_tables=[{"no": "rows"}])


def test_cli_writes_the_report(planted, tmp_path, monkeypatch):
    
    from tl_spikesink.cli import commands as cli
    from tl_spikesink.cli import options

    monkeypatch.setattr(options, "load_model", lambda args: planted)
    text_file = tmp_path / "texts.txt"
    text_file.write_text("\n".join(sentences(5)) + "\n")
    for command in ("report", "scan"):
        out = tmp_path / f"{command}.html"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            code = cli.main(
                [command, "--text-file", str(text_file), "--html", str(out), "--no-progress"]
            )
        assert code == 0
        page = out.read_text()
        assert page.count("var CircuitsVis=") == 1 and "tlSpikesink.mount(" in page
        assert "texts.txt: 5 texts" in page


def test_experiment_table_and_extra_figures(planted, texts, result):
    # A real decoupling table on the planted model (two interventions keep it fast).
    calibration = sentences(8, seed=11)
    interventions = [
        ts.spike_ablation(result, mode="zero", model=planted),
        ts.sink_key_removal(result, heads="sink", model=planted),
    ]
    before = state_snapshot(planted)
    table = ts.experiment(
        planted, texts[:8], interventions, calibration=calibration, progress=False
    )
    assert_untouched(planted, before)
    extra = ts.plot_sink_ratio(result).update_layout(title_text="An extra figure")
    page = render_html(result, extra_tables=[table], extra_figures=[extra])

    assert page.count(get_plotlyjs()[:300]) == 1
    # 5 scan plots and the kurtosis curve, then the extra figure, in the Plots section; the
    # table's chart below it.
    assert page.count('class="plotly-graph-div"') == 8
    assert "Excess kurtosis of the residual stream" in page[page.index('id="plot-5"') :]
    assert page.index('id="plot-6"') < page.index("<h2>Tables</h2>") < page.index("table-plot-0")
    assert "An extra figure" in page[page.index('id="plot-6"') :]
    assert "<td>zero spikes</td>" in page and "<td>no sink key (sink heads)</td>" in page
    chart = re.search(r'Plotly\.newPlot\(\s*"table-plot-0",\s*(\[.*?\]),\s*\{', page, re.S)
    traces = {t["name"]: t for t in json.loads(chart.group(1)) if t.get("meta") != "legend"}
    assert set(traces) == {"perplexity", "KL", "spike/median", "sink ratio"}
    assert traces["perplexity"]["y"] == ["clean", "zero spikes", "no sink key (sink heads)"]
    assert traces["perplexity"]["x"][0] == pytest.approx(table.rows[0].perplexity)
    assert traces["sink ratio"]["x"][2] == 0.0

    with pytest.raises(ts.SpikeSinkError, match="extra_figures holds a dict"):
        render_html(result, extra_figures=[{"data": []}])
