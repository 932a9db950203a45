"""Head decomposition on the planted model with values planted in layer 0, answers by construction.

Layer 0's two heads read residual channel 4 (seeded noise on ordinary words, exactly 0 on BOS and
".", the sink tokens) and write it to channels 5 and 6. The sink head (0, 0) sends ~all attention
to BOS, whose value is 0, so it writes ~nothing; head (0, 1) attends uniformly (zero query/key
weights) and writes the running mean of x̂_4. Nothing else writes, so layers 1 and 2 are silent.
"""

import dataclasses
import json

import pytest
import torch
from checks import assert_untouched, state_snapshot
from planted import SINK_HEAD, UNIFORM_HEAD, VOCAB, planted_with_values

import tl_spikesink as ts
from tl_spikesink import mechanism as mech


@pytest.fixture(scope="module")
def model():
    return planted_with_values()


@pytest.fixture(scope="module")
def scan(model, texts):
    return ts.scan(model, texts, progress=False)


@pytest.fixture(scope="module")
def result(model, texts, scan):
    return mech.head_decomposition(model, texts, scan)


def expected(model, texts):
    """The uniform head's numbers from the token ids alone: x̂_4 = E[t, 4] / rms(E[t])."""
    corpus = ts.tokenize(model, texts, max_seq_len=64)
    emb = model.embed.W_E.detach().double()
    x4 = emb[:, 4] / (emb.pow(2).mean(-1) + model.cfg.eps).sqrt()
    sink_ids = {VOCAB.index("<bos>"), VOCAB.index(".")}
    head, attn, value = [], [], []
    for chunk in corpus.chunks:
        ids = list(chunk.tokens)
        is_sink = [i == 0 or t in sink_ids for i, t in enumerate(ids)]
        for i, t in enumerate(ids):
            if is_sink[i]:
                continue
            head.append(abs(float(x4[ids[: i + 1]].mean())))
            attn.append(sum(is_sink[: i + 1]) / (i + 1))
            value.append(abs(float(x4[t])))
    return len(head), sum(head) / len(head), sum(attn) / len(attn), sum(value) / len(value)


def test_uniform_head_matches_the_hand_computation(model, texts, result):
    n, head_norm, sink_attention, value_norm = expected(model, texts)
    assert result.n_queries == n
    assert float(result.head_norm[UNIFORM_HEAD]) == pytest.approx(head_norm, rel=1e-4)
    assert float(result.rest_part[UNIFORM_HEAD]) == pytest.approx(head_norm, rel=1e-4)
    assert float(result.sink_attention[UNIFORM_HEAD]) == pytest.approx(sink_attention, rel=1e-4)
    assert float(result.other_value_norm[UNIFORM_HEAD]) == pytest.approx(value_norm, rel=1e-4)


def test_sink_tokens_carry_zero_value(result):
    # BOS and "." have x̂_4 = 0: nothing flows from the sink tokens, in any head.
    assert torch.equal(result.sink_part, torch.zeros(3, 2))
    assert torch.equal(result.sink_value_norm, torch.zeros(3, 2))
    assert result.spike_layer == 1
    assert result.sink_value_ratio == 0.0


def test_sink_head_is_a_near_no_op(result):
    assert result.sink_heads == (SINK_HEAD,)
    assert float(result.sink_attention[SINK_HEAD]) > 0.99
    # It still reads the same values as the uniform head, but almost only from BOS.
    assert float(result.head_norm[SINK_HEAD]) < 0.01 * float(result.head_norm[UNIFORM_HEAD])
    assert float(result.share[SINK_HEAD]) < 0.01
    assert float(result.share[0].sum()) == pytest.approx(1.0)
    assert result.sink_relative_norm < 0.02 and result.other_relative_norm > 1.98
    # The layer's output is the sum of two orthogonal head outputs (channels 5 and 6).
    assert float(result.layer_norm[0]) >= float(result.head_norm[0].max()) * (1 - 1e-6)
    assert float(result.layer_norm[0]) <= float(result.head_norm[0].sum()) * (1 + 1e-6)
    # Silent layers: zero norms, undefined shares.
    assert torch.equal(result.head_norm[1:], torch.zeros(2, 2))
    assert result.share[1:].isnan().all()


def test_first_tokens_only_without_a_spike(model, texts):
    no_spike = ts.scan(model, texts, abs_threshold=1e9, progress=False)
    r = mech.head_decomposition(model, texts, no_spike)
    assert r.spike_layer is None
    assert r.n_sink_tokens == len(ts.tokenize(model, texts).chunks)
    # "." tokens are now ordinary keys, but their value is 0 too.
    assert torch.equal(r.sink_part, torch.zeros(3, 2))


def test_renders_serializes_and_is_frozen(result):
    assert "sink heads" in str(result)
    d = json.loads(json.dumps(result.to_dict()))
    assert d["sink_heads"] == [list(SINK_HEAD)] and len(d["head_norm"]) == 3
    assert d["spike_layer"] == 1 and d["n_queries"] == result.n_queries
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.n_queries = 0


def test_model_is_borrowed(model, texts, scan):
    before = state_snapshot(model)
    mech.head_decomposition(model, texts[:6], scan)
    assert_untouched(model, before)


def test_grouped_values_match_each_heads_own_output(texts):
    """GQA and rotary: head norms against hook_z · W_O from full caches (no spike: S = token 0)."""
    from planted import tokenizer
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64,
        d_vocab=len(VOCAB), n_ctx=64, act_fn="silu", gated_mlp=True, normalization_type="RMS",
        positional_embedding_type="rotary", seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg, tokenizer())
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    texts = texts[:6]
    d = mech.head_decomposition(model, texts, ts.scan(model, texts, progress=False))
    total, n = torch.zeros(2, 4, dtype=torch.float64), 0
    for chunk in ts.tokenize(model, texts).chunks:
        _, cache = model.run_with_cache(torch.tensor([chunk.tokens]))
        for layer in range(2):
            z = cache[f"blocks.{layer}.attn.hook_z"][0]
            out = torch.einsum("qhd,hdm->qhm", z, model.blocks[layer].attn.W_O)
            total[layer] += out[1:].norm(dim=-1).sum(0).double()
        n += len(chunk.tokens) - 1
    assert d.spike_layer is None and d.n_queries == n
    torch.testing.assert_close(d.head_norm.double(), total / n, atol=1e-5, rtol=1e-5)
