"""Bare-forward time with TransformerLens's own weight layout against fast_layout.

A random Llama-style HookedTransformer sized like SmolLM2-135M (d_model 576, 30 layers, 9 heads,
3 key/value heads, d_mlp 1536; a small vocabulary, since the bare forward never unembeds), or
the real SmolLM2 with --model. Each layout is timed on the same tokens, best of --repeats, after
one warm-up pass; the outputs of the two layouts are checked to be bit-identical.

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


def _best(model, tokens, return_type, repeats):
    with torch.inference_mode():
        model(tokens, return_type=return_type)  # warm-up: allocator, rotary tables
        out = model(tokens[:, :64])  # logits of a prefix, to compare the layouts
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(tokens, return_type=return_type)
            times.append(time.perf_counter() - start)
    return min(times), out


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

    before, out_before = _best(model, tokens, return_type, args.repeats)
    fast_layout(model)
    restored = sum(
        p.numel() * p.element_size() for p in model.parameters() if not p.is_contiguous()
    )
    after, out_after = _best(model, tokens, return_type, args.repeats)
    same = torch.equal(out_before, out_after)

    print(f"{label}: {args.batch}x{args.tokens} tokens, return_type={return_type}, "
          f"{args.threads} threads, best of {args.repeats}")  # fmt: skip
    print(f"  weights re-stored (copied per pass before): {restored / 1e6:.0f} MB")
    print(f"  TransformerLens layout: {before * 1e3:8.1f} ms")
    print(f"  fast_layout:            {after * 1e3:8.1f} ms")
    print(f"  ratio before/after:     {before / after:8.2f}x   (logits identical: {same})")


if __name__ == "__main__":
    main()
