"""The neighbouring work on SmolLM2: kurtosis, outlier rules, quantization, valleys, BOS audit."""

import json

import pytest

import tl_spikesink as ts

pytestmark = pytest.mark.integration
TEXTS = ts.default_texts()[:8]


def test_kurtosis_is_heavy_tailed_and_the_spike_tokens_add_to_it(smollm2_scan):
    k = ts.probes.excess_kurtosis(smollm2_scan)
    assert len(k.per_layer) == 30 and k.n_spike_tokens == len(smollm2_scan.spikes.tokens) > 0
    # Measured on 4,096 tokens: mean 103 (97.8 without the spike tokens), peak 236 at layer 28.
    assert k.mean > 20 and k.peak_layer >= 20
    # Where the spike lives (block 11's MLP to the step-down at layer 29), its tokens raise it.
    assert all(k.per_layer[ell] > k.per_layer_without_spikes[ell] for ell in (12, 20, 28))
    assert json.loads(smollm2_scan.to_json())["kurtosis"]["per_layer"]


def test_the_three_rules_flag_the_same_spike(smollm2_scan):
    c = ts.probes.compare_detectors(smollm2_scan)
    sun, mad, persistent = (c.get(r) for r in ("sun", "mad", "persistent"))
    assert 507 in sun.channels and 507 in mad.channels and 507 in persistent.channels
    # Measured: 98 % (MAD) and 97 % (persistent) of Sun's flags agree; the same 56 tokens.
    assert c.agreement("sun", "mad") > 0.9 and c.agreement("sun", "persistent") > 0.9
    assert set(persistent.tokens) <= set(sun.tokens)


def test_quantization_hurts_most_where_the_spike_sets_the_scale(smollm2, smollm2_scan):
    q = ts.evaluation.quantization(smollm2, TEXTS, smollm2_scan, bits=(8,),
                                   granularities=("tensor", "token"),
                                   keeps=("none", "spike"), sites=("resid",), weight_bits=(),
                                   max_tokens=256, progress=False)  # fmt: skip
    tensor, kept = q.row("A INT8 per-tensor"), q.row("A INT8 per-tensor, spike kept")
    token = q.row("A INT8 per-token")
    # Measured on 1,024 tokens, all four sites: Δloss 8.1 per tensor, 86 % recovered by
    # keeping the spike tokens; 0.097 per token.
    assert tensor.delta_loss["rest"] > 10 * token.delta_loss["rest"]
    assert kept.recovered > 0.5 and kept.error["spike"] == 0.0


def test_the_valley_sits_where_the_spike_is_and_goes_without_it(smollm2, smollm2_scan):
    v = ts.mechanism.compression_valleys(smollm2, TEXTS, smollm2_scan, ablations=("zero",),
                                         logit_lens="none", max_tokens=512, progress=False)  # fmt: skip
    # Measured on 1,024 tokens: valley at layer 11 (the step-up block), depth 0.53;
    # zeroed spike: depth 0.32; r(entropy, log norm ratio) = -0.97.
    assert 9 <= v.valley_layer("clean") <= 14
    assert v.depth("zero") < 0.8 * v.depth("clean")
    assert v.entropy_vs_norm("clean") < -0.8


def test_bos_audit(smollm2):
    audit = ts.evaluation.bos_audit(smollm2, TEXTS[:4], progress=False)
    assert audit.reference == "with_bos" and not audit.default_prepend_bos  # SmolLM2 adds none
    rows = {r.condition: r for r in audit.rows}
    assert len({r.n_targets for r in rows.values()}) == 1  # the same targets in every condition
    # Measured on 16 texts: the first token spikes whatever it is; a BOS mid-sequence does not.
    assert all(r.spike_first for r in rows.values())
    assert rows["packed"].spike_mid is False and not rows["packed"].mid_sink_heads
    assert len(rows["with_bos"].sink_heads) > 100
