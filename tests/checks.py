"""Assertions and reference computations that unit tests in several folders share.

Test modules import these by name (``from checks import assert_untouched``): ``tests/`` is on
``sys.path`` (tests/conftest.py puts it there), as it is for :mod:`planted`.
"""

from __future__ import annotations

import torch

import tl_spikesink as ts


def state_snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"parameter {k} changed"
    leftover = [name for name, hp in model.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks]
    assert not leftover, f"hooks left behind on {leftover}"


def assert_same_scan(a, b):
    assert a.n_tokens == b.n_tokens and a.n_sequences == b.n_sequences and a.n_texts == b.n_texts
    assert torch.equal(a.spikes.histograms, b.spikes.histograms)
    for site in a.spikes.sites:
        for ea, eb in zip(a.spikes.entries[site], b.spikes.entries[site], strict=True):
            assert torch.equal(ea.meta, eb.meta)
            assert torch.allclose(ea.values, eb.values)
    assert a.spikes.tokens == b.spikes.tokens
    assert torch.allclose(a.sinks.alpha_sum, b.sinks.alpha_sum, atol=1e-9)
    assert torch.equal(a.sinks.alpha_count, b.sinks.alpha_count)
    assert a.sinks.tokens == b.sinks.tokens
    assert a.sinks.sink_heads == b.sinks.sink_heads


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
