"""SAEs on SmolLM2's plateau: the spike mask, and what an SAE that never saw a spike does to it.

At `blocks.15.hook_resid_post` the first token of every sequence carries the spike (channels 507
and 247, norm ~2e4 against ~170 for the rest). A tiny SAE trained without the spike tokens
reconstructs the first token badly, and its error there lies in the spike channels; splicing it
in at that one token breaks the sink and costs the whole sequence.
"""

import pytest
import torch

import tl_spikesink as ts
from tl_spikesink.saes import collect_activations, sae_report, train_sae

pytestmark = pytest.mark.integration
HOOK = "blocks.15.hook_resid_post"


@pytest.fixture(scope="module")
def trained(smollm2):
    acts = collect_activations(
        smollm2, HOOK, ts.default_texts()[100:160], max_tokens=512, max_seq_len=64, progress=False
    )
    sae = train_sae(
        smollm2,
        HOOK,
        activations=acts,
        exclude="spikes",
        expansion=1,
        steps=50,
        batch_size=128,
        progress=False,
    )
    return acts, sae


def test_spike_rule_flags_exactly_the_first_tokens(trained):
    acts, _ = trained
    assert int(acts.spike.sum()) == acts.corpus["n_sequences"]
    norms = acts.x.norm(dim=-1)
    assert norms[acts.spike].min() > 50 * norms[~acts.spike].median()
    spike_channels = acts.x[acts.spike][:, [507, 247]].abs()
    assert (spike_channels.max(-1).values > 1e3).all()


def test_report_of_an_sae_that_never_saw_a_spike(smollm2, trained):
    _, sae = trained
    texts = ts.default_texts()[700:704]
    runs = ("zero", "sae", "spike_only", "bypass")
    r = sae_report(smollm2, sae, texts, max_seq_len=64, max_tokens=256, runs=runs, progress=False)
    n_sequences = r.corpus[0]["n_sequences"]
    assert r.n("spike") >= n_sequences  # every first token, from the scan of these texts
    assert r.spike_channel_error_share("spike") > 0.8  # measured 0.94
    assert r.spike_channel_error_share("normal") < 0.2
    assert r.mse("spike") > 100 * r.mse("normal")
    assert r.delta_loss("spike_only") > 0.5  # measured 1.66 nats
    assert r.loss_recovered("bypass") > r.loss_recovered("sae")
    leftover = [n for n, hp in smollm2.hook_dict.items() if hp.fwd_hooks or hp.bwd_hooks]
    assert not leftover
    assert torch.isfinite(torch.tensor(r.loss("sae")))
