"""The sink scan computes Gu et al.'s α exactly and finds the planted sink head."""

import pytest
import torch
from planted import N_HEADS, N_LAYERS, SINK_HEAD, planted_model, sentences, uniform_alpha0

import tl_spikesink as ts


def test_planted_sink_head_and_uniform_heads(planted, texts):
    r = ts.scan(planted, texts, batch_size=5, progress=False)
    k = r.sinks
    lengths = [len(c.tokens) for c in ts.tokenize(planted, texts).chunks]
    expected = torch.full((N_LAYERS, N_HEADS), uniform_alpha0(lengths), dtype=torch.float64)
    expected[SINK_HEAD] = 1.0
    assert torch.allclose(k.scores, expected, atol=1e-5)
    assert k.sink_heads == (SINK_HEAD,)
    assert k.sink_ratio == pytest.approx(1 / (N_LAYERS * N_HEADS))
    assert torch.allclose(k.row_mass, torch.ones(N_LAYERS, N_HEADS, dtype=torch.float64), atol=1e-5)
    assert {t.token for t in k.tokens} == {ts.tokens.TokenRef(i, 0, 0) for i in range(len(texts))}
    assert k.share_first == 1.0 and k.share_delimiter == 0.0
    assert r.sink_spike_overlap == 1.0  # BOS is both the sink and a spike token


def random_model(positional="rotary"):
    from planted import tokenizer
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        n_heads=4,
        d_head=4,
        d_mlp=32,
        d_vocab=len(tokenizer()),
        n_ctx=64,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        positional_embedding_type=positional,
        default_prepend_bos=True,
        seed=3,
    )
    model = HookedTransformer(cfg, tokenizer())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)  # sharp, varied attention patterns
    return model


def brute_force_alpha(model, texts):
    """α_k pooled over texts, from full caches: Σ_texts Σ_{i>=k} A_ik / Σ_texts (T - k)."""
    chunks = ts.tokenize(model, texts).chunks
    width = max(len(c.tokens) for c in chunks)
    num = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, width, dtype=torch.float64)
    den = torch.zeros(width, dtype=torch.float64)
    for c in chunks:
        t = len(c.tokens)
        _, cache = model.run_with_cache(torch.tensor([c.tokens]))
        for layer in range(model.cfg.n_layers):
            num[layer, :, :t] += cache[f"blocks.{layer}.attn.hook_pattern"][0].sum(1).double()
        den[:t] += torch.arange(t, 0, -1, dtype=torch.float64)
    return num / den


@pytest.mark.parametrize("positional", ["rotary", "standard"])
def test_alpha_matches_brute_force_and_padding_side_does_not_matter(positional):
    model = random_model(positional)
    texts = sentences(9, seed=1, min_words=3, max_words=40)
    expected = brute_force_alpha(model, texts)
    for side in ("right", "left"):
        r = ts.scan(model, texts, batch_size=4, padding_side=side, progress=False)
        assert torch.allclose(r.sinks.alpha, expected, atol=1e-5), side
    right = ts.scan(model, texts, batch_size=4, progress=False)
    left = ts.scan(model, texts, batch_size=3, padding_side="left", progress=False)
    # Padding may change float rounding in the last bit, which can move a value across a bin edge.
    moved = (right.spikes.histograms - left.spikes.histograms).abs().sum()
    assert moved <= 1e-3 * right.spikes.histograms.sum()
    assert torch.allclose(
        right.spikes.top("resid_post", 3), left.spikes.top("resid_post", 3), rtol=1e-5
    )
    assert [t.token for t in right.sinks.tokens] == [t.token for t in left.sinks.tokens]


def test_learned_sink_logits_rows_below_one_are_kept(texts):
    model = planted_model()

    def leak(pattern, hook):  # a learned sink logit takes 20% of every row
        return pattern * 0.8

    model.blocks[0].attn.hook_pattern.add_hook(leak, is_permanent=True)
    try:
        r = ts.scan(model, texts, progress=False)
    finally:
        model.reset_hooks(including_permanent=True)
    assert r.sinks.row_mass[0].tolist() == pytest.approx([0.8, 0.8], abs=1e-5)
    assert r.sinks.scores[SINK_HEAD] == pytest.approx(0.8, abs=1e-5)


def test_attention_distance_matches_brute_force():
    model = random_model("rotary")
    texts = sentences(7, seed=2, min_words=3, max_words=40)
    chunks = ts.tokenize(model, texts).chunks
    L, H = model.cfg.n_layers, model.cfg.n_heads
    tot = torch.zeros(L, H, dtype=torch.float64)
    nos, cnt = torch.zeros(L, H, dtype=torch.float64), torch.zeros(L, H, dtype=torch.float64)
    n = 0
    for c in chunks:
        t = len(c.tokens)
        n += t
        _, cache = model.run_with_cache(torch.tensor([c.tokens]))
        d = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).double()
        for layer in range(L):
            a = cache[f"blocks.{layer}.attn.hook_pattern"][0].double()
            tot[layer] += (a * d).sum((1, 2))
            rest = a[:, 1:, 1:]
            nos[layer] += ((rest * d[1:, 1:]).sum(-1) / rest.sum(-1)).sum(-1)
            cnt[layer] += t - 1
    for side in ("right", "left"):
        r = ts.scan(model, texts, batch_size=3, padding_side=side, progress=False)
        assert torch.allclose(r.sinks.attention_distance, tot / n, atol=1e-4)
        assert torch.allclose(r.sinks.attention_distance_without_sink, nos / cnt, atol=1e-4)


def test_planted_sink_head_looks_back_to_the_first_token(planted, texts):
    r = ts.scan(planted, texts, progress=False)
    dist, nosink = r.sinks.attention_distance, r.sinks.attention_distance_without_sink
    lengths = [len(c.tokens) for c in ts.tokenize(planted, texts).chunks]
    # All attention on key 0: the distance of query i is i; mean over tokens is Σ T(T-1)/2 / Σ T.
    assert dist[SINK_HEAD] == pytest.approx(
        sum(t * (t - 1) / 2 for t in lengths) / sum(lengths), rel=1e-4
    )
    # A uniform head looks back i/2 on average, and (i-1)/2 once key 0 is removed.
    assert dist[1, 0] == pytest.approx(
        sum(t * (t - 1) / 4 for t in lengths) / sum(lengths), rel=1e-4
    )
    assert nosink[1, 0] == pytest.approx(
        sum((i - 1) / 2 for t in lengths for i in range(1, t)) / sum(t - 1 for t in lengths),
        rel=1e-4,
    )
