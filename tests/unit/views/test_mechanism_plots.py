"""Mechanism figures read back as data: the planted spike, trigger, sink head and claims show."""

import plotly.graph_objects as go
import pytest
from planted import SINK_HEAD, SPIKE_CHANNEL, UNIFORM_HEAD, planted_with_values

import tl_spikesink as ts
from tl_spikesink import mechanism as mech
from tl_spikesink.views import mechanism as mp
from tl_spikesink.mechanism.claims import claims


@pytest.fixture(scope="module")
def model():
    return planted_with_values()


@pytest.fixture(scope="module")
def scan(model, texts):
    return ts.scan(model, texts, progress=False)


def trace(fig, name):
    found = [t for t in fig.data if t.name == name]
    assert len(found) == 1, f"expected one trace {name!r}, got {len(found)}"
    return found[0]


def test_silu_scatter_puts_spike_tokens_at_the_identity(model, texts, scan):
    r = mech.silu_regime(model, texts, scan)
    fig = mp.plot_silu_regime(r)
    assert isinstance(fig, go.Figure)
    spike, other = trace(fig, "spike tokens"), trace(fig, "other tokens")
    assert len(spike.x) == int(r.is_spike.sum()) and len(other.x) == int((~r.is_spike).sum())
    assert spike.y == pytest.approx([1.0] * len(spike.y), abs=1e-5)
    assert spike.x == pytest.approx(r.norm_ratio[r.is_spike].tolist())
    # Ordinary tokens have a zero gate vector: cosine 0 (plotted) and ratio 0/0 clamped to 0.
    assert set(other.y) == {0.0}
    assert trace(fig, "identity").x == (1.0,)


def test_quadratic_figures_mark_the_spike_channel_and_lambda_star(model, texts, scan):
    q = mech.quadratic_form(model, texts, scan)
    norms = mp.plot_quadratic_norms(q)
    assert len(trace(norms, "channels").y) == 16
    spike = trace(norms, "spike channels")
    assert spike.x == (SPIKE_CHANNEL,)
    w = abs(float(model.blocks[1].mlp.W_out[0, SPIKE_CHANNEL].detach()))
    assert spike.y[0] == pytest.approx(w, rel=1e-5)
    assert norms.layout.yaxis.type == "log"
    spectrum = mp.plot_quadratic_spectrum(q)
    s7 = trace(spectrum, f"S_{SPIKE_CHANNEL}")
    assert s7.meta == SPIKE_CHANNEL and len(s7.y) == 16
    star = trace(spectrum, "λ*")
    assert star.y[0] == pytest.approx(float(q.lambda_star[0]), rel=1e-6)
    assert s7.y[star.x[0]] == pytest.approx(star.y[0])


def test_representations_line_jumps_to_one_at_the_spike_layer(model, texts, scan):
    r = mech.representations(model, texts, scan)
    fig = mp.plot_representations(r)
    spike = trace(fig, "spike tokens").y
    assert spike == pytest.approx(r.resid_cosine.tolist())
    assert spike[1] == pytest.approx(1.0, abs=1e-5) and spike[0] < 0.95
    assert trace(fig, "other tokens").y == pytest.approx(r.other_resid_cosine.tolist())
    assert [s.x0 for s in fig.layout.shapes] == [1]


def test_head_scatter_shows_the_sink_head_writing_nothing(model, texts, scan):
    d = mech.head_decomposition(model, texts, scan)
    fig = mp.plot_head_decomposition(d)
    sink, other = trace(fig, "sink heads"), trace(fig, "other heads")
    assert len(sink.x) == 1 and len(other.x) == 5
    assert tuple(sink.customdata[0][:2]) == SINK_HEAD
    assert sink.x[0] > 0.99 and sink.y[0] < 0.02
    (uniform,) = [i for i, c in enumerate(other.customdata) if tuple(c[:2]) == UNIFORM_HEAD]
    assert other.y[uniform] == pytest.approx(float(d.relative_norm[UNIFORM_HEAD]))
    assert other.customdata[uniform][2] == 0.0  # nothing flows from the sink tokens' values
    # Silent layers have no relative norm: gaps, not zeros.
    assert sum(y is None for y in other.y) == 4


def test_claims_table_figure_colours_verdicts(planted, texts):
    table = claims(planted, texts[:8])
    fig = mp.plot_claims(table)
    (t,) = fig.data
    assert isinstance(t, go.Table)
    links, _, measured, _, verdicts, _ = t.cells.values
    assert list(links) == [r.link for r in table.rows]
    assert list(verdicts) == [r.verdict for r in table.rows]
    colors = t.cells.fill.color[0]
    assert {c for c, v in zip(colors, verdicts, strict=True) if v == "holds"} == {"#d9f2d9"}
    assert measured[-1] == "—"  # the planted heads write nothing: not applicable


def test_views_are_exported_lazily():
    import subprocess
    import sys

    code = "import sys, tl_spikesink; print('tl_spikesink.views.mechanism' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert ts.views.mechanism.plot_head_decomposition is mp.plot_head_decomposition
