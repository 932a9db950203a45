"""Plots read back as data: the planted spike, sink head and lifecycle show where planted."""

import math

import plotly.graph_objects as go
import pytest
import torch
from checks import assert_untouched, state_snapshot
from planted import N_HEADS, N_LAYERS, SINK_HEAD, SPIKE

import tl_spikesink as ts
from tl_spikesink.views import plots


@pytest.fixture(scope="module")
def result(planted, texts):
    before = state_snapshot(planted)
    r = ts.scan(planted, texts, batch_size=8, progress=False)
    assert_untouched(planted, before)
    return r


def trace(fig, name, site=None):
    found = [t for t in fig.data if t.name == name and (site is None or t.meta == site)]
    assert len(found) == 1, f"expected one trace {name!r} ({site}), got {len(found)}"
    return found[0]


def test_massive_activations_show_the_planted_spike_and_its_lifecycle(result):
    fig = plots.plot_massive_activations(result)
    assert isinstance(fig, go.Figure)
    top1 = trace(fig, "top 1", "resid_post").y
    assert top1[1] == pytest.approx(SPIKE, rel=1e-3)
    assert top1[0] < 10 and top1[2] < 10  # before the step-up block and after the step-down block
    assert trace(fig, "top 3", "resid_post").y[1] == pytest.approx(
        SPIKE, rel=1e-3
    )  # BOS and "." alike
    median = trace(fig, "median", "resid_post").y
    assert median == pytest.approx(result.spikes.median("resid_post").tolist())
    cut = trace(fig, "massive cut", "resid_post").y
    assert cut == pytest.approx([max(100.0, 1000 * m) for m in median])
    # Layer 1's MLP writes the spike, layer 2's MLP writes its negative: both show in the MLP panel.
    mlp = trace(fig, "top 1", "mlp_out").y
    assert mlp[1] == pytest.approx(SPIKE, rel=1e-3) and mlp[2] == pytest.approx(SPIKE, rel=1e-3)
    # The planted attention writes nothing: zeros (and the zero-bin median) leave gaps on log axes.
    assert all(v is None for v in trace(fig, "top 1", "attn_out").y)
    assert all(v is None for v in trace(fig, "median", "attn_out").y)
    assert {fig.layout[f"yaxis{i}"].type for i in ("", "2", "3")} == {"log"}
    lines = {(s.name, s.x0) for s in fig.layout.shapes}
    assert lines == {("step-up block", 1), ("step-down block", 2)}
    assert len(fig.layout.shapes) == 2 * len(result.spikes.sites)  # one line per panel


def test_sink_ratio_per_layer(result):
    fig = plots.plot_sink_ratio(result)
    assert list(trace(fig, "sink ratio").y) == pytest.approx([1 / N_HEADS, 0.0, 0.0])
    assert fig.layout.shapes[0].y0 == pytest.approx(1 / (N_LAYERS * N_HEADS))
    # The overall ratio is named in the legend, not by a label that sat on the bars.
    assert fig.layout.shapes[0].name == f"all layers {1 / (N_LAYERS * N_HEADS):.3f} (Eq. 28)"
    assert fig.layout.shapes[0].showlegend and not fig.layout.annotations


def test_alpha_by_position_draws_the_sink_head(result):
    fig = plots.plot_alpha(result, max_position=10)
    sink = trace(fig, "L{}H{}".format(*SINK_HEAD)).y
    assert len(sink) == 10
    assert sink[0] == pytest.approx(1.0, abs=1e-4) and max(sink[1:]) < 1e-3
    mean = trace(fig, "mean over heads").y
    assert mean[0] == pytest.approx(float(result.sinks.alpha[:, :, 0].mean()))
    assert [t.name for t in fig.data] == ["mean over heads", "L0H0"]


def test_sink_score_heatmap_outlines_the_sink_head(result):
    fig = plots.plot_sink_scores(result)
    z = torch.tensor(trace(fig, "sink score").z)
    assert z.shape == (N_LAYERS, N_HEADS)
    assert z[SINK_HEAD] == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(z, result.sinks.scores.float())
    (rect,) = fig.layout.shapes
    layer, head = SINK_HEAD
    assert (rect.x0, rect.x1, rect.y0, rect.y1) == (
        head - 0.5,
        head + 0.5,
        layer - 0.5,
        layer + 0.5,
    )
    assert rect.name.startswith("sink heads")


def test_attention_distance_separates_sink_heads(result):
    fig = plots.plot_attention_distance(result)
    sink, other = trace(fig, "sink heads"), trace(fig, "other heads")
    assert len(sink.x) == 1 and len(other.x) == N_LAYERS * N_HEADS - 1
    assert sink.text[0].startswith("L0H0")
    k = result.sinks
    assert sink.x[0] == pytest.approx(float(k.attention_distance[SINK_HEAD]))
    assert sink.y[0] == pytest.approx(float(k.attention_distance_without_sink[SINK_HEAD]))
    # The sink head looks far back only because of the sink: without it, it is the most local.
    assert sink.x[0] > max(other.x) and sink.y[0] < min(other.y)


def test_figures_serialize_without_nan(result):
    for fig in (
        plots.plot_massive_activations(result),
        plots.plot_sink_ratio(result),
        plots.plot_alpha(result),
        plots.plot_sink_scores(result),
        plots.plot_attention_distance(result),
    ):
        text = fig.to_json()
        assert "NaN" not in text and fig.layout.title.text
        for t in fig.data:
            ys = getattr(t, "y", None) or ()
            assert not any(isinstance(v, float) and math.isnan(v) for v in ys)


# ---------------------------------------------------------------- the decoupling table


def known_table():
    """A decoupling table with hand-picked numbers, one row per kind of intervention."""
    from tl_spikesink.evaluation.decoupling import ExperimentRow, ExperimentTable

    def row(name, ppl, kl, ratio, sink, kind=None, n_nonfinite=0):
        loss = math.log(ppl) if ppl == ppl else float("nan")
        return ExperimentRow(
            name=name,
            loss=loss,
            delta_loss=loss - math.log(20.0),
            perplexity=ppl,
            kl=kl,
            top1_agreement=1.0,
            max_spike_ratio=ratio,
            sink_ratio=sink,
            first_token_sink_ratio=sink,
            sink_head_distance=5.0,
            sink_head_distance_without_sink=2.0,
            n_spike_tokens=3,
            n_nonfinite=n_nonfinite,
            settings={"kind": kind} if kind else {},
        )

    nan = float("nan")
    return ExperimentTable(
        model="toy",
        rows=(
            row("clean", 20.0, 0.0, 1.5e4, 0.75),
            row("zero spikes", 9.0e6, 13.0, 900.0, 0.5, "spike_ablation"),
            row("mean spikes", 21.0, 0.002, 1.4e4, 0.74, "spike_ablation"),
            row("no sink key (all heads)", 30.0, 0.4, 1.5e4, 0.0, "sink_key_removal"),
            row("norm: fixed_scale", nan, nan, nan, 0.25, "norm_swap", n_nonfinite=7),
        ),
        corpus={"name": "toy corpus", "n_tokens": 1234},
        calibration=None,
        split="by hand",
        config=ts.ScanConfig(rel_threshold=1000.0),
        sink_heads=((0, 0),),
        spike_channels=(7,),
    )


def test_interventions_chart_reads_back_the_table():
    fig = ts.plot_interventions(known_table())
    labels = [
        "clean",
        "zero spikes",
        "mean spikes",
        "no sink key (all heads)",
        "norm: fixed_scale (overflow)",
    ]
    ppl, kl = trace(fig, "perplexity"), trace(fig, "KL")
    spikes, sinks = trace(fig, "spike/median"), trace(fig, "sink ratio")
    for t in (ppl, kl, spikes, sinks):
        assert list(t.y) == labels and t.orientation == "h"
    # Non-finite values, and the clean KL of 0 on a log axis, have no bar.
    assert list(ppl.x) == [20.0, 9.0e6, 21.0, 30.0, None]
    assert list(kl.x) == [None, 13.0, 0.002, 0.4, None]
    assert list(spikes.x) == [1.5e4, 900.0, 1.4e4, 1.5e4, None]
    assert list(sinks.x) == [0.75, 0.5, 0.74, 0.0, 0.25]  # linear axis: 0 is a bar
    axes = [fig.layout[f"xaxis{i}"].type for i in ("", "2", "3", "4")]
    assert axes == ["log", "log", "log", "linear"]
    assert fig.layout.yaxis.autorange == "reversed"  # clean on top
    lines = {s.name: s.x0 for s in fig.layout.shapes}
    assert lines == {"clean perplexity": 20.0, "massive ratio": 1000.0, "clean sink ratio": 0.75}
    # Colored by kind: the two spike ablations alike, clean and the others each their own.
    colors = list(ppl.marker.color)
    assert colors[1] == colors[2] and len({colors[0], colors[1], colors[3], colors[4]}) == 4
    legend = [t.name for t in fig.data if t.meta == "legend"]
    assert legend == ["clean", "spike ablation", "sink key removal", "norm swap"]
    assert "toy" in fig.layout.title.text and "1,234 tokens" in fig.layout.title.text
    assert "NaN" not in fig.to_json()
