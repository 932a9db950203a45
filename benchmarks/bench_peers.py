"""The scan against what a user would run instead: the HF scripts of the peer repositories.

Same model (the built-in GGUF, dequantized once for both stacks), same token sequences, one
process. Rows:

- ``hf_peer``: an HF eager forward with ``output_hidden_states`` and ``output_attentions``, then
  per layer the top-3 and median |x| of the hidden states and each head's attention to the first
  token; what locuslab/massive-activations and the attention-sink scripts do.
- ``hf_sdpa_floor``: the HF base model (no LM head) with SDPA attention: the floor here.
- ``tl_bare``: the TransformerLens forward without logits (``return_type=None``), the host the
  scan runs on.
- ``tl_cached``: ``run_with_cache`` without logits, what a notebook user would write by hand.
- ``scan``: ``ts.scan(model, corpus)``.
- ``scan_resid_only`` (only when named in ``--modes``): ``ts.scan`` reading the residual
  stream alone (``spike_sites=("resid_post",)``), without the block outputs; the floor of a
  scan that still finds spikes and sinks, to show what the default's step-up / step-down
  reading costs.
- ``scan_torch`` (only when named in ``--modes``): ``ts.scan`` with the compiled CPU kernels
  switched off (``kernels.switched_off()``, as ``TL_SPIKESINK_KERNELS=0`` does): the torch
  reductions a GPU runs, to show what the kernels save in the same run.
- with ``--bridge``, ``bridge_bare`` and ``bridge_scan``: the same two on a TransformerBridge
  booted from the HF eager model (compatibility mode). Its bare forward computes the logits
  even with ``return_type=None``; its scan stops after the last block it reads.

Each row at batch 1 and at batch 8 (padded, with the mask; TransformerLens gets no mask for a
batch without pads, as the scan's engine calls it), the modes interleaved round by round
so drift in the machine's load hits them alike (each round in its own seeded order);
the best of ``--repeats`` rounds is printed with its ratio to the HF peer and to ``tl_bare``,
and the load average before and after. The
``paired`` column is the median over rounds of each run's time over the bare TL forward's in
the same round: steadier than a ratio of bests where the machine's speed drifts. Below the
table each run's paired median comes with a 95 % bootstrap interval over the rounds: on a
shared 2-core machine one round's ratio has ranged from 0.86 to 1.38, so a 5 % bar needs many
rounds (``--batch-sizes 1 --repeats 60``) and is only settled where the interval clears it.

    python benchmarks/bench_peers.py                    # SmolLM2, CPU, 1,024 tokens
    python benchmarks/bench_peers.py --repeats 7 --json peers.json
    python benchmarks/bench_peers.py --bridge           # also the TransformerBridge route
    python benchmarks/bench_peers.py --modes tl_bare scan scan_torch scan_resid_only
    python benchmarks/bench_peers.py --device cuda --dtype bfloat16 --tokens 16384
    python benchmarks/bench_peers.py --steady-malloc    # every mode with a steady allocator
    python benchmarks/bench_peers.py --modes tl_bare scan --batch-sizes 1 --repeats 60

``--steady-malloc`` reruns the benchmark with glibc's allocator told to keep what it has
(``STEADY_MALLOC`` below). By default glibc gives the big activations' pages back and takes
them again: at batch 8 a TransformerLens forward takes from a thousand to 190,000 page faults,
depending on how earlier runs left the heap, and its time moves by 10 % with them, for every
mode alike. With the setting every mode runs faster and within about 1 % of itself, so a
ratio of a few percent can be read; it measures the same code, not what a default process
gets. (A library cannot set this for its user: it is the whole process's, read at start.)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import statistics
import sys
import time

import torch

MODES = ("hf_peer", "hf_sdpa_floor", "tl_bare", "tl_cached", "scan")
BRIDGE_MODES = ("bridge_bare", "bridge_scan")
EXTRA_MODES = ("scan_resid_only", "scan_torch")
BATCH_SIZES = (1, 8)
STEADY_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),  # blocks up to 32 MiB come from the heap
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),  # which is not given back to the system
    "MALLOC_TOP_PAD_": str(64 << 20),  # and grows 64 MiB at a time
}


def _hf_model(name: str, device: str, dtype: torch.dtype, impl: str):
    """The built-in model's GGUF as an HF model (sharing nothing with TL's copy)."""
    from transformers import AutoModelForCausalLM

    from tl_spikesink.models.cache import cache_root
    from tl_spikesink.models.fetch import fetch
    from tl_spikesink.models.registry import MODELS

    path = fetch(MODELS[name], cache_root(None), progress=False)
    with contextlib.redirect_stderr(io.StringIO()):  # the de-quantization progress bars
        hf = AutoModelForCausalLM.from_pretrained(
            path.parent,
            gguf_file=path.name,
            local_files_only=True,
            dtype=dtype,
            attn_implementation=impl,
        )
    return hf.to(device).eval()


def _bridge(name: str, device: str, dtype: torch.dtype, tokenizer):
    """A TransformerBridge around an HF eager model of its own: booting wraps the HF modules
    it is given, which would slow the peer's forward."""
    import tempfile

    from transformer_lens.model_bridge import TransformerBridge

    hf = _hf_model(name, device, dtype, "eager")
    with tempfile.TemporaryDirectory() as folder:
        hf.config.save_pretrained(folder)
        with contextlib.redirect_stderr(io.StringIO()):
            bridge = TransformerBridge.boot_transformers(folder, hf_model=hf, tokenizer=tokenizer)
    bridge.enable_compatibility_mode()
    return bridge


def _peer_stats(hidden, attentions, mask):
    """What the peer scripts compute from the outputs: top-3 / median |x| and α₀ per layer."""
    real = mask.bool()
    for h, a in zip(hidden[1:], attentions, strict=True):
        x = h[real].abs()
        x.flatten().topk(3)
        x.median()
        (a[:, :, :, 0] * mask[:, None, :]).sum(-1)


def _run(mode, ctx):
    model, hf, corpus, bs = ctx["tl"], ctx["hf"], ctx["corpus"], ctx["batch_size"]
    batches = ctx["batches"]["tl" if mode.startswith("tl_") else "hf"]
    if mode in ("scan", "bridge_scan", "scan_resid_only", "scan_torch"):
        host = ctx["bridge"] if mode == "bridge_scan" else model
        sites = {"spike_sites": ("resid_post",)} if mode == "scan_resid_only" else {}
        from tl_spikesink.probes import kernels

        off = kernels.switched_off() if mode == "scan_torch" else contextlib.nullcontext()
        with off:
            ctx["ts"].scan(host, corpus, batch_size=bs, progress=False, **sites)
        return
    with torch.inference_mode():
        for tokens, mask in batches:
            if mode == "hf_peer":
                out = hf["eager"](
                    tokens, attention_mask=mask, output_hidden_states=True, output_attentions=True
                )
                _peer_stats(out.hidden_states, out.attentions, mask)
            elif mode == "hf_sdpa_floor":
                hf["sdpa"].model(tokens, attention_mask=mask)
            elif mode == "tl_bare":
                model(tokens, attention_mask=mask, return_type=None)
            elif mode == "bridge_bare":
                ctx["bridge"](tokens, attention_mask=mask, return_type=None)
            else:
                _, cache = model.run_with_cache(tokens, attention_mask=mask, return_type=None)
                del cache


def _ratios(rounds: dict[tuple[str, int], list[float]], mode: str, bs: int) -> list[float]:
    """`mode`'s time over the TL bare forward's in the same round, round by round."""
    base = rounds.get(("tl_bare", bs), [])
    return [t / b for t, b in zip(rounds[mode, bs], base, strict=False)]


def _interval(ratios: list[float], level: float = 0.95, draws: int = 2000) -> tuple[float, float]:
    """A bootstrap interval of the paired median (seeded: the same rounds give the same one).

    On a shared machine one round's ratio moves by tens of percent; the interval says which
    differences a run can tell apart at all (a 5 % bar needs one that clears the bar).
    """
    if len(ratios) < 2:
        return float("nan"), float("nan")
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    tail = int(draws * (1 - level) / 2)
    return medians[tail], medians[draws - 1 - tail]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument(
        "--modes", nargs="+", default=list(MODES), choices=MODES + BRIDGE_MODES + EXTRA_MODES
    )
    parser.add_argument("--bridge", action="store_true", help="also run the bridge modes")
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument(
        "--steady-malloc", action="store_true", help="rerun with a steady allocator (see above)"
    )
    args = parser.parse_args()
    if args.steady_malloc and any(os.environ.get(k) != v for k, v in STEADY_MALLOC.items()):
        # glibc reads these once, at start: the benchmark starts again with them.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **STEADY_MALLOC})
    if args.bridge:
        args.modes += [m for m in BRIDGE_MODES if m not in args.modes]

    import tl_spikesink as ts

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = ts.load(args.model, device=args.device, dtype=dtype, progress=False)
    hf = {impl: _hf_model(args.model, args.device, dtype, impl) for impl in ("eager", "sdpa")}
    bridge = None
    if any(m in BRIDGE_MODES for m in args.modes):
        bridge = _bridge(args.model, args.device, dtype, model.tokenizer)
    corpus = ts.tokenize(
        model, ts.default_texts(), max_seq_len=args.seq_len, max_tokens=args.tokens, name="peers"
    )
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    load_before = os.getloadavg()
    best: dict[tuple[str, int], float] = {}
    rounds: dict[tuple[str, int], list[float]] = {}
    for bs in args.batch_sizes:
        batches = [
            (b.tokens.to(args.device), b.mask.long().to(args.device)) for b in corpus.batches(bs)
        ]
        # TransformerLens as the scan calls it: an unpadded batch without its all-ones mask
        # (which a HookedTransformer would combine with the causal mask in every layer).
        ctx_batches = {
            "tl": [(t, m if not bool(m.all()) else None) for t, m in batches],
            "hf": batches,
        }
        ctx = {
            "ts": ts,
            "tl": model,
            "hf": hf,
            "corpus": corpus,
            "batch_size": bs,
            "bridge": bridge,
            "batches": ctx_batches,
        }
        for mode in args.modes:  # warm-up
            _run(mode, ctx)
        for r in range(args.repeats):
            # Each round in its own order (seeded), so that no mode always runs right after
            # the same one: in a fixed order, rotated or not, the scan always followed
            # run_with_cache, whose gigabytes at batch 8 the allocator has just given back
            # and the next run faults in again (a few points at batch 8).
            for mode in random.Random(r).sample(args.modes, len(args.modes)):
                sync()
                start = time.perf_counter()
                _run(mode, ctx)
                sync()
                took = time.perf_counter() - start
                best[mode, bs] = min(best.get((mode, bs), float("inf")), took)
                rounds.setdefault((mode, bs), []).append(took)
    load_after = os.getloadavg()

    print(
        f"{args.model} on {args.device} ({args.dtype}), {corpus.n_tokens} tokens in "
        f"{len(corpus.chunks)} sequences of <= {args.seq_len}; best of {args.repeats}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load {load_before[0]:.2f} before / {load_after[0]:.2f} after; "
        f"allocator {'steady' if args.steady_malloc else 'default'}"
    )
    head = "".join(
        f"{f'batch {bs}':>10}{'x peer':>8}{'x TL':>7}{'paired':>8}" for bs in args.batch_sizes
    )
    print(f"{'run':<15}{head}")
    ratios = {key: _ratios(rounds, *key) for key in rounds}
    paired = {key: statistics.median(r or [float("nan")]) for key, r in ratios.items()}
    for mode in args.modes:
        cells = ""
        for bs in args.batch_sizes:
            t = best[mode, bs]
            peer, tl = best.get(("hf_peer", bs)), best.get(("tl_bare", bs))
            cells += f"{t:>9.3f}s{t / peer if peer else float('nan'):>8.2f}"
            cells += f"{t / tl if tl else float('nan'):>7.2f}{paired[mode, bs]:>8.3f}"
        print(f"{mode:<15}{cells}")
    print(
        "x peer, x TL: best over best; paired: the median over rounds of the run's time over "
        "the TL bare forward's in the same round (a machine whose speed drifts moves both)"
    )
    intervals = {key: _interval(r) for key, r in ratios.items()}
    if ("tl_bare", args.batch_sizes[0]) in rounds and args.repeats > 1:
        print(f"paired, with its 95 % bootstrap interval over the {args.repeats} rounds:")
        for mode in (m for m in args.modes if m != "tl_bare"):
            cells = "".join(
                f"   batch {bs} {paired[mode, bs]:.3f} [{intervals[mode, bs][0]:.3f}, "
                f"{intervals[mode, bs][1]:.3f}]"
                for bs in args.batch_sizes
            )
            print(f"  {mode:<15}{cells}")
    if args.json:
        from tl_spikesink.views.format import json_text  # strict JSON: NaN (no tl_bare) is null

        json_text(
            {
                "settings": vars(args),
                "n_tokens": corpus.n_tokens,
                "load": [load_before[0], load_after[0]],
                "seconds": {f"{m}@{bs}": t for (m, bs), t in best.items()},
                "rounds": {f"{m}@{bs}": t for (m, bs), t in rounds.items()},
                "paired_x_tl": {f"{m}@{bs}": r for (m, bs), r in paired.items()},
                "paired_x_tl_95": {f"{m}@{bs}": i for (m, bs), i in intervals.items()},
            },
            args.json,
        )


if __name__ == "__main__":
    main()
