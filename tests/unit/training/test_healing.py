"""Healing after surgery: the copy is operated on, only new and norm parameters train, the
model passed in stays as it was, and each surgery starts where its docstring says."""

from __future__ import annotations

import json

import pytest
import torch

from tl_spikesink.anatomy import Anatomy
from tl_spikesink.errors import SpikeSinkError
from tl_spikesink.training.healing import HealConfig, heal, operate
from tl_spikesink.training.runs import TrainConfig, train
from tl_spikesink.training.tasks import BigramBackcopy
from tl_spikesink.training.variants import DynamicTanh, Variant

TASK = BigramBackcopy(vocab_size=12, n_triggers=2)


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    cfg = TrainConfig(n_layers=2, d_model=32, d_head=8, d_mlp=32, seq_len=32, batch_size=8,
                      steps=20, warmup=1, log_every=20, probe_sequences=4)  # fmt: skip
    model, _ = train(Variant("baseline"), cfg, TASK, progress=False)
    texts = [model.tokenizer.decode(x[1:]) for x in TASK.sample(60, 32, torch.Generator())]
    return model, texts


def small(surgery: str, **kw) -> HealConfig:
    return HealConfig(surgery=surgery, steps=4, seq_len=16, loss_from=4, eval_texts=12,
                      eval_tokens=192, **kw)  # fmt: skip


@pytest.mark.parametrize("surgery", ["dyt", "qk_norm", "gate", "loss_from"])
def test_heal_trains_only_new_and_norm_parameters_of_a_copy(trained, surgery):
    model, texts = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    healed, record = heal(model, small(surgery), texts, progress=False)
    # The model passed in: same weights, no hooks, its config untouched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(h.fwd_hooks for h in model.hook_dict.values())
    assert not model.cfg.use_qk_norm
    # The copy: every parameter that also exists in the original is unchanged unless it is a
    # norm gain; new parameters exist.
    after = healed.state_dict()
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    assert all(".ln" in k or k.startswith("ln_final") for k in changed), changed
    new = set(after) - set(before)
    d, layers, heads = 32, 2, 4
    norms = 2 * layers + 1
    expected = {
        "dyt": norms * (2 * d + 1),  # γ, β and α of every norm
        "qk_norm": norms * d + 2 * layers * 8,  # gains, plus q and k gains over d_head
        "gate": norms * d + layers * (d * heads + heads),
        "loss_from": norms * d,
    }[surgery]
    assert record.trained == expected
    assert [s.name for s in record.stages] == ["clean", "surgery", "healed"]
    assert len(record.losses) == 4
    json.loads(record.to_json())
    if surgery != "loss_from":
        assert new, "the surgery added no parameter"


def test_each_surgery_starts_where_it_says(trained):
    model, texts = trained
    x = TASK.sample(3, 16, torch.Generator().manual_seed(2))
    # A gate at σ(60) = 1 and unit norm gains: exactly the clean model.
    gated = operate(model, small("gate", gate_bias=60.0), texts[:8])
    torch.testing.assert_close(gated(x), model(x))
    assert sum(len(h.fwd_hooks) for h in gated.hook_dict.values()) == 4  # read + gate per block
    masked = operate(model, small("loss_from"), texts[:8])
    torch.testing.assert_close(masked(x), model(x))
    dyt = operate(model, small("dyt"), texts[:8])
    assert Anatomy.of(dyt).normalization_type == "DynamicTanh"
    assert isinstance(dyt.blocks[1].ln2, DynamicTanh) and isinstance(dyt.ln_final, DynamicTanh)
    qk = operate(model, small("qk_norm"), texts[:8])
    assert qk.cfg.use_qk_norm and float(qk.blocks[0].attn.q_norm.w[0].detach()) > 0


def test_bad_settings(trained):
    model, texts = trained
    with pytest.raises(SpikeSinkError, match="surgery"):
        HealConfig(surgery="lobotomy")
    with pytest.raises(SpikeSinkError, match="loss_from"):
        HealConfig(loss_from=200, seq_len=128)
    with pytest.raises(SpikeSinkError, match="none to train on"):
        heal(model, small("gate"), texts[:12], progress=False)
    post = train(Variant("p", norm="post"), TrainConfig(n_layers=1, d_model=16, d_head=4,
                 d_mlp=16, seq_len=16, steps=1, warmup=1, log_every=1, probe_sequences=2,
                 batch_size=2), TASK, progress=False)[0]  # fmt: skip
    with pytest.raises(SpikeSinkError, match="pre-norm"):
        heal(post, small("dyt"), texts, progress=False)


def test_gates_reach_the_new_norms_of_a_folded_model(trained):
    """Models loaded with fold_ln have gain-less RMSNormPre norms; the surgery gives each a gain
    module of its own, and the gate's hooks must read the new module's hook point."""
    import copy

    from transformer_lens.components import RMSNormPre

    model, texts = trained
    folded = copy.deepcopy(model)
    for block in folded.blocks:
        block.ln1, block.ln2 = RMSNormPre(folded.cfg), RMSNormPre(folded.cfg)
    folded.ln_final = RMSNormPre(folded.cfg)
    folded.setup()
    x = TASK.sample(3, 16, torch.Generator().manual_seed(2))
    open_gate = operate(folded, small("gate", gate_bias=60.0), texts[:8])
    torch.testing.assert_close(open_gate(x), folded(x))
    closed = operate(folded, small("gate", gate_bias=-60.0), texts[:8])
    _, cache = closed.run_with_cache(x)
    assert float(cache["blocks.0.attn.hook_z"].abs().max()) < 1e-20
