"""Widgets mark the planted sink head and spike, read the model only, and work offline."""

import copy
import math

import pytest
import torch
from checks import assert_untouched, state_snapshot
from circuitsvis.utils.render import RenderedHTML
from planted import N_HEADS, N_LAYERS, SINK_HEAD, SPIKE, SPIKE_CHANNEL, sentences

import tl_spikesink as ts
from tl_spikesink.views import widgets
from tl_spikesink.views.widgets import SINK_MARK, widget_props

TEXT = "the cat sat on the mat . then it ran under a big red rug"


@pytest.fixture(scope="module")
def result(planted, texts):
    return ts.scan(planted, texts, batch_size=8, progress=False)


def test_attention_heads_mark_the_planted_sink_head_and_column(planted):
    before = state_snapshot(planted)
    w = widgets.attention_heads_widget(planted, TEXT, layer=0)
    assert_untouched(planted, before)
    assert isinstance(w, RenderedHTML)
    name, props = widget_props(w)
    assert name == "AttentionHeads"
    n = len(TEXT.split()) + 1  # + BOS
    attention = torch.tensor(props["attention"])
    assert attention.shape == (N_HEADS, n, n)
    assert torch.allclose(attention.sum(-1), torch.ones(N_HEADS, n), atol=0.01)  # rows, 3 decimals
    sink_name, other_name = props["attentionHeadNames"]
    assert sink_name == "L0H0 sink 1.00"
    assert other_name.startswith("L0H1 ") and "sink" not in other_name
    assert props["tokens"][0] == "<bos>" + SINK_MARK  # canvas labels: not HTML-escaped
    assert not any(t.endswith(SINK_MARK) for t in props["tokens"][1:])


def test_attention_heads_take_scores_from_the_scan(planted, result):
    _, props = widget_props(widgets.attention_heads_widget(planted, TEXT, 0, result=result))
    uniform = float(result.sinks.scores[0, 1])
    assert props["attentionHeadNames"] == ["L0H0 sink 1.00", f"L0H1 {uniform:.2f}"]
    _, props = widget_props(widgets.attention_heads_widget(planted, TEXT, 1, result=result))
    assert not any("sink" in h for h in props["attentionHeadNames"])
    assert not any(t.endswith(SINK_MARK) for t in props["tokens"])


def test_attention_heads_open_on_the_strongest_sink_head(planted, result):
    # CircuitsVis zooms on the first head: heads come strongest first, each with its pattern.
    _, plain = widget_props(widgets.attention_heads_widget(planted, TEXT, 0, result=result))
    swapped = copy.deepcopy(result)
    count = swapped.sinks.alpha_count[0]  # scores are the pooled α_0: sum / count
    swapped.sinks.alpha_sum[0, :, 0] = torch.tensor([0.5, 0.9]) * count
    _, props = widget_props(widgets.attention_heads_widget(planted, TEXT, 0, result=swapped))
    assert props["attentionHeadNames"] == ["L0H1 sink 0.90", "L0H0 sink 0.50"]
    assert props["attention"] == [plain["attention"][1], plain["attention"][0]]
    assert props["tokens"] == plain["tokens"]


def test_attention_heads_truncate_long_texts(planted):
    _, props = widget_props(widgets.attention_heads_widget(planted, TEXT, 0, max_tokens=5))
    assert len(props["tokens"]) == 5 and torch.tensor(props["attention"]).shape == (N_HEADS, 5, 5)


def test_spike_tokens_are_colored_by_log_magnitude_per_layer(planted):
    w = widgets.spike_tokens_widget(planted, TEXT)
    name, props = widget_props(w)
    assert name == "ColoredTokensMulti"
    tokens, values = props["tokens"], torch.tensor(props["values"])
    assert values.shape == (len(tokens), 1 + N_LAYERS)
    # CircuitsVis opens on the first button: the spike's layer, then every layer in order.
    assert props["labels"] == ["L1 peak", "L0", "L1", "L2"]
    assert torch.equal(values[:, 0], values[:, 2])
    values = values[:, 1:]
    # ColoredTokensMulti renders tokens as HTML: BOS must be escaped or it vanishes as a tag.
    assert tokens[0] == "&lt;bos&gt;"
    spiky = [i for i, t in enumerate(tokens) if t in ("&lt;bos&gt;", ".")]
    assert spiky == [0, TEXT.split().index(".") + 1]
    for i in range(len(tokens)):
        expected = math.log10(1 + SPIKE) if i in spiky else None
        if expected:
            assert values[i, 1].item() == pytest.approx(expected, abs=2e-3)
        else:
            assert values[i, 1] < 1.0
    assert values[:, 0].max() < 1.0 and values[:, 2].max() < 1.0  # before step-up, after step-down
    assert props["positiveBounds"] == [pytest.approx(values.max().item())] * (1 + N_LAYERS)


def test_peak_layer_is_where_the_spike_first_appears():
    assert widgets.peak_layer(torch.tensor([1.0, 900.0, 1000.0, 990.0, 5.0])) == 1
    assert widgets.peak_layer(torch.tensor([1.0, 400.0, 1000.0])) == 2
    assert widgets.peak_layer(torch.tensor([0.5, 3.2, 3.4]), log=True) == 1  # log10 magnitudes
    assert widgets.peak_layer(torch.tensor([0.5, 2.9, 3.4]), log=True) == 2


def test_topk_tokens_of_the_spike_channel(planted, result):
    texts = sentences(3, seed=7)
    w = widgets.spike_topk_widget(planted, texts, result=result, k=3)
    name, props = widget_props(w)
    assert name == "TopkTokens"
    for label, i in zip(props["sampleLabels"], range(3), strict=True):
        # The sample's largest |x| (the spike, written by the MLP of layer 1) names its scale.
        text, scale = label.split(" · max |x| ")
        assert text == f"text {i} · ch {SPIKE_CHANNEL}"
        assert float(scale) == pytest.approx(SPIKE, rel=1e-2)
    assert props["firstDimensionLabels"] == ["resid_post", "attn_out", "mlp_out"]
    assert props["thirdDimensionName"] == "Layer"
    for sample, tokens in enumerate(props["tokens"]):
        # CircuitsVis colors on a fixed 0..1 scale: values are fractions of the sample's largest
        # |x|, so the spike is 1 (dark) and ordinary tokens are pale, not one solid color.
        resid = torch.tensor(props["topkVals"][sample][0])  # [rank, layer] of the residual stream
        assert resid.shape == (3, N_LAYERS)
        assert resid[0, 1].item() == pytest.approx(1.0, abs=2e-3)
        assert resid[0, 0].item() < 0.01 and resid[0, 2].item() < 0.01
        top_token = tokens[props["topkIdxs"][sample][0][0][1]]
        assert top_token in ("&lt;bos&gt;", ".")
        # The MLP of layer 1 writes the spike; the MLP of layer 2 writes its negative.
        assert props["topkVals"][sample][2][0][1] == pytest.approx(1.0, abs=2e-3)
        # (CircuitsVis lists bottom-k descending: the most negative comes last.)
        assert props["bottomkVals"][sample][2][-1][2] == pytest.approx(-1.0, abs=2e-3)
        every = torch.tensor([props["topkVals"][sample], props["bottomkVals"][sample]])
        assert every.abs().max() <= 1.0


def test_topk_tokens_find_channels_without_a_scan(planted):
    _, props = widget_props(widgets.spike_topk_widget(planted, TEXT))
    labels = props["sampleLabels"]
    assert any(label.startswith(f"text 0 · ch {SPIKE_CHANNEL} · ") for label in labels)
    assert len(props["sampleLabels"]) == 3


def test_text_sink_scores_is_a_heatmap_of_this_text(planted):
    fig = widgets.plot_text_sink_scores(planted, TEXT)
    z = torch.tensor(fig.data[0].z)
    assert z.shape == (N_LAYERS, N_HEADS)
    assert z[SINK_HEAD] == pytest.approx(1.0, abs=1e-4)
    n = len(TEXT.split()) + 1
    harmonic = sum(1 / (i + 1) for i in range(n)) / n  # α_0 of a uniform head on one text
    assert z[1, 0] == pytest.approx(harmonic, abs=1e-4)


def test_widgets_leave_the_model_untouched(planted, result):
    before = state_snapshot(planted)
    widgets.spike_tokens_widget(planted, TEXT, result=result)
    widgets.spike_topk_widget(planted, [TEXT, TEXT], result=result)
    widgets.plot_text_sink_scores(planted, TEXT)
    assert_untouched(planted, before)


def test_offline_source_embeds_the_bundle(planted):
    w = widgets.attention_heads_widget(planted, TEXT, 0)
    assert "unpkg.com" in str(w)  # CircuitsVis's own str() needs the network ...
    assert (
        "unpkg.com" not in w.local_src and "var CircuitsVis=" in w.local_src
    )  # ... local_src does not


def test_clear_errors(planted):
    with pytest.raises(ts.SpikeSinkError, match="layer 7 does not exist"):
        widgets.attention_heads_widget(planted, TEXT, layer=7)
    with pytest.raises(ts.SpikeSinkError, match="at least one text"):
        widgets.spike_topk_widget(planted, [])
    with pytest.raises(ts.SpikeSinkError, match="cannot read the component"):
        widget_props(RenderedHTML("<div></div>", "<div></div>"))
