"""Measured facts of SmolLM2-135M (fp32 after dequantizing), asserted with margins."""

import pytest
import torch

import tl_spikesink as ts

pytestmark = pytest.mark.integration


def test_first_token_spike_in_channel_507(smollm2_scan):
    s = smollm2_scan.spikes
    assert smollm2_scan.model == "smollm2-135m" and smollm2_scan.prepend_bos is False
    assert s.channels[0] == 507 and 247 in s.channels[:4]
    peak = max(abs(t.max_value) for t in s.tokens)
    assert 1.5e4 < peak < 4e4
    assert s.share_first > 0.5  # every sequence's first token spikes; a few delimiters may too
    firsts = {t.token.text_index for t in s.tokens if t.token.is_first}
    assert len(firsts) == smollm2_scan.n_texts


def test_lifecycle_step_up_at_11_step_down_late(smollm2_scan):
    s = smollm2_scan.spikes
    assert 11 in s.step_up_layers
    assert set(s.step_down_layers) & {27, 28, 29}
    assert {12, 20, 27} <= set(s.massive_layers)
    top = s.top("resid_post", 1)[:, 0]
    assert top[15] > 1.5e4 and top[10] < 2e3
    assert top[28] < 0.6 * top[27] and top[29] < 0.4 * top[27]  # cancelled by the last blocks
    med = s.median("resid_post")
    # The median grows along the plateau (measured 1.7 at block 11 to 9.7 at block 27).
    assert (med[11:28] < 20).all() and med[27] > 3 * med[11]


def test_strong_sinks_on_the_first_token(smollm2_scan):
    k = smollm2_scan.sinks
    assert k.scores.shape == (30, 9)
    assert 0.5 < k.first_token_sink_ratio < 0.95  # measured 0.73 on this corpus
    assert k.scores[10:25].max() > 0.9
    assert (k.scores[:2] < 0.5).all()  # the first blocks are not sinks yet
    assert k.share_first > 0.4  # every first token, and some secondary sinks
    first_sinks = {t.token for t in k.tokens if t.token.is_first}
    assert len(first_sinks) == smollm2_scan.n_sequences
    assert smollm2_scan.sink_spike_overlap > 0.4
    assert torch.allclose(k.row_mass, torch.ones_like(k.row_mass), atol=1e-4)


def test_too_long_text_is_chunked_at_the_context(smollm2):
    text = " ".join(ts.default_texts()[:30])
    corpus = ts.tokenize(smollm2, text, max_seq_len=256)
    assert len(corpus.chunks) > 1 and all(len(c.tokens) <= 256 for c in corpus.chunks)
    with pytest.raises(ts.SpikeSinkError, match="long_texts"):
        ts.tokenize(smollm2, text, max_seq_len=256, long_texts="error")
