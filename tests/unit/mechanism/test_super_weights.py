"""Super weights on the planted model: its step-up neuron's weight is the one, and pruning it
removes the planted spike."""

import json

import pytest
import torch
from checks import assert_untouched, state_snapshot
from planted import SPIKE, SPIKE_CHANNEL

import tl_spikesink as ts
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.interventions.weights import super_weight_edit
from tl_spikesink.mechanism.super_weights import super_weights

PROMPT = "the cat sat . on the mat"


@pytest.fixture(scope="module")
def scan(planted, texts):
    return ts.scan(planted, texts, progress=False)


def test_the_planted_step_up_weight_ranks_first(planted, texts, scan):
    # The planted neurons' inputs are ~4.9 (layer 1) and ~15.7 (layer 2), so the cut is 4, not 50.
    r = super_weights(planted, texts, scan, prompt=PROMPT, threshold=4.0)
    top, second = r.candidates
    assert (top.layer, top.row, top.col, top.role) == (1, SPIKE_CHANNEL, 0, "step-up")
    assert (second.layer, second.role) == (2, "step-down")
    assert top.value == pytest.approx(float(planted.blocks[1].mlp.W_out[0, SPIKE_CHANNEL].detach()))
    assert top.max_output == pytest.approx(SPIKE, rel=1e-3)
    assert top.sequences == r.n_sequences  # every sequence starts with the spiking BOS
    d = json.loads(r.to_json())
    assert d["super_weights"][0]["paper_block"] == 4 and {"ppl_clean", "ppl_pruned"} <= set(d)
    assert super_weights(planted, texts, scan, prompt=PROMPT).candidates == ()  # Yu et al.'s 50


def test_pruning_it_removes_the_spike_and_restoring_brings_it_back(planted, texts, scan):
    before = state_snapshot(planted)
    pruned = super_weight_edit(planted, 1, SPIKE_CHANNEL, 0)
    restored = super_weight_edit(planted, 1, SPIKE_CHANNEL, 0, restore_above=100.0)
    tokens = planted.to_tokens(texts[0])
    with pruned.applied(planted):
        _, cache = planted.run_with_cache(tokens)
    assert float(cache["resid_post", 1][..., SPIKE_CHANNEL].abs().max()) < 1.0
    with restored.applied(planted):
        _, again = planted.run_with_cache(tokens)
    _, clean = planted.run_with_cache(tokens)
    torch.testing.assert_close(again["resid_post", 1], clean["resid_post", 1])
    half = super_weight_edit(planted, 1, SPIKE_CHANNEL, 0, scale=0.5)
    with half.applied(planted):
        _, cache = planted.run_with_cache(tokens)
    assert float(cache["mlp_out", 1][0, 0, SPIKE_CHANNEL]) == pytest.approx(SPIKE / 2, rel=1e-4)
    assert_untouched(planted, before)


def test_bad_weights_are_refused(planted):
    with pytest.raises(SpikeSinkError, match="out of range"):
        super_weight_edit(planted, 1, 99, 0)
    with pytest.raises(SpikeSinkError, match="layer 7 out of range"):
        super_weight_edit(planted, 7, 0, 0)
    with pytest.raises(SpikeSinkError, match="positive"):
        super_weights(planted, ["the cat"], threshold=float("nan"))


def test_the_scale_sweep_matches_the_prune_and_the_clean_model(planted, texts, scan, monkeypatch):
    import tl_spikesink.interventions.weights as weights

    made = []

    def spy(*args, **kwargs):
        iv = super_weight_edit(*args, **kwargs)
        made.append((args[1:], kwargs.get("scale", 0.0)))
        return iv

    monkeypatch.setattr(weights, "super_weight_edit", spy)
    before = state_snapshot(planted)
    r = super_weights(planted, texts[:6], scan, prompt=PROMPT, threshold=4.0, scales=(0.0, 1.0, 2.0))
    assert_untouched(planted, before)
    # prune, prune + restore, then one edit of the top weight per scale, all in one evaluation
    assert [scale for _, scale in made] == [0.0, 0.0, 0.0, 1.0, 2.0]
    assert {where for where, _ in made} == {(1, SPIKE_CHANNEL, 0)}
    swept = dict(r.ppl_scaled)
    assert list(swept) == [0.0, 1.0, 2.0]
    # (The planted unembedding ignores the spike, so only these two equalities carry meaning.)
    assert swept[0.0] == pytest.approx(r.ppl_pruned) and swept[1.0] == pytest.approx(r.ppl_clean)
    d = json.loads(r.to_json())
    assert [x["scale"] for x in d["ppl_scaled"]] == [0.0, 1.0, 2.0]
    assert "scaled × 0: " in str(r)
    with pytest.raises(SpikeSinkError, match="evaluate=True"):
        super_weights(planted, texts[:2], scan, scales=(2.0,), evaluate=False)
