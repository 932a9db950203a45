"""RTN quantization by token class on a planted model whose spike sets the per-tensor scale.

The planted model (tests/planted.py) carries |x| = 3000 in channel 7 at BOS and "." after layer 1,
so per-tensor INT4 at layer 2's resid_pre has a step of 3000 / 7 ≈ 430 and rounds every other
token (|x| ≲ 2) to zero. Here its unembedding is made to predict each word's successor from the
word's own embedding, so zeroing the ordinary tokens costs real loss there, and only there.
"""

import dataclasses
import json
import math

import pytest
import torch
from checks import assert_untouched, state_snapshot
from planted import SPIKE, SPIKE_CHANNEL, VOCAB, WORDS, planted_model

import tl_spikesink as ts
from tl_spikesink.corpus import tokenize
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.evaluation.quantization import quantization
from tl_spikesink.interventions.quantize import (
    TokenClasses,
    activation_quantization,
    parse_keep,
    qmax,
    rtn,
    weight_rtn,
)
from tl_spikesink.probes.engine import Probe, run

NOISE = [4, 5, 6, *range(8, 16)]
SUPER = (1, SPIKE_CHANNEL, 0)
"""The planted step-up weight W_out[0, 7] of layer 1, as (layer, row, col)."""
DENSE = ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_gate")


def successor_texts(n: int, seed: int = 0) -> list[str]:
    """Chains of WORDS in cycle order, each with two "." inserted (spike tokens mid-text)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start, length = (int(x) for x in torch.randint(len(WORDS), (2,), generator=gen))
        words = [WORDS[(start + i) % len(WORDS)] for i in range(12 + length)]
        for i in sorted(torch.randint(2, len(words), (2,), generator=gen).tolist(), reverse=True):
            words.insert(i, ".")
        out.append(" ".join(words))
    return out


@pytest.fixture(scope="module")
def model():
    """The planted model, with an unembedding that reads the successor off the embedding."""
    m = planted_model()
    with torch.no_grad():
        emb = m.embed.W_E[:, NOISE]
        for i, w in enumerate(WORDS):
            nxt = VOCAB.index(WORDS[(i + 1) % len(WORDS)])
            m.unembed.W_U[NOISE, nxt] = 4.0 * emb[VOCAB.index(w)] / emb[VOCAB.index(w)].norm()
    return m


@pytest.fixture(scope="module")
def texts():
    return successor_texts(16)


@pytest.fixture(scope="module")
def scan(model, texts):
    return ts.scan(model, texts, progress=False)


def test_rtn_rounds_to_the_nearest_level_with_one_scale_per_slice():
    assert (qmax(8), qmax(4)) == (127, 7)
    x = torch.tensor([[[7.0, 2.4], [70.0, -35.0]]])  # [batch, pos, d]
    # Per token: scales 1 and 10; −3.5 is a tie and goes to the even level −4.
    torch.testing.assert_close(rtn(x, 4, (2,)), torch.tensor([[[7.0, 2.0], [70.0, -40.0]]]))
    # Per tensor: one scale of 70 / 7 = 10 crushes the small token.
    torch.testing.assert_close(rtn(x, 4, (1, 2)), torch.tensor([[[10.0, 0.0], [70.0, -40.0]]]))
    # The big token kept exact: it leaves the max, so the small one gets scale 1 again.
    keep_big = torch.tensor([[[True], [False]]])
    torch.testing.assert_close(
        rtn(x, 4, (1, 2), keep_big), torch.tensor([[[7.0, 2.0], [70.0, -35.0]]])
    )
    # INT8 on a slice of max 127: scale 1, every value rounds to an integer.
    y = torch.tensor([127.0, 0.6, -3.2])
    torch.testing.assert_close(rtn(y, 8, (0,)), torch.tensor([127.0, 1.0, -3.0]))
    # Weights per output channel (W_out is [d_in, d_out]: the max runs down each column).
    w = torch.tensor([[7.0, 0.5], [1.2, 14.0], [-3.4, -7.7]])
    torch.testing.assert_close(
        rtn(w, 4, (0,)), torch.tensor([[7.0, 0.0], [1.0, 14.0], [-3.0, -8.0]])
    )
    assert torch.equal(rtn(torch.zeros(2, 3), 4, (1,)), torch.zeros(2, 3))


def test_per_tensor_int4_zeroes_every_other_token_behind_the_spike(model, texts):
    tokens = model.to_tokens(texts[0])
    spike_at = (tokens[0] == VOCAB.index("<bos>")) | (tokens[0] == VOCAB.index("."))
    iv = activation_quantization(sites=("resid",), bits=4, granularity="tensor", model=model)
    assert [n for n, _ in iv.fwd_hooks] == [f"blocks.{la}.hook_resid_pre" for la in range(3)]
    with iv.applied(model):
        _, cache = model.run_with_cache(tokens)
    _, clean = model.run_with_cache(tokens)
    after = cache["resid_pre", 2][0]
    assert float(clean["resid_pre", 2][0, ~spike_at].abs().max()) > 0.5
    assert torch.equal(after[~spike_at], torch.zeros_like(after[~spike_at]))
    # The spike itself is the max, so it maps to the top level (to within the earlier layers').
    assert float(after[0, SPIKE_CHANNEL]) == pytest.approx(SPIKE, rel=1e-3)
    # Keeping the first two tokens (BOS and the first word) changes nothing for the rest here:
    # the "." further on still sets the scale.
    kept = activation_quantization(sites=("resid",), bits=4, granularity="tensor", keep="first:2",
                                   model=model)  # fmt: skip
    with kept.applied(model):
        _, again = model.run_with_cache(tokens)
    torch.testing.assert_close(again["resid_pre", 2][0, :2], clean["resid_pre", 2][0, :2])
    assert torch.equal(again["resid_pre", 2][0, 2:], after[2:])


def test_token_classes_are_the_scans_spike_and_sink_tokens(model, texts, scan):
    corpus = tokenize(model, texts)
    classes = TokenClasses(scan)

    class Refs(Probe):
        spike, sink = set(), set()

        def end_batch(self, step, logits=None):
            for kind, found in (("spike", self.spike), ("sink", self.sink)):
                for b, p in classes.of(kind).nonzero().tolist():
                    found.add((int(step.batch.text_index[b]), int(step.batch.start[b]), p))

    refs = Refs()
    run(model, corpus, [classes, refs], progress=False)
    expected_spike = {dataclasses.astuple(t.token) for t in scan.spikes.tokens}
    expected_sink = {dataclasses.astuple(t.token) for t in scan.sinks.tokens}
    assert refs.spike == expected_spike and len(expected_spike) == 3 * len(texts)  # BOS, ".", "."
    assert refs.sink == expected_sink == {(i, 0, 0) for i in range(len(texts))}  # BOS only
    # Replayed, the same masks come back without hooking anything.
    twin = classes.replay()
    assert twin.hooks() == [] and twin.masks is classes.masks


def test_keeping_the_spike_tokens_recovers_what_per_tensor_int4_loses(model, texts, scan):
    before = state_snapshot(model)
    q = quantization(model, texts, scan, bits=(4,), granularities=("tensor", "token"),
                     keeps=("none", "spike", "sink", "first:1"), sites=("resid",), weight_bits=(),
                     progress=False)  # fmt: skip
    assert_untouched(model, before)
    assert q.n_positions["spike"] == 3 * len(texts) and q.n_positions["sink"] == len(texts)
    assert q.n_positions["rest"] == q.n_positions["all"] - q.n_positions["spike"]
    # The successor is predictable from an ordinary word only (spike tokens carry no noise).
    assert q.clean_loss["rest"] < 1.5 and q.clean_loss["spike"] == pytest.approx(math.log(22))
    none = q.row("A INT4 per-tensor")
    spike = q.row("A INT4 per-tensor, spike kept")
    sink = q.row("A INT4 per-tensor, sink kept")
    # Layer 2's resid_pre of every ordinary token is rounded to zero: uniform predictions.
    assert none.delta_loss["rest"] == pytest.approx(math.log(len(VOCAB)) - q.clean_loss["rest"],
                                                    abs=0.05)  # fmt: skip
    assert none.error["rest"] > 0.3 and spike.error["rest"] < 0.5 * none.error["rest"]
    assert spike.error["spike"] == 0.0  # kept exact
    assert spike.delta_loss["rest"] < 0.1 * none.delta_loss["rest"]
    assert spike.recovered > 0.9 and spike.baseline == none.setting
    # BOS alone (the only sink token) is not enough: the "." spikes still set the scale.
    assert sink.recovered < 0.2
    first = q.row("A INT4 per-tensor, first:1 kept")  # the same tokens as "sink" in every batch
    assert (first.delta_loss, first.error) == (sink.delta_loss, sink.error)
    token = q.row("A INT4 per-token")
    assert token.delta_loss["rest"] < 0.2 * none.delta_loss["rest"]
    d = json.loads(q.to_json())
    assert "NaN" not in q.to_json() and len(d["rows"]) == 8
    assert set(d["rows"][0]["delta_loss"]) == {"all", "spike", "sink", "rest"}


def test_a_setting_run_once_for_two_counts_the_same_as_run_alone(model, texts, scan):
    alone = quantization(model, texts, scan, bits=(4,), granularities=("tensor",),
                         keeps=("sink",), weight_bits=(), progress=False)  # fmt: skip
    shared = quantization(model, texts, scan, bits=(4,), granularities=("tensor",),
                          keeps=("first:1", "sink"), weight_bits=(), progress=False)  # fmt: skip
    a, b = alone.row("A INT4 per-tensor, sink kept"), shared.row("A INT4 per-tensor, sink kept")
    assert a.loss == pytest.approx(b.loss, rel=1e-12) and a.error == pytest.approx(b.error)


def test_weight_rtn_restores_every_weight_bit_exactly():
    model = planted_model()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # dense weights, so that rounding changes every one of them
        for name, p in model.blocks.named_parameters():
            if name.rsplit(".", 1)[-1].lstrip("_") in DENSE:
                p.add_(torch.randn(p.shape, generator=gen))
    before = state_snapshot(model)
    with weight_rtn(model, bits=4, scope="all", keep=[SUPER]) as wq:
        assert len(wq.weights) == 3 * 7 and wq.error > 0
        for name in wq.weights:
            if not name.endswith("W_out"):
                dims = (0, 1) if name.endswith("W_O") else (0,) if "mlp" in name else (1,)
                assert torch.equal(model.get_parameter(name), rtn(before[name], 4, dims))
        # The super weight is the only non-zero entry of its column: kept, the rest stay zero.
        w_out = model.blocks[1].mlp.W_out
        assert float(w_out[0, SPIKE_CHANNEL].detach()) == float(
            before["blocks.1.mlp.W_out"][0, SPIKE_CHANNEL]
        )
    assert_untouched(model, before)
    with pytest.raises(RuntimeError, match="boom"):
        with weight_rtn(model, bits=8, scope="all"):
            assert not torch.equal(model.blocks[0].attn.W_Q, before["blocks.0.attn.W_Q"])
            raise RuntimeError("boom")
    assert_untouched(model, before)
    with pytest.raises(SpikeSinkError, match="not a W_out entry"):
        with weight_rtn(model, keep=[(1, 99, 0)]):
            pass
    assert_untouched(model, before)


def test_a_kept_weight_leaves_its_channels_max():
    model = planted_model()
    with torch.no_grad():
        model.blocks[1].mlp.W_out[1:, SPIKE_CHANNEL] = torch.tensor([0.9, -2.1, 3.0, 0, 0, 0, 0])
    col = model.blocks[1].mlp.W_out[:, SPIKE_CHANNEL].detach().clone()
    with weight_rtn(model, bits=4, scope="mlp_out"):
        crushed = model.blocks[1].mlp.W_out[:, SPIKE_CHANNEL].detach().clone()
    with weight_rtn(model, bits=4, scope="mlp_out", keep=[SUPER]):
        kept = model.blocks[1].mlp.W_out[:, SPIKE_CHANNEL].detach().clone()
    assert torch.equal(crushed[1:], torch.zeros(7))  # a step of |W[0, 7]| / 7 ≈ 1e3
    assert kept[0] == col[0]
    # Without it in the max, the step is 3 / 7: 0.9 → 2 steps, −2.1 → −5 (−4.9), 3 → 7.
    torch.testing.assert_close(kept[1:4], torch.tensor([2.0, -5.0, 7.0]) * 3 / 7)


def test_weight_rows_keep_the_super_weight_and_leave_the_model_as_it_was(model, texts, scan):
    before = state_snapshot(model)
    q = quantization(model, texts, scan, bits=(), weight_bits=(4,), weight_scopes=("mlp_out",),
                     super_weight=SUPER, progress=False)  # fmt: skip
    assert_untouched(model, before)
    plain, kept = q.rows
    assert (plain.keep, kept.keep, kept.baseline) == ("none", "super weight", plain.setting)
    assert q.super_weight == SUPER and math.isnan(plain.error["spike"]) and plain.error["all"] >= 0
    # Yu et al.'s cut of 50 finds nothing in the planted model, so "auto" adds no kept row.
    auto = quantization(model, texts, scan, bits=(), weight_bits=(4,), weight_scopes=("mlp_out",),
                        progress=False)  # fmt: skip
    assert auto.super_weight is None and len(auto.rows) == 1


def test_result_keeps_the_contract(model, texts, scan):
    q = quantization(model, texts[:4], scan, bits=(8,), granularities=("token",),
                     keeps=("none", "first:4"), weight_bits=(), progress=False)  # fmt: skip
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.model = "x"
    assert repr(q).startswith("Quantization(") and len(repr(q)) <= 2048
    text = q.to_json()
    assert "NaN" not in text and json.loads(text)["corpus"][0]["n_texts"] == 4
    assert "recovered" in str(q) and "A INT8 per-token, first:4 kept" in str(q)
    with pytest.raises(SpikeSinkError, match="no setting"):
        q.row("nope")


def test_bad_settings_are_refused(model, scan):
    with pytest.raises(SpikeSinkError, match="first:k"):
        parse_keep("first:0")
    with pytest.raises(SpikeSinkError, match="bits"):
        activation_quantization(scan, bits=1)
    with pytest.raises(SpikeSinkError, match="granularity"):
        activation_quantization(scan, granularity="channel")
    with pytest.raises(SpikeSinkError, match="unknown quantization site"):
        activation_quantization(scan, sites=("embed",))
    with pytest.raises(SpikeSinkError, match="token classes of a clean pass"):
        activation_quantization(scan, keep="spike")
    with pytest.raises(SpikeSinkError, match="out of range"):
        activation_quantization(scan, layers=(5,))
    with pytest.raises(SpikeSinkError, match="super_weight must be"):
        quantization(model, ["the cat"], scan, bits=(), super_weight="best", progress=False)
    with pytest.raises(SpikeSinkError, match="scope"):
        with weight_rtn(model, scope="attn"):
            pass
