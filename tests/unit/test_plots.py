"""Plots read back as data: the planted spike, sink head and lifecycle show where planted."""

import math

import plotly.graph_objects as go
import pytest
import torch
from conftest import assert_untouched, state_snapshot
from planted import N_HEADS, N_LAYERS, SINK_HEAD, SPIKE

import tl_spikesink as ts
from tl_spikesink import plots


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
