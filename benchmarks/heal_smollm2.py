"""Heal SmolLM2 after each surgery and write the records (benchmarks/results/healing.json).

    python benchmarks/heal_smollm2.py [--surgeries dyt qk_norm gate loss_from] [--steps 200]
                                      [--workers 2] [--out benchmarks/results/healing.json]

Each surgery runs in its own process with one thread (two at a time by default); a surgery whose
record is already in --out with the same settings is not run again.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path


def one(surgery: str, steps: int) -> dict:
    import torch

    torch.set_num_threads(1)
    import tl_spikesink as ts
    from tl_spikesink.training.healing import HealConfig, heal

    model = ts.load("smollm2-135m", progress=False)
    _, record = heal(model, HealConfig(surgery=surgery, steps=steps), progress=False)
    print(record, flush=True)
    return record.to_dict()


def main() -> None:
    from tl_spikesink.training.healing import SURGERIES, HealConfig

    p = argparse.ArgumentParser()
    p.add_argument("--surgeries", nargs="+", default=list(SURGERIES), choices=SURGERIES)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/healing.json")
    args = p.parse_args()
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else {}
    todo = [
        s for s in args.surgeries
        if done.get(s, {}).get("config") != asdict(HealConfig(surgery=s, steps=args.steps))
    ]  # fmt: skip
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(1, min(args.workers, len(todo))), mp_context=context) as pool:
        for surgery, record in zip(todo, pool.map(one, todo, [args.steps] * len(todo)), strict=True):
            done[surgery] = record
            out.write_text(json.dumps(done, indent=1) + "\n")
    print(f"{len(todo)} surgeries in {(time.perf_counter() - start) / 60:.1f} min; wrote {out}")


if __name__ == "__main__":
    main()
