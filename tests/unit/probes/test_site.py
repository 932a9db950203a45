"""One spike-site rule: the step-up block carrying the largest spike, or a reason there is none."""

import json
import pickle

import pytest
import torch
from planted import SPIKE, SPIKE_CHANNEL, planted_model, planted_steps

import tl_spikesink as ts
from tl_spikesink.anatomy import paper_block
from tl_spikesink.probes.site import NoStepUpBlock, SiteBlock, spike_site


@pytest.fixture(scope="module")
def scan(planted, texts):
    return ts.scan(planted, texts, batch_size=6, progress=False)


def test_planted_step_up_mlp_is_the_site(scan):
    site = spike_site(scan)
    assert site.main == SiteBlock(1, "mlp", 4)
    assert site.step_up == (SiteBlock(1, "mlp", 4),)
    assert site.layer == 1 and site.channels == (SPIKE_CHANNEL,)
    assert site.step_down == 2 and site.step_down_layers == (2,)
    assert site.peak == pytest.approx(SPIKE, abs=1)
    median = float(scan.spikes.median("resid_post")[1])
    assert site.cut == max(scan.config.abs_threshold, scan.config.rel_threshold * median)
    assert "paper block 4" in site.reason
    record = json.loads(json.dumps(site.to_dict()))
    assert (record["layer"], record["component"], record["paper_block"]) == (1, "mlp", 4)


def test_largest_spike_wins_over_most_events(texts):
    # Layer 0's MLP writes 500 at BOS and "." (more tokens), layer 2's writes 5000 at BOS only.
    model = planted_steps([500.0, 0.0, 5000.0, 0.0], bos_only=(2,))
    r = ts.scan(model, texts, progress=False)
    counts = r.spikes.lifecycle["step_up"]
    assert counts[(0, "mlp")] > counts[(2, "mlp")] > 0
    site = spike_site(r)
    assert site.step_up == (SiteBlock(0, "mlp", 2), SiteBlock(2, "mlp", 6))
    assert site.main == SiteBlock(2, "mlp", 6) and site.layer == 2
    assert site.peak == pytest.approx(5500.0, rel=1e-4)
    assert "layer 0 mlp" in site.reason  # the other step-up block is named too


def test_gradual_spike_has_no_step_up_block(texts):
    # Every block adds 40: resid_post carries 40, 80, 120, ... and is massive (> 100) from layer
    # 2 on, where no block writes half of it.
    model = planted_steps([40.0] * 6)
    r = ts.scan(model, texts, progress=False)
    assert r.spikes.massive_layers == (2, 3, 4, 5)
    with pytest.raises(
        NoStepUpBlock, match="no step-up block: the spike accumulates over blocks 2–5"
    ):
        spike_site(r)
    try:
        spike_site(r)
    except NoStepUpBlock as e:
        assert isinstance(e, ts.SpikeSinkError)
        assert (e.first, e.last) == (2, 5)
        again = pickle.loads(pickle.dumps(e))
        assert (again.first, again.last, str(again)) == (2, 5, str(e))


def test_no_massive_activation_is_a_plain_error(texts):
    model = planted_model()
    with torch.no_grad():
        model.blocks[1].mlp.W_out.zero_()
    r = ts.scan(model, texts[:4], progress=False)
    with pytest.raises(ts.SpikeSinkError, match="no massive activation") as info:
        spike_site(r)
    assert not isinstance(info.value, NoStepUpBlock)


def test_a_scan_without_block_outputs_cannot_place_the_site(planted, texts):
    r = ts.scan(planted, texts[:4], spike_sites=("resid_post",), progress=False)
    with pytest.raises(ts.SpikeSinkError, match="spike_sites"):
        spike_site(r)


def test_old_import_paths_are_the_same_objects():
    from tl_spikesink import mechanism
    from tl_spikesink.mechanism import captures
    from tl_spikesink.probes import site

    assert captures.spike_site is site.spike_site and captures.SpikeSite is site.SpikeSite
    assert mechanism.spike_site is site.spike_site


def test_paper_block_numbering():
    assert [paper_block(layer, c) for layer in range(2) for c in ("attn", "mlp")] == [1, 2, 3, 4]
    with pytest.raises(ts.SpikeSinkError, match="component"):
        paper_block(0, "ffn")
    with pytest.raises(ts.SpikeSinkError, match="layer"):
        paper_block(-1, "mlp")


def test_overshooting_a_cancellation_is_a_step_down_not_a_new_site(texts):
    # Layer 0 writes +3000, layer 1 writes -6000: the residual flips from +3000 to -3000.
    model = planted_steps([3000.0, -6000.0])
    r = ts.scan(model, texts, progress=False)
    assert r.spikes.massive_layers == (0, 1)
    assert set(r.spikes.lifecycle["step_up"]) == {(0, "mlp")}
    assert set(r.spikes.lifecycle["step_down"]) == {(1, "mlp")}
    assert spike_site(r).main == SiteBlock(0, "mlp", 2)
