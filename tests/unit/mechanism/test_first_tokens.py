"""§3.1.3 on planted models: Eq. 22, delimiter self-sinking, embedding–scale collinearity."""

import copy
import json

import pytest
import torch
from planted import VOCAB, planted_model, planted_with_values, sentences

from tl_spikesink.anatomy import NORM_SCALE_ATTR
from tl_spikesink.mechanism.first_tokens import delimiter_mask, first_tokens

TEXTS = sentences(24)
DOT = VOCAB.index(".")


def _self_sinking_dots():
    """The planted model whose head (0, 1) puts all of a "." query's attention on "." keys."""
    model = planted_model()
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.W_Q[1, 3, 0] = attn.W_K[1, 3, 0] = 10.0  # channel 3 marks "."
    return model


def test_the_vocabulary_delimiters_are_the_scan_s_delimiters():
    mask = delimiter_mask(planted_model())
    assert mask.nonzero()[:, 0].tolist() == [DOT]  # "<bos>", "<pad>" and words are not


def test_eq22_holds_in_a_causal_model_and_is_not_applicable_in_an_encoder():
    model = planted_with_values()
    r = first_tokens(model, TEXTS)
    assert r.static_verdict[0] == "holds" and float(r.static_error.max()) < 1e-5
    encoder = copy.deepcopy(model)
    encoder.cfg.attention_dir = "bidirectional"
    e = first_tokens(encoder, TEXTS)
    assert e.static_verdict[0] == "not applicable" and torch.isnan(e.static_error).all()


def test_self_sinking_delimiters_are_counted_exactly():
    model = _self_sinking_dots()
    r = first_tokens(model, TEXTS)
    # Layer 0: head 0 sinks on BOS (self ≈ 0 after position 0); head 1 splits a "." query's
    # attention evenly over the "." tokens so far, so the k-th "." of a text gives itself 1/k.
    expected, n = 0.0, 0
    for ids in (model.to_tokens(t)[0].tolist() for t in TEXTS):
        dots = [i for i, tok in enumerate(ids) if tok == DOT]
        for k, _ in enumerate(dots, start=1):
            expected, n = expected + 0.5 / k, n + 1
    assert r.n_delimiter == n
    assert float(r.self_delimiter[0]) == pytest.approx(expected / n, rel=1e-3)
    assert r.self_sink_verdict[0] == "holds"
    assert r.n_spike == n and r.n_spike_delimiter == n  # "." is the planted spike token
    plain = first_tokens(planted_model(), TEXTS)
    assert plain.self_sink_verdict[0] == "does not hold"  # uniform heads: no self preference


def test_embedding_scale_cosine_is_exact_and_needs_the_gain():
    model = planted_model()
    r = first_tokens(model, TEXTS)
    # "." embeds as ones on channels 1, 2, 3 and γ is all ones: cos = 3 / (√3 · 4).
    assert r.scale_cos_delimiter == pytest.approx(3 / (3**0.5 * 4), rel=1e-5)
    assert r.scale_verdict[0] == "holds"
    folded = copy.deepcopy(model)
    folded.process_weights_(fold_ln=True, center_writing_weights=False, center_unembed=False)
    f = first_tokens(folded, TEXTS)
    assert f.scale_verdict[0] == "not applicable" and "fold_ln" in f.scale_verdict[1]
    setattr(folded, NORM_SCALE_ATTR, torch.ones(16))  # as tl_spikesink.load records it
    assert first_tokens(folded, TEXTS).scale_cos_delimiter == pytest.approx(r.scale_cos_delimiter)
    json.loads(r.to_json())
