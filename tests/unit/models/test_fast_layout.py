"""fast_layout: the per-forward weight copies become views, and nothing else changes a bit."""

import copy

import einops
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from tl_spikesink.models import fast_layout, loading, standard_layout

LLAMA = dict(
    normalization_type="RMS", gated_mlp=True, act_fn="silu", positional_embedding_type="rotary",
    rotary_dim=8, n_key_value_heads=2, final_rms=True, original_architecture="LlamaForCausalLM",
)  # fmt: skip
GPT2 = dict(normalization_type="LN", act_fn="gelu_new", positional_embedding_type="standard")
KINDS = {"llama-gqa": LLAMA, "llama-mha": {**LLAMA, "n_key_value_heads": None}, "gpt2": GPT2}


def _model(kind, **extra):
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=48, d_vocab=50, n_ctx=64,
        init_weights=True, device="cpu", **{"seed": 0, **KINDS[kind], **extra},
    )  # fmt: skip
    return HookedTransformer(cfg, move_to_device=False)


@pytest.fixture(params=sorted(KINDS))
def pair(request):
    """A random model and a fast_layout copy of it."""
    model = _model(request.param)
    return model, fast_layout(copy.deepcopy(model))


TOKENS = torch.randint(0, 50, (3, 17), generator=torch.Generator().manual_seed(1))


def _grads(model):
    model.zero_grad()
    model(TOKENS, return_type="loss").backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def test_forward_cache_hooks_and_backward_are_bit_identical(pair):
    before, after = pair
    assert torch.equal(before(TOKENS), after(TOKENS))
    logits_a, cache_a = before.run_with_cache(TOKENS)
    logits_b, cache_b = after.run_with_cache(TOKENS)
    assert torch.equal(logits_a, logits_b) and cache_a.keys() == cache_b.keys()
    for name in cache_a:
        assert torch.equal(cache_a[name], cache_b[name]), name

    def boost(act, hook):
        return act * 3.0

    hooks = [("blocks.0.hook_resid_post", boost), ("blocks.1.attn.hook_v", boost)]
    assert torch.equal(
        before.run_with_hooks(TOKENS, fwd_hooks=hooks),
        after.run_with_hooks(TOKENS, fwd_hooks=hooks),
    )
    grads_a, grads_b = _grads(before), _grads(after)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_state_dict_and_parameters_are_unchanged(pair):
    before, after = pair
    params = {k: id(p) for k, p in after.named_parameters()}
    fast_layout(after)  # again: a no-op, the same Parameter objects throughout
    assert params == {k: id(p) for k, p in after.named_parameters()}
    a, b = before.state_dict(), after.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape and torch.equal(a[key], b[key]), key


def test_the_forward_copies_become_views():
    model = fast_layout(_model("llama-gqa"))
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    # simple_attn_linear's rearrange, and attention's rearrange(W_O).contiguous().
    for w in (attn.W_Q, attn._W_K, attn._W_V):
        flat = einops.rearrange(w, "head_index d_model d_head -> (head_index d_head) d_model")
        assert flat.is_contiguous() and flat.data_ptr() == w.data_ptr()
    out = einops.rearrange(attn.W_O, "head_index d_head d_model -> d_model (head_index d_head)")
    assert out.contiguous().data_ptr() == attn.W_O.data_ptr()
    # GatedMLP and Unembed: W.T.contiguous().
    for w in (mlp.W_gate, mlp.W_in, mlp.W_out, model.unembed.W_U):
        assert w.T.contiguous().data_ptr() == w.data_ptr()


def test_plain_mlp_is_left_alone():
    # MLP multiplies with addmm on the stored layout; re-storing it would only cost.
    model = fast_layout(_model("gpt2"))
    assert model.blocks[0].mlp.W_in.is_contiguous() and model.blocks[0].mlp.W_out.is_contiguous()
    assert not model.blocks[0].attn.W_Q.is_contiguous()


@pytest.mark.parametrize("flag", ["use_split_qkv_input", "use_attn_result", "use_attn_in"])
def test_einsum_paths_set_before_the_call_stay_bit_identical(flag):
    before = _model("llama-mha")
    getattr(before, f"set_{flag}")(True)
    after = fast_layout(copy.deepcopy(before))
    assert torch.equal(before(TOKENS), after(TOKENS))
    grads_a, grads_b = _grads(before), _grads(after)
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)


def test_standard_layout_restores_transformer_lens_layout(pair):
    before, after = pair
    standard_layout(after)
    assert all(p.is_contiguous() for p in after.parameters())
    after.set_use_split_qkv_input(True)
    before.set_use_split_qkv_input(True)
    assert torch.equal(before(TOKENS), after(TOKENS))


def test_dtype_casts_keep_the_layout_and_the_bits(pair):
    before, after = pair
    before, after = before.to(torch.bfloat16), after.to(torch.bfloat16)
    assert not after.blocks[0].attn.W_Q.is_contiguous()  # .to() preserves strides
    assert torch.equal(before(TOKENS), after(TOKENS))


def test_generation_with_kv_cache_is_identical(pair):
    before, after = pair
    kwargs = dict(max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(before.generate(TOKENS[:1], **kwargs), after.generate(TOKENS[:1], **kwargs))


def test_load_state_dict_into_a_fast_model_keeps_its_layout(pair):
    before, after = pair
    other = copy.deepcopy(before)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    after.load_state_dict(other.state_dict())
    assert torch.equal(after(TOKENS), other(TOKENS))
    assert not after.blocks[0].attn.W_Q.is_contiguous()


def test_shared_storage_is_not_untied():
    model = _model("llama-mha")
    first, second = model.blocks[0].attn, model.blocks[1].attn
    with torch.no_grad():
        second.W_Q.data = first.W_Q.data  # tied by the user; re-storing one would untie them
    fast_layout(model)
    assert second.W_Q.data_ptr() == first.W_Q.data_ptr()
    assert not second.W_K.is_contiguous()  # the rest is still re-stored


def test_load_applies_fast_layout(monkeypatch, tmp_path):
    tiny = _model("llama-gqa")
    monkeypatch.setattr(loading, "materialise", lambda *args, **kwargs: tiny)
    model = loading.load("smollm2-135m", cache_dir=tmp_path, progress=False)
    assert model is tiny
    assert (
        model.blocks[0].mlp.W_in.T.is_contiguous() and not model.blocks[0].mlp.W_in.is_contiguous()
    )
