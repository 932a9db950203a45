"""Claims table on the planted model (every claim holds) and on models lacking the parts."""

import dataclasses
import json

import pytest
from checks import assert_untouched, state_snapshot
from planted import VOCAB, tokenizer
from transformer_lens import HookedTransformer, HookedTransformerConfig

import tl_spikesink as ts
from tl_spikesink.mechanism.claims import ClaimsTable, claims


@pytest.fixture(scope="module")
def scan(planted, texts):
    return ts.scan(planted, texts, progress=False)


@pytest.fixture(scope="module")
def table(planted, texts, scan):
    return claims(planted, texts, scan)


def test_every_claim_holds_on_planted(table):
    assert isinstance(table, ClaimsTable)
    links = {"silu", "quadratic", "rmsnorm", "sink", "short-range", "heads", "first-tokens"}
    assert {r.link for r in table.rows} == links
    # The planted sink head puts ~all attention on BOS, so it has no distance without it; the
    # texts are shorter than the window test's first query.
    ours, share, causal = [r for r in table.rows if r.link == "short-range"]
    assert ours.verdict == "not applicable" and "only to the sink key" in ours.note
    assert ours.claim.startswith("(our metric)")
    assert share.verdict == causal.verdict == "not applicable" and "too short" in share.note
    # Every W_V / W_O of the planted model is zero: no head writes, nothing to decompose.
    heads = [r for r in table.rows if r.link == "heads"]
    assert len(heads) == 2 and all(r.verdict == "not applicable" for r in heads)
    assert "writes" in heads[0].note
    static, self_sink, scale = [r for r in table.rows if r.link == "first-tokens"]
    assert static.verdict == "holds" and scale.verdict == "holds"
    # Its heads are uniform past the BOS sink: delimiters do not prefer themselves.
    assert self_sink.verdict == "does not hold"
    assert [
        r
        for r in table.rows
        if r.verdict != "holds" and r.link not in ("short-range", "heads", "first-tokens")
    ] == []
    assert table.n_spike_tokens > 0


def test_head_claims_hold_once_heads_write(texts):
    """Layer 0's heads copy x̂_4, which is 0 on BOS: the sink head writes (almost) nothing."""
    from planted import planted_with_values

    table = claims(planted_with_values(), texts[:12])
    writes, values = [r for r in table.rows if r.link == "heads"]
    assert writes.verdict == "holds" and writes.measured < 0.02
    assert writes.threshold == "< 2 (other heads)"  # the uniform head writes for both
    assert values.verdict == "holds" and values.measured == 0.0


def test_renders_and_serializes(table):
    text = str(table)
    assert "claims for planted" in text and "holds" in text
    d = json.loads(json.dumps(table.to_dict()))
    assert len(d["rows"]) == len(table.rows)
    assert set(d["rows"][0]) == {"link", "claim", "measured", "threshold", "verdict", "note"}


def test_frozen(table):
    with pytest.raises(dataclasses.FrozenInstanceError):
        table.rows = ()


def test_model_is_borrowed(planted, texts, scan):
    before = state_snapshot(planted)
    claims(planted, texts[:6], scan)
    assert_untouched(planted, before)


def _model(**overrides):
    cfg = dict(
        n_layers=2, d_model=16, n_heads=2, d_head=4, d_mlp=8, d_vocab=len(VOCAB), n_ctx=64,
        act_fn="gelu", normalization_type="LN", model_name="plain",
    )  # fmt: skip
    return HookedTransformer(HookedTransformerConfig(**{**cfg, **overrides}), tokenizer())


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({}, "gated"),  # LayerNorm, plain MLP
        ({"normalization_type": "RMS", "act_fn": "silu"}, "gated_mlp=False"),
        ({"gated_mlp": True, "act_fn": "silu"}, "RMSNorm"),
    ],
)
def test_not_applicable_instead_of_crashing(texts, overrides, reason):
    table = claims(_model(**overrides), texts[:6])
    assert all(r.verdict == "not applicable" for r in table.rows)
    assert all(r.measured is None and r.note for r in table.rows)
    quadratic_or_norm = [r.note for r in table.rows if r.link in ("quadratic", "rmsnorm")]
    assert any(reason in note for note in quadratic_or_norm)
    assert "not applicable" in str(table)


def test_no_spike_token_in_the_texts(planted, scan):
    """The scan knows the spike, but these texts hold no spike token beyond BOS-less input."""
    corpus = ts.tokenize(planted, ["the cat sat on the mat and the dog ran"], prepend_bos=False)
    table = claims(planted, corpus, scan)
    spike_rows = [r for r in table.rows if r.link in ("silu", "quadratic", "rmsnorm")]
    assert spike_rows and all(r.verdict == "not applicable" for r in spike_rows)
    assert "no spike token" in spike_rows[0].note
