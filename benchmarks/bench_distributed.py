"""Sharded scan throughput (tokens/s) against the number of processes, in one run.

For each process count N, N processes (gloo on CPU; nccl, one GPU each, with --device cuda) each
load the model, then a barrier, then :func:`tl_spikesink.scan_distributed` over the same corpus;
the time is rank 0's wall clock from the barrier to the merged result (the exchange included;
loading the model is not), best of a few repeats, with the counts alternated over rounds. On
CPU the cores are split evenly (torch threads per process = cores // N), so every count uses
the same cores and only the parallel split differs. Ratios are against the first count (one
process by default) measured in the same run.

On a 2-core machine expect no gain: one process already keeps both cores busy with its own
intra-op threads, so two processes of one thread each only add the merge and a second copy of
the model. On CPU a row of one process with one thread is added: on a machine busy with other
work, a process of several threads can be many times slower than one of a single thread (its
threads wait for each other at every operation while the scheduler runs someone else), so
compare N processes with that row there.

    python benchmarks/bench_distributed.py                       # SmolLM2, CPU, 1 and 2 processes
    python benchmarks/bench_distributed.py --device cuda --procs 1 2 4 --tokens 262144
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import time
from datetime import timedelta


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, threads: int, args, queue) -> None:
    import torch
    import torch.distributed as dist

    import tl_spikesink as ts

    torch.set_num_threads(threads)
    device = args.device
    backend = "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
        device, backend = f"cuda:{rank}", "nccl"
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(minutes=30),
    )
    model = ts.load(args.model, device=device, progress=False)
    corpus = ts.tokenize(model, ts.default_texts(), max_tokens=args.tokens, name="pydoc topics")
    # Warm-up: the first forward pays one-off allocation and kernel selection.
    ts.scan(model, ts.tokenize(model, ts.default_texts(2)), batch_size=2, progress=False)
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        start = time.perf_counter()
        result = ts.distributed.scan_distributed(model, corpus, batch_size=args.batch_size, progress=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if rank == 0:
        queue.put((min(times), result.n_tokens, result.spikes.channels))
    dist.destroy_process_group()


def measure(world: int, threads: int, args) -> tuple[float, int, tuple[int, ...]]:
    """(best seconds of the repeats, tokens, spike channels) of a scan over `world` processes."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, threads, args, queue))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    out = queue.get()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3, help="timed scans per group (best kept)")
    parser.add_argument("--rounds", type=int, default=2, help="times the counts are alternated")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU cores to split")
    args = parser.parse_args()

    print(f"{args.model} on {args.device}, {args.tokens:,} tokens, batch {args.batch_size}; "
          f"best of {args.repeats} scans x {args.rounds} alternating rounds; "
          f"load average before: {os.getloadavg()[0]:.1f}")  # fmt: skip
    # (processes, torch threads per process): the cores split evenly; on CPU also one process
    # of one thread, the per-process speed that N single-thread processes should multiply.
    runs = [(world, max(1, args.cores // world)) for world in args.procs]
    if args.device == "cpu" and args.cores > 1:
        runs.insert(1, (1, 1))
    best: dict[tuple[int, int], float] = {}
    channels, tokens = None, 0
    for _ in range(args.rounds):
        # Alternating the runs spreads any change in background load over all of them.
        for run in runs:
            seconds, tokens, got = measure(*run, args)
            best[run] = min(seconds, best.get(run, seconds))
            channels = channels or got
            assert got == channels, f"{run} found spike channels {got}, not {channels}"
    print(f"{'procs':>5}  {'threads/proc':>12}  {'seconds':>8}  {'tokens/s':>9}  {'vs first':>9}")
    base = tokens / best[runs[0]]
    for (world, threads), seconds in best.items():
        row = f"{world:>5}  {threads:>12}  {seconds:>8.1f}  {tokens / seconds:>9.1f}"
        print(f"{row}  {tokens / seconds / base:>8.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
