"""Where the scan's own time goes: milliseconds inside each probe's hooks and reductions.

The wall-clock ratios of ``bench_peers.py`` move by several points between runs on a shared
machine, more than most changes to the probes. This benchmark times only the scan's own code
(each probe's hooks, ``start_batch``, ``end_batch`` and the final ``result``), which a noisy
neighbour moves far less, and prints it beside the wall time of a bare forward and of the
scan. The timers cost about a microsecond per call, and what the probes cost the forward
around them (the cache they take from the weights) is not in these numbers: the wall-time
difference is the whole cost, this is the part that is ours to cut.

    python benchmarks/bench_probe_cost.py                 # SmolLM2, CPU, batch 1 and 8
    python benchmarks/bench_probe_cost.py --repeats 9 --kernels-off
    python benchmarks/bench_probe_cost.py --alone         # wall time of each probe on its own

``--alone`` answers the other question, what each probe adds to the wall time of a forward: it
runs the bare forward, the whole scan and each of the scan's probes on its own (the spike probe
also at ``hook_resid_post`` only), interleaved, and prints each best time over the bare one.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import Counter

import torch

BATCH_CALLS = ("start_batch", "end_batch")


def _mask(batch):
    """The mask as the scan's engine passes it: none for a batch without pads."""
    return None if batch.mask.all() else batch.mask.long()


def _timed(cost: Counter, key: str, fn):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            cost[key] += time.perf_counter() - start

    return timed


def _instrument(probes, cost: Counter) -> None:
    """Time every hook and batch call of `probes`, per probe class (instance attributes)."""
    for probe in probes:
        name = type(probe).__name__
        hooks = probe.hooks()
        probe.hooks = lambda hooks=hooks, name=name: [
            (n, _timed(cost, f"{name} hooks", f)) for n, f in hooks
        ]
        for part in BATCH_CALLS:
            setattr(probe, part, _timed(cost, f"{name} {part}", getattr(probe, part)))


def _scan(ts, model, corpus, batch_size: int, cost: Counter):
    from tl_spikesink.probes.engine import run
    from tl_spikesink.probes.scan import ScanProbes

    # What ts.scan does (scan_corpus), with the probes timed.
    config = ts.ScanConfig(batch_size=batch_size)
    scanned = ScanProbes(model, config)
    _instrument(scanned.probes, cost)
    run(model, corpus, scanned.probes, batch_size=batch_size, progress=False)
    return _timed(cost, "result", scanned.result)(model, corpus)


def _alone(ts, model, corpus, batch_sizes: list[int], repeats: int) -> None:
    """Wall time of the scan and of each of its probes alone, over a bare forward's."""
    from tl_spikesink.probes.engine import run
    from tl_spikesink.probes.scan import ScanProbes

    def forward(bs: int) -> None:
        with torch.inference_mode():
            for b in corpus.batches(bs):
                model(b.tokens, attention_mask=_mask(b), return_type=None)

    def probes(names: tuple[str, ...], **settings):
        def go(bs: int) -> None:
            scanned = ScanProbes(model, ts.ScanConfig(batch_size=bs, **settings))
            # The scan's spike probe reads the kurtosis in its own hooks; apart, each alone.
            if "kurtosis" not in names:
                scanned.spikes.kurtosis = None
            if "spikes" not in names:
                scanned.kurtosis.hosted = False
            run(model, corpus, [getattr(scanned, n) for n in names], batch_size=bs,
                progress=False)  # fmt: skip

        return go

    modes = {
        "TL bare": forward,
        "scan (all probes)": probes(("spikes", "sinks", "kurtosis")),
        "spike probe": probes(("spikes",)),
        "spike probe, resid_post only": probes(("spikes",), spike_sites=("resid_post",)),
        "sink probe": probes(("sinks",)),
        "kurtosis probe": probes(("kurtosis",)),
    }
    for bs in batch_sizes:
        for fn in modes.values():
            fn(bs)  # compile, warm the allocator
        best = dict.fromkeys(modes, float("inf"))
        for _ in range(repeats):
            for name, fn in modes.items():
                start = time.perf_counter()
                fn(bs)
                best[name] = min(best[name], time.perf_counter() - start)
        print(f"\nbatch {bs}")
        for name, seconds in best.items():
            print(f"  {name:<32}{seconds:>8.3f} s  {seconds / best['TL bare']:.3f}x bare")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--kernels-off", action="store_true", help="the torch reductions, as on a GPU"
    )
    parser.add_argument(
        "--alone", action="store_true", help="wall time of each probe alone, over a bare forward"
    )
    args = parser.parse_args()

    import tl_spikesink as ts
    from tl_spikesink.probes import kernels

    torch.manual_seed(0)
    model = ts.load(args.model, progress=False)
    corpus = ts.tokenize(
        model, ts.default_texts(), max_seq_len=args.seq_len, max_tokens=args.tokens, name="cost"
    )
    off = kernels.switched_off() if args.kernels_off else contextlib.nullcontext()
    print(
        f"{args.model}, {corpus.n_tokens} tokens in {len(corpus.chunks)} sequences, "
        f"{torch.get_num_threads()} threads, kernels {'off' if args.kernels_off else 'on'}; "
        f"best of {args.repeats} (each part on its own)"
    )
    if args.alone:
        with off:
            _alone(ts, model, corpus, args.batch_sizes, args.repeats)
        return
    with off:
        for bs in args.batch_sizes:
            batches = [(b.tokens, _mask(b)) for b in corpus.batches(bs)]
            best: dict[str, float] = {}
            _scan(ts, model, corpus, bs, Counter())  # compile, warm the allocator
            for _ in range(args.repeats):
                start = time.perf_counter()
                with torch.inference_mode():
                    for tokens, mask in batches:
                        model(tokens, attention_mask=mask, return_type=None)
                bare = time.perf_counter() - start
                cost: Counter = Counter()
                start = time.perf_counter()
                _scan(ts, model, corpus, bs, cost)
                cost["wall: scan"] = time.perf_counter() - start
                cost["wall: TL bare"] = bare
                for key, seconds in cost.items():
                    best[key] = min(best.get(key, float("inf")), seconds)
            ours = sum(v for k, v in best.items() if not k.startswith("wall"))
            print(f"\nbatch {bs}")
            for key in sorted(best):
                print(f"  {key:<28}{best[key] * 1e3:>9.1f} ms")
            bare = best["wall: TL bare"]
            print(
                f"  {'ours, all parts':<28}{ours * 1e3:>9.1f} ms = {ours / bare:.1%} of the "
                f"bare forward; wall ratio {best['wall: scan'] / bare:.3f}"
            )


if __name__ == "__main__":
    main()
