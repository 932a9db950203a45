"""Scan cost against a bare forward pass, on the same batches, in one run.

Prints time per pass and its ratio to `model(tokens)` for: the bare forward, the forward without
logits (what the scan runs), the scan, and `run_with_cache`; and the peak memory each needs above
the loaded model, measured in a fresh process per mode (CPU: peak RSS, exact on Linux; CUDA: peak
allocated), on the corpus and on its whole texts `--grow` times over (the same batch shapes), so
"memory flat as the corpus grows" can be read off. Run it with ``MALLOC_MMAP_THRESHOLD_=65536``
for RSS to follow live memory: glibc otherwise keeps freed blocks, and RSS then depends on the
allocation history more than on what is alive.

    python benchmarks/bench_scan.py                  # SmolLM2, CPU, 4,096 tokens
    python benchmarks/bench_scan.py --device cuda --tokens 65536 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

import torch

MODES = ("forward", "forward_no_logits", "scan", "run_with_cache")


def _setup(args):
    import tl_spikesink as ts

    torch.manual_seed(0)
    model = ts.load(args.model, device=args.device, progress=False)
    corpus = ts.tokenize(
        model,
        ts.default_texts(),
        max_seq_len=args.seq_len,
        max_tokens=args.tokens,
        name="pydoc topics",
    )
    if hasattr(args, "copies"):
        # Memory runs read the whole texts of that corpus `copies` times: the grown corpus's
        # batches have the small one's shapes, so only what a run keeps can make its peak grow.
        whole = max(c.text_index for c in corpus.chunks) or 1  # the last text may be cut short
        texts = ts.default_texts()[:whole] * args.copies
        corpus = ts.tokenize(model, texts, max_seq_len=args.seq_len, name="copies")
    batches = list(corpus.batches(args.batch_size))
    return ts, model, corpus, batches


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _run(mode, ts, model, corpus, batches, args):
    dev = args.device
    if mode == "scan":
        ts.scan(model, corpus, batch_size=args.batch_size, progress=False)
        return
    with torch.inference_mode():
        for b in batches:
            # As the scan's engine calls it: an unpadded batch without its all-ones mask.
            tokens, mask = b.tokens.to(dev), None if b.mask.all() else b.mask.long().to(dev)
            if mode == "forward":
                model(tokens, attention_mask=mask)
            elif mode == "forward_no_logits":
                model(tokens, attention_mask=mask, return_type=None)
            else:
                _, cache = model.run_with_cache(tokens, attention_mask=mask)
                del cache


def _memory_child(mode, args, queue):
    from tl_spikesink.probes import kernels

    ts, model, corpus, batches = _setup(args)
    kernels.warm_up()  # the numba runtime is the process's, like the model: not the scan's
    if str(args.device).startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _run(mode, ts, model, corpus, batches, args)
        queue.put((torch.cuda.max_memory_allocated() - base) / 2**20)
    else:
        # ru_maxrss is useless here: loading the model peaks above any run. Linux resets the
        # peak RSS (VmHWM) to the current RSS on "5" > /proc/self/clear_refs, which measures
        # the run's own peak exactly; elsewhere, sample the current RSS.
        base = _rss_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            queue.put(_sampled_peak_mib(lambda: _run(mode, ts, model, corpus, batches, args)))
            return
        _run(mode, ts, model, corpus, batches, args)
        queue.put((_rss_kib("VmHWM") - base) / 1024)


def _rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _sampled_peak_mib(run):
    import threading

    import psutil

    proc, peak, done = psutil.Process(), [0], threading.Event()
    base = proc.memory_info().rss

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], proc.memory_info().rss)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    run()
    done.set()
    thread.join()
    return (max(peak[0], base) - base) / 2**20


def peak_memory_mib(mode, args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(mode, args, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def _timings(args):
    ts, model, corpus, batches = _setup(args)
    _run("forward", ts, model, corpus, batches, args)  # warm-up
    times = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:  # interleaved, so drift hits every mode alike
            _sync(args.device)
            t0 = time.perf_counter()
            _run(mode, ts, model, corpus, batches, args)
            _sync(args.device)
            times[mode].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    print(
        f"model {args.model} on {args.device}: {corpus.n_tokens} tokens, {len(batches)} batches of "
        f"{args.batch_size} x <= {args.seq_len}; median of {args.repeats}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'mode':<20}{'seconds':>10}{'tok/s':>10}{'x forward':>11}")
    for m in MODES:
        rate, ratio = corpus.n_tokens / med[m], med[m] / med["forward"]
        print(f"{m:<20}{med[m]:>10.3f}{rate:>10.0f}{ratio:>11.3f}")
    return {"n_tokens": corpus.n_tokens, "seconds": med}


def _memory(args):
    kind = "CUDA allocated" if "cuda" in args.device else "CPU RSS"
    print(f"\npeak memory above the loaded model (MiB), {kind}:")
    print(f"{'mode':<20}{'texts x1':>12}{f'texts x{args.grow}':>12}")
    mem = {}
    for m in ("forward", "forward_no_logits", "scan", "run_with_cache"):
        small = peak_memory_mib(m, argparse.Namespace(**{**vars(args), "copies": 1}))
        big = peak_memory_mib(m, argparse.Namespace(**{**vars(args), "copies": args.grow}))
        mem[m] = (small, big)
        print(f"{m:<20}{small:>12.1f}{big:>12.1f}")
    return mem


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the per-mode memory processes"
    )
    parser.add_argument("--memory-only", action="store_true", help="skip the timings")
    parser.add_argument(
        "--grow",
        type=int,
        default=2,
        help="the second memory run reads the first run's whole texts this many times",
    )
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()

    out = {"settings": vars(args)}
    if not args.memory_only:
        out.update(_timings(args))
    if not args.no_memory:
        out["peak_memory_mib"] = _memory(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
