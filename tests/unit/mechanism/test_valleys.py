"""Compression valleys: matrix entropy on hand-built matrices; planted spikes with known valleys."""

import json
import math

import pytest
import torch
from checks import assert_untouched, state_snapshot
from planted import SPIKE_CHANNEL, planted_steps, sentences

import tl_spikesink as ts
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.mechanism.valleys import (
    EMBEDDING,
    Valleys,
    compression_valleys,
    matrix_entropy,
    pearson,
)
from tl_spikesink.results import MAX_REPR


@pytest.fixture(scope="module")
def scan(planted, texts):
    return ts.scan(planted, texts, progress=False)


@pytest.fixture(scope="module")
def valleys(planted, texts, scan):
    return compression_valleys(planted, texts[:12], scan, progress=False)


# --- matrix entropy, exact ---------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_rank_one_has_zero_entropy(alpha):
    gen = torch.Generator().manual_seed(0)
    x = torch.outer(torch.randn(6, generator=gen), torch.randn(9, generator=gen))
    assert abs(float(matrix_entropy(x, alpha=alpha))) < 1e-12
    wide = torch.outer(torch.randn(20, generator=gen), torch.randn(4, generator=gen))  # n > D
    assert abs(float(matrix_entropy(wide, alpha=alpha))) < 1e-12


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_orthonormal_vectors_have_entropy_one(alpha):
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(12, 5, generator=gen, dtype=torch.float64))
    assert float(matrix_entropy(7.0 * q.T, alpha=alpha)) == pytest.approx(1.0, abs=1e-12)
    # n > D: the D × D Gram is decomposed; two copies of a basis are isotropic too.
    twice = torch.cat([torch.eye(4), torch.eye(4)])
    assert float(matrix_entropy(twice, alpha=alpha)) == pytest.approx(1.0, abs=1e-12)


def test_known_spectrum_and_renyi_orders():
    # Eigenvalues of K are 3 and 1, so p = 3/4, 1/4.
    x = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64).sqrt())
    p = torch.tensor([0.75, 0.25], dtype=torch.float64)
    shannon = float(-(p * p.log()).sum()) / math.log(2)
    assert float(matrix_entropy(x)) == pytest.approx(shannon, abs=1e-12)
    renyi2 = -math.log(0.75**2 + 0.25**2) / math.log(2)
    assert float(matrix_entropy(x, alpha=2.0)) == pytest.approx(renyi2, abs=1e-12)


def test_masked_rows_never_count_and_centering():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 5, generator=gen)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = False  # right pads
    mask[1, :3] = False  # left pads
    padded = x.clone()
    padded[~mask] = float("nan")  # pad rows of a left-padded forward can be NaN
    got = matrix_entropy(padded, mask)
    want = torch.stack([matrix_entropy(x[0, :5]), matrix_entropy(x[1, 3:])])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    same = torch.ones(4, 6) + 0.0
    assert float(matrix_entropy(same)) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(float(matrix_entropy(same, center=True)))  # nothing left after centering
    # Centering removes the common offset: 2I − (2/3)·11ᵀ has eigenvalues 2, 2, 0.
    shifted = torch.eye(3, dtype=torch.float64) * 2.0 + 5.0
    centered = float(matrix_entropy(shifted, center=True))
    assert centered == pytest.approx(math.log(2) / math.log(3), abs=1e-12)
    assert float(matrix_entropy(shifted)) < 0.5 * centered
    assert math.isnan(float(matrix_entropy(torch.ones(1, 4))))  # one row: no spread to measure


def test_bad_alpha_is_refused():
    for alpha in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(SpikeSinkError, match="alpha"):
            matrix_entropy(torch.eye(3), alpha=alpha)


def test_pearson():
    x = torch.arange(6.0)
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(x, -x) == pytest.approx(-1.0)
    assert math.isnan(pearson(x, torch.ones(6)))
    with_nan = torch.tensor([float("nan"), 1.0, 2.0, 3.0])
    assert pearson(with_nan, torch.tensor([9.0, 1.0, 2.0, 3.0])) == pytest.approx(1.0)


# --- planted models ------------------------------------------------------------------------------


def test_entropy_drops_and_norm_ratio_rises_at_the_spike_layers():
    # Blocks 1–3 carry a 3000 spike at BOS and "." (written by block 1, removed by block 4).
    model = planted_steps([0.0, 3000.0, 0.0, 0.0, -3000.0], noise=0.5)
    v = compression_valleys(model, sentences(10), ablations=(), progress=False)
    assert v.layers == (EMBEDDING, 0, 1, 2, 3, 4)
    e, ratio = v.entropy[0], v.norm_ratio[0]
    spike, calm = [2, 3, 4], [0, 1, 5]  # indices into layers
    assert float(e[spike].max()) < 0.1 < float(e[calm].min())
    assert float(ratio[spike].min()) > 100 * float(ratio[calm].max())
    assert v.valley_layer() in (1, 2, 3)
    assert v.entropy_vs_norm() < -0.9
    assert v.depth() > 0.2


def test_the_valley_follows_the_spike_under_ablation(valleys):
    v = valleys
    assert v.runs == ("clean", "mean", "zero")
    assert v.valley_layer("clean") == 1  # the planted spike lives at resid_post of block 1 only
    e = dict(zip(v.runs, v.entropy[:, 2].tolist(), strict=True))  # layer 1
    assert e["clean"] < 0.1 and e["mean"] < 0.1  # the mean of the spike tokens is still a spike
    assert e["zero"] > 0.3
    assert v.depth("zero") < 0.5 * v.depth("clean")
    assert v.depth("mean") == pytest.approx(v.depth("clean"), abs=0.05)
    assert float(v.norm_ratio[2, 2]) < 0.01 * float(v.norm_ratio[0, 2])
    assert v.ablations["zero"]["channels"] == [SPIKE_CHANNEL]
    assert v.ablations["zero"]["layers"] == [1]


def test_sink_ratio_is_the_scans_eq28_ratio(valleys, planted, texts):
    clean = ts.scan(planted, texts[:12], progress=False)
    assert math.isnan(float(valleys.sink_ratio[0, 0]))  # the embedding has no heads
    torch.testing.assert_close(valleys.sink_ratio[0, 1:], clean.sinks.sink_ratio_per_layer.double())
    assert float(valleys.sink_ratio[0, 1]) == 0.5  # layer 0: the planted sink head of two


def test_last_layer_lens_loss_is_the_models_loss(planted, texts):
    v = compression_valleys(planted, texts[:6], ablations=(), progress=False)
    with torch.inference_mode():
        losses = [
            planted(planted.to_tokens(t), return_type="loss", loss_per_token=True).flatten()
            for t in texts[:6]
        ]
    want = float(torch.cat(losses).double().mean())
    assert float(v.lens_loss[0, -1]) == pytest.approx(want, rel=1e-5)
    assert v.lens_loss[0].isfinite().all()


def test_ablation_passes_leave_the_model_unchanged(planted, texts, scan):
    before = state_snapshot(planted)
    compression_valleys(planted, texts[:4], scan, progress=False)
    assert_untouched(planted, before)


def test_pads_never_count_with_both_padding_sides(planted, texts, scan):
    # Unequal lengths: batches of 5 pad; batches of 1 have no pads at all.
    kw = {"ablations": ("zero",), "logit_lens": "all", "progress": False}
    single = compression_valleys(planted, texts[:10], scan, batch_size=1, **kw)
    for side in ("right", "left"):
        v = compression_valleys(planted, texts[:10], scan, batch_size=5, padding_side=side, **kw)
        for field in ("entropy", "norm_ratio", "sink_ratio", "lens_loss"):
            torch.testing.assert_close(
                getattr(v, field), getattr(single, field), rtol=1e-5, atol=1e-6,
                equal_nan=True, msg=f"{field}, {side} padding",
            )  # fmt: skip


def test_result_contract_and_view(valleys):
    from tl_spikesink.views.valleys import plot_valleys

    v = valleys
    assert isinstance(v, Valleys)
    with pytest.raises(AttributeError):
        v.alpha = 2.0
    r = repr(v)
    assert r.startswith("Valleys(") and len(r) <= MAX_REPR
    text = v.to_json()
    assert "NaN" not in text
    d = json.loads(text)
    assert set(d["runs"]) == {"clean", "mean", "zero"}
    assert d["runs"]["clean"]["valley_layer"] == 1 and d["runs"]["clean"]["sink_ratio"][0] is None
    assert d["corpus"][0]["sha256"] and d["settings"]["alpha"] == 1.0
    assert d["runs"]["zero"]["lens_loss"] == [None] * len(v.layers)  # clean run only by default
    s = str(v)
    assert "valley at layer 1" in s and "emb" in s
    with pytest.raises(SpikeSinkError, match="no run"):
        v.depth("clamp")
    fig = plot_valleys(v)
    names = {t.name for t in fig.data}
    assert {"entropy · clean", "entropy · zero", "‖x₀‖/median · clean"} <= names
    assert {"sink ratio · clean", "logit-lens loss · clean"} <= names


def test_bad_input_is_refused(planted, texts):
    with pytest.raises(SpikeSinkError, match="ablations"):
        compression_valleys(planted, texts[:2], ablations=("clamp",), progress=False)
    with pytest.raises(SpikeSinkError, match="ablations"):
        compression_valleys(planted, texts[:2], ablations=("zero", "zero"), progress=False)
    with pytest.raises(SpikeSinkError, match="alpha"):
        compression_valleys(planted, texts[:2], alpha=0.0, progress=False)
    with pytest.raises(SpikeSinkError, match="logit_lens"):
        compression_valleys(planted, texts[:2], logit_lens=True, progress=False)


def test_default_corpus_calibrates_on_the_texts_it_did_not_read(planted, monkeypatch):
    import tl_spikesink.corpus as corpus_module
    import tl_spikesink.interventions.spikes as spikes_module

    pool = sentences(40, seed=3)
    monkeypatch.setattr(corpus_module, "default_texts", lambda: list(pool))
    calibrated = []
    real = spikes_module.spike_ablation

    def spy(scan, mode, model, calibration):
        calibrated.append(calibration)
        return real(scan, mode=mode, model=model, calibration=calibration)

    monkeypatch.setattr(spikes_module, "spike_ablation", spy)
    v = compression_valleys(planted, None, ablations=("mean",), logit_lens="none",
                            max_tokens=150, progress=False)  # fmt: skip
    assert v.runs == ("clean", "mean")
    # The calibration texts are the pool's texts the measured corpus (150 tokens) did not reach.
    read = 1 + max(c.text_index for c in ts.tokenize(planted, pool, max_tokens=150).chunks)
    assert 0 < read < len(pool) and calibrated[0].n_texts == len(pool) - read
