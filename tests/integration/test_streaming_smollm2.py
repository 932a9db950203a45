"""StreamingLLM on SmolLM2: window attention alone breaks, four sink tokens repair most of it."""

import json

import pytest

import tl_spikesink as ts

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def result(smollm2):
    return ts.streaming(smollm2, windows=(64, 256), sinks=(0, 4), seq_len=512, max_tokens=2048,
                        progress=False)  # fmt: skip


def test_sinks_repair_window_attention(result):
    rows = {(r.window, r.sinks): r for r in result.rows}
    for w in (64, 256):
        without, with_sinks = rows[w, 0], rows[w, 4]
        # Measured on 4,096 tokens: Δloss 0.94 / 0.20 (W = 64) and 0.34 / 0.02 (W = 256).
        assert without.delta_loss > 0.25  # StreamingLLM's collapse without the sink tokens
        assert with_sinks.delta_loss < without.delta_loss / 3
    assert rows[256, 4].delta_loss < rows[64, 4].delta_loss  # a wider window loses less


def test_json_has_the_issue_keys(result):
    d = json.loads(result.to_json())
    assert d["full_perplexity"] > 1 and len(d["rows"]) == 4
    assert {"window", "sinks", "perplexity", "delta_loss"} <= set(d["rows"][0])
