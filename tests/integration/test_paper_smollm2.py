"""SmolLM2-135M measured as the seed paper measures its models (Tables 1 and 2, claims)."""

import json

import pytest

import tl_spikesink as ts

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def row(smollm2, smollm2_scan):
    # The vocabulary probe reads all 49,152 items twice: about two minutes on two cores.
    return ts.paper_row(smollm2, ts.default_texts()[:40], scan=smollm2_scan, progress=False)


def test_table1_step_up_is_layer_11_mlp_from_activations_and_weights(row):
    d = json.loads(row.to_json())
    assert 24 in d["table1"]["step_up"]  # paper block 24 = TransformerLens layer 11's FFN
    assert set(d["table1"]["step_down"]) & {58, 60}
    assert d["table1"]["from_weights"]["step_up"][:1] == [24]
    assert 507 in d["table1"]["from_weights"]["channels"]


def test_table2_almost_every_item_spikes_first_and_almost_none_second(row):
    t2 = json.loads(row.to_json())["table2"]
    assert t2["vocab"] == 49152
    assert t2["share_position0"] > 0.98  # measured 99.99 %; the paper's range is 98.4-99.9 %
    assert t2["share_position1"] < 0.01  # measured 0.05 %


def test_sink_ratio_spike_and_claims(row):
    d = json.loads(row.to_json())
    assert 0.5 < d["sink_ratio"] < 0.95 and 0.5 < d["first_token_sink_ratio"] < 0.95
    assert 1.5e4 < d["spike"] < 4e4
    verdicts = {(c["link"], c["verdict"]) for c in d["claims"]}
    assert ("quadratic", "holds") in verdicts and ("rmsnorm", "holds") in verdicts


def test_first_token_and_locality_rows_are_measured(row):
    claims = {c["claim"].split(" (")[0].split(":")[0]: c for c in json.loads(row.to_json())["claims"]}
    static = [c for k, c in claims.items() if k.startswith("Eq. 22")]
    assert static and static[0]["verdict"] == "holds" and static[0]["measured"] < 1e-3
    self_sink = [c for k, c in claims.items() if k.startswith("delimiters attend")]
    assert self_sink[0]["verdict"] == "holds"  # measured 10.0 % vs 8.4 % over layers 0-11
    scale = [c for k, c in claims.items() if k.startswith("delimiter embeddings")]
    assert scale[0]["verdict"] != "not applicable"  # the gain was kept before folding
    window = [c for c in claims.values() if c["link"] == "short-range"]
    assert len(window) == 3 and all(c["measured"] is not None for c in window)
