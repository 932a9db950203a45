"""BOS audit on planted models: the sink head keys on the BOS marker; BOS and "." spike."""

import copy
import dataclasses
import hashlib
import json

import pytest
import torch
from checks import assert_untouched, state_snapshot
from planted import (
    SINK_HEAD,
    SPIKE,
    SPIKE_CHANNEL,
    VOCAB,
    planted_local_sink,
    planted_model,
    sentences,
)
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.evaluation.bos import CONDITIONS, BosAudit, bos_audit
from tl_spikesink.results import MAX_REPR

TEXTS = sentences(8)


@pytest.fixture(scope="module")
def model():
    return planted_model()


@pytest.fixture(scope="module")
def audit(model):
    before = state_snapshot(model)
    result = bos_audit(model, TEXTS, delimiter=".", progress=False)
    assert_untouched(model, before)
    return result


def test_the_sink_head_needs_a_bos_token(audit):
    assert audit.reference == "with_bos"
    assert audit.row("with_bos").sink_heads == (SINK_HEAD,)
    # Its query matches the BOS marker only: without BOS, or with "." first, it attends uniformly.
    for cond in ("no_bos", "delimiter"):
        assert audit.row(cond).sink_heads == ()
        assert audit.lost(cond) == (SINK_HEAD,) and audit.kept(cond) == ()
    assert audit.row("with_bos").first_scores[SINK_HEAD] > 0.99
    assert audit.row("no_bos").first_scores[SINK_HEAD] < 0.3


def test_a_second_bos_shares_the_sink_and_carries_the_spike(audit):
    packed = audit.row("packed")
    assert packed.mid_position == audit.prefix_len + 1
    assert packed.sink_heads == (SINK_HEAD,) and audit.lost("packed") == ()
    assert packed.mid_sink_heads == (SINK_HEAD,)
    # Every query after the second BOS sees two identical BOS keys and splits its attention.
    assert packed.mid_scores[SINK_HEAD] == pytest.approx(0.5, abs=0.02)
    assert packed.spike_mid and packed.peak_mid == pytest.approx(SPIKE, rel=1e-3)


def test_the_mid_sequence_reading_is_at_the_second_bos(model):
    # Without "." no other token spikes, so a reading one position off would see nothing.
    words = [t.replace(" .", "") for t in TEXTS]
    packed = bos_audit(model, words, delimiter=".", progress=False).row("packed")
    assert packed.spike_mid and packed.peak_mid == pytest.approx(SPIKE, rel=1e-3)
    assert packed.mid_scores[SINK_HEAD] == pytest.approx(0.5, abs=0.02)


def test_the_spike_follows_the_token_not_the_position(audit):
    assert audit.spike_channels == (SPIKE_CHANNEL,)
    for cond in ("with_bos", "packed", "delimiter"):  # BOS or "." at position 0
        row = audit.row(cond)
        assert row.spike_first and row.peak_first == pytest.approx(SPIKE, rel=1e-3)
    no_bos = audit.row("no_bos")  # a word first: nothing in the spike channel
    assert not no_bos.spike_first and no_bos.peak_first < 1.0


def _own_tokens(model, texts):
    return [model.to_tokens(t, prepend_bos=False)[0].tolist() for t in texts]


def test_every_condition_scores_the_same_targets_and_the_loss_is_theirs():
    model = planted_local_sink()
    audit = bos_audit(model, TEXTS, delimiter=".", progress=False)
    xs = _own_tokens(model, TEXTS)
    targets = sorted((i, j, x[j]) for i, x in enumerate(xs) for j in range(1, len(x)))
    expected = hashlib.sha256(repr(targets).encode()).hexdigest()
    assert {r.targets_sha256 for r in audit.rows} == {expected}
    assert {r.n_targets for r in audit.rows} == {len(targets)}
    bos, dot, p = model.tokenizer.bos_token_id, model.to_single_token("."), audit.prefix_len
    heads = {
        "with_bos": lambda i: [bos],
        "no_bos": lambda i: [],
        "packed": lambda i: [bos, *xs[(i + 1) % len(xs)][:p], bos],
        "delimiter": lambda i: [dot],
    }
    for cond, head in heads.items():
        total = 0.0
        for i, x in enumerate(xs):
            pre = head(i)
            with torch.no_grad():
                logp = model(torch.tensor([pre + x]))[0].log_softmax(-1)
            total -= sum(float(logp[len(pre) + j - 1, x[j]]) for j in range(1, len(x)))
        assert audit.row(cond).loss == pytest.approx(total / len(targets), rel=1e-5), cond
    # Both heads of this model write into the logits, so losing the sink moves the loss.
    assert abs(audit.delta_loss("no_bos")) > 1e-3
    assert audit.delta_loss("with_bos") == 0.0


def _without_bos(model):
    """A copy whose tokenizer has no BOS token (TransformerLens would fill one in from EOS)."""
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    copied = copy.deepcopy(model)
    copied.tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>"
    )
    copied.cfg.default_prepend_bos = copied.cfg.tokenizer_prepends_bos = False
    return copied


def test_a_tokenizer_without_bos_leaves_the_bos_rows_not_applicable(model):
    no_bos = _without_bos(model)
    assert no_bos.tokenizer.bos_token_id is None
    assert no_bos.to_tokens("the .", prepend_bos=False).tolist() == [[4, 3]]
    audit = bos_audit(no_bos, TEXTS, delimiter=".", progress=False)
    assert audit.reference == "no_bos" and audit.bos_token is None
    for cond in ("with_bos", "packed"):
        row = audit.row(cond)
        assert not row.applicable and "no BOS token" in row.reason
        assert row.loss != row.loss  # NaN
    assert audit.row("delimiter").applicable and audit.row("no_bos").applicable
    assert "not applicable, the tokenizer has no BOS token" in str(audit)
    assert "NaN" not in audit.to_json()


def test_one_text_cannot_be_packed(model):
    audit = bos_audit(model, TEXTS[:1], delimiter=".", progress=False)
    assert not audit.row("packed").applicable and "two texts" in audit.row("packed").reason
    assert audit.row("with_bos").applicable


def test_bad_input_is_refused(model):
    with pytest.raises(SpikeSinkError, match="no texts"):
        bos_audit(model, [], progress=False)
    with pytest.raises(SpikeSinkError, match="empty"):
        bos_audit(model, ["the cat", "  "], progress=False)
    with pytest.raises(SpikeSinkError, match="delimiter 'the'"):
        bos_audit(model, TEXTS, delimiter="the", progress=False)
    with pytest.raises(SpikeSinkError, match="single token"):
        bos_audit(model, ["cat", "dog"], delimiter=".", progress=False)


def test_the_result_keeps_the_contract(audit):
    with pytest.raises(dataclasses.FrozenInstanceError):
        audit.model = "x"
    r = repr(audit)
    assert isinstance(audit, BosAudit) and r.startswith("BosAudit(") and len(r) <= MAX_REPR
    text = audit.to_json()
    d = json.loads(text)
    assert "NaN" not in text
    assert [row["condition"] for row in d["rows"]] == list(CONDITIONS)
    assert d["rows"][1]["lost"] == [list(SINK_HEAD)] and d["corpus"]["sha256"]
    table = str(audit)
    assert all(c in table for c in CONDITIONS) and "mid-sequence BOS at position" in table
