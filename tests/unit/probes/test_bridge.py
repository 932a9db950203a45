"""TransformerBridge (the successor to HookedTransformer) scans like a HookedTransformer."""

import pytest
import torch
from checks import assert_untouched, brute_force_alpha, state_snapshot
from planted import sentences, tokenizer

import tl_spikesink as ts


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)  # sharper attention than the default init
    path = tmp_path_factory.mktemp("tiny-llama")
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    model = TransformerBridge.boot_transformers(str(path), hf_model=hf, tokenizer=tok)
    model.enable_compatibility_mode()
    return model


def test_bridge_scan_matches_its_own_full_cache(bridge):
    texts = sentences(6, seed=4, min_words=3, max_words=30)
    before = state_snapshot(bridge)
    r = ts.scan(bridge, texts, batch_size=4, progress=False)
    assert_untouched(bridge, before)
    assert r.n_layers == 2 and r.n_heads == 4  # GQA: query heads, keys shared by pairs
    assert torch.allclose(r.sinks.alpha, brute_force_alpha(bridge, texts), atol=1e-5)
    chunks = ts.tokenize(bridge, texts).chunks
    for layer in range(2):
        values = torch.cat(
            [
                bridge.run_with_cache(torch.tensor([c.tokens]))[1][
                    f"blocks.{layer}.hook_resid_post"
                ][0]
                .abs()
                .flatten()
                for c in chunks
            ]
        )
        assert torch.allclose(
            r.spikes.top("resid_post", 3)[layer], values.topk(3).values, rtol=1e-5
        )


def test_bridge_scan_skips_the_final_norm_and_unembedding(bridge):
    """HF's forward computes the logits even with return_type=None; the scan stops it after
    the last block it reads, and a pass that asks for logits still gets them."""
    from tl_spikesink.probes.engine import Probe, run

    calls = []
    handles = [
        m.register_forward_hook(lambda *a, name=name: calls.append(name))
        for name, m in (("ln_final", bridge.ln_final), ("unembed", bridge.unembed))
    ]
    texts = sentences(4, seed=5, min_words=3, max_words=20)
    try:
        ts.scan(bridge, texts, batch_size=2, progress=False)
        assert calls == []

        class Logits(Probe):
            needs_logits = True

            def __init__(self):
                self.seen = []

            def hooks(self):
                return [("blocks.0.hook_resid_post", lambda x, hook: None)]

            def end_batch(self, step, logits):
                self.seen.append(logits.shape)

        probe = Logits()
        run(bridge, ts.tokenize(bridge, texts), [probe], batch_size=2, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert probe.seen and all(s[-1] == bridge.cfg.d_vocab for s in probe.seen)
    assert "unembed" in calls
