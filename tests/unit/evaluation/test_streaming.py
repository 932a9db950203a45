"""StreamingLLM's window attention, with and without sinks, on planted heads."""

import json

import pytest
from checks import assert_untouched, state_snapshot
from planted import SINK_HEAD, planted_local_sink, sentences

import tl_spikesink as ts
from tl_spikesink.corpus import tokenize
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.evaluation.streaming import streaming

TEXTS = sentences(40, min_words=30, max_words=50)


@pytest.fixture(scope="module")
def model():
    return planted_local_sink()


def test_full_attention_loss_is_the_evaluation_loss(model):
    s = streaming(model, TEXTS, windows=(8,), sinks=(1,), seq_len=64, progress=False)
    corpus = tokenize(model, "\n\n".join(TEXTS), name="stream", max_seq_len=64, max_tokens=16_384)
    assert s.n_tokens == corpus.n_tokens
    assert s.full_loss == pytest.approx(ts.evaluate(model, corpus, progress=False).loss, rel=1e-6)


def test_a_local_sink_head_needs_its_sink_and_nothing_else(model):
    before = state_snapshot(model)
    s = streaming(model, TEXTS, windows=(16,), sinks=(0, 1), heads=[SINK_HEAD], seq_len=64,
                  progress=False)  # fmt: skip
    without, with_sink = s.rows
    assert (without.sinks, with_sink.sinks) == (0, 1)
    # Its non-sink attention lies inside 16 keys: keeping the first key changes nothing.
    assert abs(with_sink.delta_loss) < 1e-4
    # Without it, the ~80 % it gave the first token spreads over the window and its output moves.
    assert abs(without.delta_loss) > 1e-3 and abs(without.loss_beyond - s.full_loss_beyond[16]) > 1e-3
    d = json.loads(s.to_json())
    assert set(d) >= {"full_perplexity", "rows"}
    assert set(d["rows"][0]) >= {"window", "sinks", "perplexity", "delta_loss"}
    assert_untouched(model, before)


def test_sink_heads_come_from_the_scan(model):
    s = streaming(model, TEXTS, windows=(16,), sinks=(1,), heads="sink", seq_len=64,
                  progress=False)  # fmt: skip
    assert s.heads == "sink" and s.n_heads_restricted == 1


def test_bad_settings_are_refused(model):
    with pytest.raises(SpikeSinkError, match="does not fit"):
        streaming(model, TEXTS, windows=(64,), seq_len=64, progress=False)
    with pytest.raises(SpikeSinkError, match="windows must be"):
        streaming(model, TEXTS, windows=(0,), seq_len=64, progress=False)
    with pytest.raises(SpikeSinkError, match="heads must be"):
        streaming(model, TEXTS, heads="some", windows=(8,), seq_len=64, progress=False)
