"""Interventions on SmolLM2-135M: measured effects, asserted with wide margins (CPU, ~1k tokens)."""

import pytest

import tl_spikesink as ts
from tl_spikesink.evaluation.scoring import evaluate_all
from tl_spikesink.evaluation.decoupling import CALIBRATION_SHARE
from tl_spikesink.interventions import sink_key_removal, spike_ablation
from tl_spikesink.probes.scan import ScanConfig

pytestmark = pytest.mark.integration

CONFIG = ScanConfig(max_tokens=1024, batch_size=8)


@pytest.fixture(scope="module")
def corpora(smollm2):
    # The experiment's default split: calibration and evaluation paragraphs never overlap.
    paragraphs = ts.default_texts()
    cut = int(len(paragraphs) * CALIBRATION_SHARE)
    evaluation = ts.tokenize(smollm2, paragraphs[cut:], name="held-out", max_tokens=1024)
    calibration = ts.tokenize(smollm2, paragraphs[:cut], name="calibration", max_tokens=1024)
    return evaluation, calibration


@pytest.fixture(scope="module")
def clean(smollm2, corpora):
    return evaluate_all(smollm2, corpora[0], [None], config=CONFIG, progress=False)[0]


@pytest.fixture(scope="module")
def evaluations(smollm2, corpora, clean):
    interventions = [
        spike_ablation(clean.scan, mode="zero", model=smollm2),
        spike_ablation(clean.scan, mode="mean", calibration=corpora[1], model=smollm2),
        sink_key_removal(clean.scan, heads="all", model=smollm2),
    ]
    evs = evaluate_all(
        smollm2,
        corpora[0],
        interventions,
        config=CONFIG,
        sink_heads=clean.sink_heads,
        progress=False,
    )
    return dict(zip(["zero", "mean", "sinks"], evs, strict=True))


def test_defaults_target_the_main_spike_at_block_11(clean, evaluations):
    settings = evaluations["zero"].settings
    assert settings["layers"] == [11]  # not the ~870 step-up of blocks 1-2
    assert settings["channels"][0] == 507 and 247 in settings["channels"]
    # The relative cut keeps ordinary tokens (|x| ~ 150 in channel 507) out of the ablation.
    assert settings["threshold"]["11"] > 300
    assert 10 < clean.perplexity < 100


def test_zeroing_the_spike_breaks_the_model_and_the_mean_does_not(clean, evaluations):
    zero, mean = evaluations["zero"], evaluations["mean"]
    assert zero.perplexity > 1000 * clean.perplexity  # docs/definitions.md: 44 -> 2.9e6 on held-out prose
    assert zero.kl > 5 and zero.top1_agreement < 0.2
    assert abs(mean.perplexity / clean.perplexity - 1) < 0.10  # Sun et al.: the value is a constant
    assert mean.top1_agreement > 0.9
    means = mean.settings["means"]["11"]
    assert 1.5e4 < abs(means[0]) < 4e4
    # After zeroing, no residual value on the plateau comes near the clean spike (2.3e4-2.6e4) ...
    assert zero.scan.spikes.top("resid_post", 1)[12:27, 0].max() < 5e3
    # ... but the step-down blocks still write minus the spike they expect to cancel, so the
    # last layers carry a spike of the opposite sign in the same channel.
    before = clean.scan.spikes.top_activations("resid_post", 20, 1)[0]
    after = zero.scan.spikes.top_activations("resid_post", 29, 1)[0]
    assert after.channel == before.channel and after.value * before.value < 0
    assert abs(after.value) > 1e4


def test_removing_sink_keys_removes_the_sinks(clean, evaluations):
    sinks = evaluations["sinks"]
    assert clean.scan.sinks.first_token_sink_ratio > 0.3
    assert sinks.scan.sinks.first_token_sink_ratio < 0.02
    # No attention is left on the first key: the distance with and without it is the same.
    assert sinks.sink_head_distance == pytest.approx(sinks.sink_head_distance_without_sink, rel=0.1)
    assert clean.sink_head_distance > 1.3 * clean.sink_head_distance_without_sink
