"""The spike scan finds exactly the massive activations planted in the tiny model."""

import torch
from planted import SPIKE, SPIKE_CHANNEL, VOCAB, planted_model

import tl_spikesink as ts


def expected_spike_tokens(model, texts):
    corpus = ts.tokenize(model, texts)
    trigger = {VOCAB.index("<bos>"), VOCAB.index(".")}
    return {
        ts.tokens.TokenRef(c.text_index, c.start, p)
        for c in corpus.chunks
        for p, tok in enumerate(c.tokens)
        if tok in trigger
    }


def test_finds_planted_channel_tokens_and_lifecycle(planted, texts):
    r = ts.scan(planted, texts, batch_size=5, progress=False)
    s = r.spikes
    assert s.channels == (SPIKE_CHANNEL,)
    assert s.massive_layers == (1,)
    assert s.step_up_layers == (1,)
    assert s.step_down_layers == (2,)
    assert set(s.lifecycle["step_up"]) == {(1, "mlp")}
    assert set(s.lifecycle["step_down"]) == {(2, "mlp")}
    assert {t.token for t in s.tokens} == expected_spike_tokens(planted, texts)
    for t in s.tokens:
        assert abs(t.max_value - SPIKE) < 1.0
        assert t.text in ("<bos>", ".")
        assert t.layers == (1,)
    n_first = sum(t.token.position == 0 for t in s.tokens)
    assert n_first == len(texts)
    assert s.share_first == n_first / len(s.tokens)
    assert s.share_delimiter == 1 - s.share_first  # every non-first spike token is "."
    assert not s.truncated


def test_tops_and_medians_match_a_full_cache(planted, texts):
    r = ts.scan(planted, texts, batch_size=4, progress=False)
    corpus = ts.tokenize(planted, texts)
    for site in ("resid_post", "attn_out", "mlp_out"):
        for layer in range(3):
            values = []
            for c in corpus.chunks:
                _, cache = planted.run_with_cache(torch.tensor([c.tokens]))
                values.append(cache[f"blocks.{layer}.hook_{site}"][0].abs().flatten())
            allv = torch.cat(values)
            exact_top = allv.topk(3).values
            assert torch.allclose(r.spikes.top(site, 3)[layer], exact_top, rtol=1e-5, atol=1e-6)
            med = r.spikes.median(site)[layer]
            exact_med = allv.median()
            if exact_med > 0:
                assert abs(med - exact_med) / exact_med < 0.06
            else:
                assert med < 1e-30


def test_thresholds_are_respected(planted, texts):
    above = ts.scan(planted, texts, abs_threshold=SPIKE * 2, progress=False)
    assert above.spikes.tokens == () and above.spikes.channels == ()
    relative = ts.scan(planted, texts, rel_threshold=1e6, progress=False)
    assert relative.spikes.tokens == ()  # 3000 is ~2e4 x the median, not 1e6 x


def test_model_without_spikes_reports_none(texts):
    model = planted_model()
    with torch.no_grad():
        model.blocks[1].mlp.W_out.zero_()
    r = ts.scan(model, texts, progress=False)
    assert r.spikes.tokens == () and r.spikes.step_up_layers == () and r.spikes.massive_layers == ()
    assert r.sink_spike_overlap == 0.0


def test_capacity_truncation_is_reported(planted, texts):
    r = ts.scan(planted, texts, top_k=3, max_candidates=5, progress=False)
    assert r.spikes.truncated
    assert len(r.spikes.massive) == 5


def test_absolute_spike_is_the_largest_value_in_the_spike_channels(planted, texts):
    r = ts.scan(planted, texts, batch_size=5, progress=False)
    corpus = ts.tokenize(planted, texts)
    exact = 0.0
    for c in corpus.chunks:
        _, cache = planted.run_with_cache(torch.tensor([c.tokens]))
        for layer in range(3):
            x = cache[f"blocks.{layer}.hook_resid_post"][0, :, SPIKE_CHANNEL].abs().max()
            exact = max(exact, float(x))
    assert r.spikes.spike == exact
    assert abs(r.spikes.spike - SPIKE) < 1.0
    assert r.spikes.lifecycle_peaks["step_up"] == {(1, "mlp"): r.spikes.spike}
    assert r.spikes.lifecycle_peaks["step_down"] == {(2, "mlp"): r.spikes.spike}


def test_no_spike_means_no_absolute_spike(texts):
    model = planted_model()
    with torch.no_grad():
        model.blocks[1].mlp.W_out.zero_()
    r = ts.scan(model, texts[:4], progress=False)
    assert r.spikes.spike != r.spikes.spike  # NaN
    assert r.to_dict()["spikes"]["spike"] is None


def test_report_names_paper_blocks_and_the_spike(planted, texts):
    r = ts.scan(planted, texts, batch_size=5, progress=False)
    d = r.to_dict()["spikes"]
    assert d["step_up"] == [
        {
            "layer": 1,
            "component": "mlp",
            "paper_block": 4,
            "events": len(r.spikes.tokens),
            "largest": r.spikes.spike,
        }
    ]
    assert [(e["layer"], e["component"], e["paper_block"]) for e in d["step_down"]] == [
        (2, "mlp", 6)
    ]
    assert d["spike"] == r.spikes.spike and "Spike" in d["spike_definition"]
    text = str(r)
    assert "layer 1 mlp = paper block 4" in text and "layer 2 mlp = paper block 6" in text
    assert "Spike            3e+03" in text


def test_nan_activations_are_skipped_not_fatal(planted, texts):
    # A query whose every key is masked (sink-key removal without a BOS) gives NaN from that layer
    # on; the scan goes on, and the layers before it keep their entries.
    def drown(act, hook):
        return torch.full_like(act, float("nan"))

    clean = ts.scan(planted, texts, batch_size=4, progress=False)
    with planted.hooks(fwd_hooks=[("blocks.2.hook_resid_pre", drown)]):
        r = ts.scan(planted, texts, batch_size=4, progress=False)
    for layer in (0, 1):
        assert torch.equal(r.spikes.top("resid_post", 3)[layer], clean.spikes.top("resid_post", 3)[layer])
    assert r.spikes.step_up_layers == clean.spikes.step_up_layers
