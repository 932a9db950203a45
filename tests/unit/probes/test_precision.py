"""A bfloat16 model scans to the float32 answer within the tolerance docs/speed.md states."""

import copy

import torch

import tl_spikesink as ts


def test_bfloat16_scan_matches_float32_within_the_stated_tolerance(planted, texts):
    r32 = ts.scan(planted, texts, progress=False)
    r16 = ts.scan(copy.deepcopy(planted).to(torch.bfloat16), texts, progress=False)
    # The same spike tokens, channels and sink heads: the planted margins dwarf bf16 rounding.
    assert [(t.token, t.channels) for t in r16.spikes.tokens] == [
        (t.token, t.channels) for t in r32.spikes.tokens
    ]
    assert r16.sinks.sink_heads == r32.sinks.sink_heads
    assert r16.sinks.sink_ratio == r32.sinks.sink_ratio
    # Values: bf16 keeps 8 significant bits (2^-8 = 0.4 % per rounding), compounded over layers.
    assert abs(r16.spikes.spike - r32.spikes.spike) <= 0.02 * r32.spikes.spike
    alpha32, alpha16 = r32.sinks.alpha, r16.sinks.alpha
    assert torch.allclose(alpha16, alpha32, atol=0.01, equal_nan=True)
