"""Sink-head locality (§4.3.3): window shares and the causal window test, on planted heads."""

import json

import pytest
import torch
from checks import assert_untouched, state_snapshot
from planted import SINK_HEAD, UNIFORM_HEAD, planted_local_sink, sentences

import tl_spikesink as ts
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.interventions import window_attention
from tl_spikesink.mechanism.locality import locality

LONG = sentences(12, min_words=40, max_words=60)


def _pattern(model, text, intervention, layer_head):
    layer, head = layer_head
    with intervention.applied(model):
        _, cache = model.run_with_cache(model.to_tokens(text))
    return cache["pattern", layer][0, head]


def test_window_attention_keeps_exactly_the_sinks_and_the_window(planted):
    before = state_snapshot(planted)
    for sinks in (0, 1, 2):
        iv = window_attention([UNIFORM_HEAD], 4, sinks=sinks, model=planted)
        p = _pattern(planted, LONG[0], iv, UNIFORM_HEAD)
        for q in range(p.shape[0]):
            visible = sorted({*range(min(sinks, q + 1)), *range(max(0, q - 3), q + 1)})
            expected = torch.zeros(p.shape[1])
            expected[visible] = 1 / len(visible)  # the planted head is uniform over what it sees
            torch.testing.assert_close(p[q], expected, atol=1e-6, rtol=0)
    assert_untouched(planted, before)


def test_window_attention_without_the_sink_key_loses_the_sink(planted):
    keep = _pattern(planted, LONG[0], window_attention([SINK_HEAD], 8, model=planted), SINK_HEAD)
    lose = _pattern(
        planted, LONG[0], window_attention([SINK_HEAD], 8, sinks=0, model=planted), SINK_HEAD
    )
    assert float(keep[20:, 0].min()) > 0.99
    assert float(lose[20:, 0].max()) == 0.0


def test_window_attention_rejects_bad_arguments(planted):
    with pytest.raises(SpikeSinkError, match="no head"):
        window_attention([], 8)
    with pytest.raises(SpikeSinkError, match="window must be"):
        window_attention([SINK_HEAD], 0)
    with pytest.raises(SpikeSinkError):
        window_attention([(9, 0)], 8, model=planted)


def test_uniform_head_window_share_is_the_counting_formula(planted):
    loc = locality(planted, LONG, min_query=16)
    lengths = [planted.to_tokens(t).shape[1] for t in LONG]
    queries = [q for n in lengths for q in range(16, n)]
    rest = sum(q / (q + 1) for q in queries)  # keys 1..q, each 1/(q+1)
    layer, head = UNIFORM_HEAD
    for i, w in enumerate(loc.windows):
        inside = sum(min(w, q) / (q + 1) for q in queries)
        assert float(loc.share[i, layer, head]) == pytest.approx(inside / rest, rel=1e-5)
    assert loc.n_queries == len(queries)


def test_a_planted_local_sink_head_is_local_and_cheap_to_restrict():
    model = planted_local_sink()
    before = state_snapshot(model)
    scan = ts.scan(model, LONG, progress=False)
    assert SINK_HEAD in scan.sinks.sink_heads
    loc = locality(model, LONG, scan, min_query=16)
    assert loc.sink_heads == (SINK_HEAD,) and loc.control_heads == (UNIFORM_HEAD,)
    for i in range(len(loc.windows)):
        assert loc.sink_share(i) > loc.other_share(i)
    assert loc.sink_share(1) > 0.95  # w = 16 holds (almost) all of its non-sink attention
    assert abs(loc.delta_loss_sink) < 1e-4 < abs(loc.delta_loss_control)
    assert loc.verdict[0] == "holds"
    d = json.loads(loc.to_json())
    assert d["verdict"] == "holds" and len(d["sink_share"]) == 3
    assert_untouched(model, before)


def test_a_sink_head_with_nothing_beyond_the_sink_is_not_applicable(planted):
    # The planted sink head's score margin underflows softmax: no non-sink attention to share.
    loc = locality(planted, LONG, min_query=16)
    assert loc.sink_heads == (SINK_HEAD,)
    assert torch.isnan(loc.share[:, 0, 0]).all() and not torch.isnan(loc.share[:, 0, 1]).any()
    assert loc.verdict == (
        "not applicable", "sink heads give no attention beyond the first token"
    )


def test_short_texts_give_not_applicable(planted, texts):
    loc = locality(planted, texts, min_query=64)
    assert loc.n_queries == 0
    assert loc.verdict == ("not applicable", "no query at position ≥ 64: texts too short")


def test_an_encoder_has_no_recent_window(planted):
    import copy

    encoder = copy.deepcopy(planted)
    encoder.cfg.attention_dir = "bidirectional"
    with pytest.raises(SpikeSinkError, match="causal attention"):
        locality(encoder, LONG)
