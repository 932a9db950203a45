"""The sink scan computes Gu et al.'s α exactly and finds the planted sink head."""

import pytest
import torch
from checks import brute_force_alpha
from planted import (
    KEY_SINK_HEAD,
    N_HEADS,
    N_LAYERS,
    SINK_HEAD,
    planted_key_sink,
    planted_late_sink,
    planted_model,
    sentences,
    uniform_alpha0,
)

import tl_spikesink as ts


def test_planted_sink_head_and_uniform_heads(planted, texts):
    r = ts.scan(planted, texts, batch_size=5, progress=False)
    k = r.sinks
    lengths = [len(c.tokens) for c in ts.tokenize(planted, texts).chunks]
    expected = torch.full((N_LAYERS, N_HEADS), uniform_alpha0(lengths), dtype=torch.float64)
    expected[SINK_HEAD] = 1.0
    assert torch.allclose(k.scores, expected, atol=1e-5)
    assert k.sink_heads == (SINK_HEAD,)
    assert k.first_token_sink_ratio == pytest.approx(1 / (N_LAYERS * N_HEADS))
    # Eq. 28: only the planted head sinks in each sequence (>= 15 tokens: uniform heads stay
    # below eps, H_T / T < 0.3).
    assert k.sink_ratio == 1 / (N_LAYERS * N_HEADS)
    assert k.n_ratio_sequences == len(texts)
    expected_heads = torch.zeros(N_LAYERS, N_HEADS, dtype=torch.float64)
    expected_heads[SINK_HEAD] = 1.0
    assert torch.equal(k.sink_ratio_per_head, expected_heads)
    assert k.sink_ratio_per_layer.tolist() == [1 / N_HEADS, 0.0, 0.0]
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


# ---------------------------------------------------------------- the sink ratio of Eq. 27–28


def words(n):
    """A text of `n` ordinary words: n + 1 tokens with BOS on the planted tokenizer."""
    return " ".join(["the", "cat", "sat"][i % 3] for i in range(n))


def brute_force_eq28(model, texts, probe_len=64, min_len=8, epsilon=0.3):
    """Per-head count of sequences in which the head is an Eq. 28 sink head, one at a time."""
    counts = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, dtype=torch.float64)
    n = 0
    for c in ts.tokenize(model, texts).chunks:
        t = min(len(c.tokens), probe_len)
        if t < min_len:
            continue
        n += 1
        _, cache = model.run_with_cache(torch.tensor([c.tokens[:t]]))
        for layer in range(model.cfg.n_layers):
            a = cache[f"blocks.{layer}.attn.hook_pattern"][0].double()  # [head, query, key]
            alpha = a.sum(1) / t
            counts[layer] += (alpha[:, : t // 2].amax(-1) > epsilon).double()
    return counts, n


def test_sink_at_key_3_counts_under_eq28_but_not_as_a_first_token_sink(texts):
    model = planted_key_sink(key_position=3)
    for side in ("right", "left"):
        k = ts.scan(model, texts, batch_size=5, padding_side=side, progress=False).sinks
        assert k.scores[KEY_SINK_HEAD] < k.epsilon  # the key-3 head barely looks at token 0
        assert KEY_SINK_HEAD not in k.sink_heads
        assert k.sink_ratio_per_head[KEY_SINK_HEAD] == 1.0  # ... but sinks in every sequence
        assert k.sink_ratio == 2 / (N_LAYERS * N_HEADS)
        assert k.first_token_sink_ratio == pytest.approx(1 / (N_LAYERS * N_HEADS))
        # α_3 of the key-3 head, pooled Gu-style: every query that sees key 3 attends there.
        assert k.alpha[(*KEY_SINK_HEAD, 3)] == pytest.approx(1.0, abs=1e-4)


def test_key_3_is_out_of_reach_when_t_is_at_most_7():
    # ⌊T/2⌋ = 3 for T = 7: keys 0..2 only, so the key-3 head is no sink there (min_len 1).
    model = planted_key_sink(key_position=3)
    k = ts.scan(model, [words(6)], sink_min_len=1, progress=False).sinks
    assert k.n_ratio_sequences == 1
    assert k.sink_ratio_per_head[KEY_SINK_HEAD] == 0.0


def test_exact_sink_ratio_mixes_sequences_of_known_shares(planted, texts):
    # An 8-token sequence makes every uniform head a sink head (α_0 = H_8 / 8 = 0.340 > 0.3), so
    # s = 1 there; in the 24 longer texts only the planted head is (s = 1/6).
    assert sum(1 / (i + 1) for i in range(8)) / 8 > 0.3 > sum(1 / (i + 1) for i in range(10)) / 10
    k = ts.scan(planted, [*texts, words(7)], batch_size=5, progress=False).sinks
    assert k.n_ratio_sequences == len(texts) + 1
    assert k.sink_ratio == pytest.approx((len(texts) / 6 + 1) / (len(texts) + 1), abs=1e-12)
    ten = ts.scan(planted, [words(9)], progress=False).sinks  # T = 10: H_10 / 10 < 0.3
    assert ten.sink_ratio == pytest.approx(1 / 6, abs=1e-12)


def test_sequences_shorter_than_min_len_are_left_out(planted, texts):
    # A 7-token sequence would count every head (H_7 / 7 = 0.37 > 0.3): it must not count.
    short = words(6)
    alone = ts.scan(planted, [short], progress=False).sinks
    assert alone.n_ratio_sequences == 0 and alone.sink_ratio != alone.sink_ratio  # NaN
    assert torch.isnan(alone.sink_ratio_per_layer).all()
    with_short = ts.scan(planted, [*texts, short], batch_size=5, progress=False).sinks
    assert with_short.n_ratio_sequences == len(texts)
    assert with_short.sink_ratio == pytest.approx(1 / 6, abs=1e-12)
    counted = ts.scan(planted, [*texts, short], sink_min_len=7, progress=False).sinks
    assert counted.n_ratio_sequences == len(texts) + 1
    assert counted.sink_ratio == pytest.approx((len(texts) / 6 + 1) / (len(texts) + 1), abs=1e-12)


@pytest.mark.parametrize("probe_len", [64, 16])
def test_eq28_matches_brute_force_on_either_padding_side(probe_len):
    model = random_model("rotary")
    texts = sentences(11, seed=4, min_words=3, max_words=45)
    counts, n = brute_force_eq28(model, texts, probe_len=probe_len)
    assert 0 < n < len(texts)  # some texts are shorter than 8 tokens
    assert 0 < counts.sum() < n * counts.numel()  # not trivially all or none
    got = {}
    for side, batch in (("right", 4), ("left", 3)):
        r = ts.scan(
            model,
            texts,
            batch_size=batch,
            padding_side=side,
            sink_probe_len=probe_len,
            progress=False,
        )
        assert r.sinks.n_ratio_sequences == n
        assert torch.equal(r.sinks.sink_head_count, counts), side
        got[side] = r.sinks.sink_ratio
    assert got["right"] == got["left"] == pytest.approx(float(counts.sum()) / (n * counts.numel()))


def test_queries_after_probe_len_are_ignored():
    # Head (0, 1) sinks on the first token only from query 64 on: with T = min(n, 64) it is
    # uniform (α_0 = H_64 / 64), read over all 100 queries it would be a sink head (≈ 0.40).
    model = planted_late_sink(from_position=64, n_ctx=128)
    text = words(99)
    k = ts.scan(model, [text], progress=False).sinks
    assert k.sink_ratio_per_head[KEY_SINK_HEAD] == 0.0
    assert k.sink_ratio == pytest.approx(1 / 6, abs=1e-12)
    assert KEY_SINK_HEAD in k.sink_heads  # the corpus-pooled first-token score does see them
    every = ts.scan(model, [text], sink_probe_len=128, progress=False).sinks
    assert every.sink_ratio_per_head[KEY_SINK_HEAD] == 1.0
    # The first 64 queries do not depend on what follows: the 64-token prefix gives the same.
    prefix = ts.scan(model, [words(63)], progress=False).sinks
    assert torch.equal(prefix.sink_head_count, k.sink_head_count)


@pytest.mark.parametrize("cut", [1, 5, 8])
def test_merge_is_exact_for_the_eq28_counts(cut):
    model = random_model("standard")
    texts = sentences(10, seed=6, min_words=3, max_words=45)
    whole = ts.scan(model, texts, batch_size=4, progress=False).sinks
    a = ts.scan(model, texts[:cut], batch_size=3, progress=False)
    b = ts.scan(model, texts[cut:], batch_size=3, progress=False)
    merged = a.merge(b).sinks
    assert torch.equal(merged.sink_head_count, whole.sink_head_count)
    assert merged.n_ratio_sequences == whole.n_ratio_sequences
    assert merged.sink_ratio == whole.sink_ratio
    assert torch.equal(merged.sink_ratio_per_head, whole.sink_ratio_per_head)


def test_merge_refuses_different_probe_settings(planted, texts):
    a = ts.scan(planted, texts[:3], progress=False).sinks
    b = ts.scan(planted, texts[3:6], sink_probe_len=32, progress=False).sinks
    with pytest.raises(ts.SpikeSinkError, match="probe_len"):
        a.merge(b)


def test_sink_ratio_settings_are_checked():
    with pytest.raises(ts.SpikeSinkError, match="sink_probe_len"):
        ts.ScanConfig(sink_probe_len=1)
    with pytest.raises(ts.SpikeSinkError, match="sink_min_len"):
        ts.ScanConfig(sink_min_len=65)
    with pytest.raises(ts.SpikeSinkError, match="sink_min_len"):
        ts.ScanConfig(sink_min_len=0)


def test_report_shows_both_sink_ratios_with_their_definitions(texts):
    r = ts.scan(planted_key_sink(), texts, progress=False)
    d = r.to_dict()["sinks"]
    assert d["sink_ratio"] == pytest.approx(1 / 3) and "Eq. 28" in d["sink_ratio_definition"]
    assert d["first_token_sink_ratio"] == pytest.approx(1 / 6)
    assert "first-token" in d["first_token_sink_ratio_definition"]
    assert d["sink_ratio_sequences"] == len(texts) and d["sink_probe_len"] == 64
    assert d["sink_ratio_per_head"][0] == [1.0, 1.0]
    text = str(r)
    assert "sink ratio       0.333 (Eq. 28" in text and "first-token      0.167" in text
