"""Bare-forward time with TransformerLens's own weight layout against fast_layout.

A random Llama-style HookedTransformer sized like SmolLM2-135M (d_model 576, 30 layers, 9 heads,
3 key/value heads, d_mlp 1536; a small vocabulary, since the bare forward never unembeds), or
the real SmolLM2 with --model. Each layout is timed on the same tokens, best of --repeats, after
one warm-up pass, the two layouts alternating; their logits are checked to be bit-identical.
The copies the TransformerLens layout makes are also timed by themselves.

    python benchmarks/bench_layout.py                        # random SmolLM2-sized, 512 tokens
    python benchmarks/bench_layout.py --model smollm2-135m   # the real model, from the cache
    python benchmarks/bench_layout.py --return-type logits   # include the unembedding
"""

from __future__ import annotations

import argparse
import time

import torch


def _random_model(vocab: int):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=30, d_model=576, n_heads=9, d_head=64, n_key_value_heads=3, d_mlp=1536,
        d_vocab=vocab, n_ctx=2048, act_fn="silu", gated_mlp=True, normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=64, final_rms=True, init_weights=True,
        seed=0, device="cpu", original_architecture="LlamaForCausalLM",
    )  # fmt: skip
    return HookedTransformer(cfg, move_to_device=False).eval()


def _timed(model, tokens, return_type):
    with torch.inference_mode():
        start = time.perf_counter()
        model(tokens, return_type=return_type)
        return time.perf_counter() - start


def _copies_alone(model, return_type):
    """The weight copies a forward makes under TransformerLens's layout, timed by themselves."""
    import einops

    with torch.inference_mode():
        start = time.perf_counter()
        for block in model.blocks:
            attn, mlp = block.attn, block.mlp
            for w in (attn.W_Q, getattr(attn, "_W_K", attn.W_K), getattr(attn, "_W_V", attn.W_V)):
                einops.rearrange(w, "h m d -> (h d) m")
            einops.rearrange(attn.W_O, "h d m -> m (h d)").contiguous()
            for w in (mlp.W_gate, mlp.W_in, mlp.W_out):
                w.T.contiguous()
        if return_type is not None:
            model.unembed.W_U.T.contiguous()
        return time.perf_counter() - start


def main() -> None:
    """Print the time per pass under each layout and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a tl_spikesink model name; random if unset")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=1000, help="random model's vocabulary")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--return-type", default="none", choices=("none", "logits"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return_type = None if args.return_type == "none" else args.return_type

    from tl_spikesink.models.layout import fast_layout, standard_layout

    if args.model is None:
        model, label = _random_model(args.vocab), "random SmolLM2-sized Llama"
    else:
        from tl_spikesink.models import load

        model, label = load(args.model, device="cpu", progress=False), args.model
    standard_layout(model)  # load() already applied fast_layout; time TransformerLens's first
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (args.batch, args.tokens), generator=gen)

    with torch.inference_mode():
        model(tokens, return_type=return_type)  # warm-up: allocator, rotary tables
        out_before = model(tokens[:, :64])  # logits of a prefix, to compare the layouts
    copies = min(_copies_alone(model, return_type) for _ in range(args.repeats))
    fast_layout(model)
    restored = sum(
        p.numel() * p.element_size() for p in model.parameters() if not p.is_contiguous()
    )
    with torch.inference_mode():
        same = torch.equal(out_before, model(tokens[:, :64]))
    # Alternate the layouts, so drift in machine load (other processes) hits both alike.
    before, after = [], []
    for _ in range(args.repeats):
        before.append(_timed(standard_layout(model), tokens, return_type))
        after.append(_timed(fast_layout(model), tokens, return_type))
    before, after = min(before), min(after)

    print(f"{label}: {args.batch}x{args.tokens} tokens, return_type={return_type}, "
          f"{args.threads} threads, best of {args.repeats}")  # fmt: skip
    print(f"  weights re-stored (copied per pass before): {restored / 1e6:.0f} MB")
    print(f"  those copies alone:     {copies * 1e3:8.1f} ms")
    print(f"  TransformerLens layout: {before * 1e3:8.1f} ms")
    print(f"  fast_layout:            {after * 1e3:8.1f} ms")
    print(f"  ratio before/after:     {before / after:8.2f}x   (logits identical: {same})")


if __name__ == "__main__":
    main()
