"""Super weights of SmolLM2: Yu et al.'s rule fires in six layers; the step-up one ranks first."""

import json

import pytest

import tl_spikesink as ts

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def result(smollm2, smollm2_scan):
    return ts.super_weights(smollm2, ts.default_texts()[:40], smollm2_scan)


def test_the_step_up_super_weight_ranks_first(result):
    top = result.candidates[0]
    assert (top.layer, top.row, top.role) == (11, 507, "step-up")  # measured col 1229, |out| 2.4e4
    roles = {c.layer: c.role for c in result.candidates}
    assert "step-down" in roles.values() and len(roles) > 1  # the rule fires beyond layer 11


def test_pruning_breaks_the_model_and_restoring_the_activation_repairs_it(result):
    d = json.loads(result.to_json())
    # Measured: perplexity 25.1 clean, 151 pruned, 25.1 pruned with the super activation kept.
    assert d["ppl_pruned"] > 3 * d["ppl_clean"]
    assert d["ppl_pruned_restored"] < 1.1 * d["ppl_clean"]
    assert {"layer", "row", "col", "value", "role"} <= set(d["super_weights"][0])
