"""Training speed of each variant against the pre-norm baseline (steps/s and ratios).

    python benchmarks/bench_training.py [--steps 200] [--threads 1] [--variants ...]

Each variant trains `--steps` steps at the default size (TrainConfig: 2 layers, d_model 64,
batch 32 x 64 tokens) on the bigram-backcopy task; steps/s is timed between the first and the
last probe snapshot (so one probe evaluation is included). A ratio below 1 means slower than the
baseline. Timings on a shared machine vary; compare ratios from one invocation.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from tl_spikesink.training.runs import TrainConfig, train
from tl_spikesink.training.variants import VARIANTS


def main() -> None:
    """Time every requested variant and print steps/s and the ratio to the baseline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = replace(TrainConfig(), steps=args.steps, log_every=args.steps)
    names = ["baseline", *(v for v in args.variants if v != "baseline")]
    train(VARIANTS["baseline"], replace(config, steps=5), progress=False)  # warm-up
    rates = {}
    for name in names:
        _, run = train(VARIANTS[name], config, progress=False)
        rates[name] = args.steps / (run.final.seconds - run.history[0].seconds)
    print(f"{'variant':<16} {'steps/s':>8} {'vs baseline':>11}")
    for name, rate in rates.items():
        print(f"{name:<16} {rate:>8.2f} {rate / rates['baseline']:>11.2f}")
    print(f"({args.steps} steps, {args.threads} thread(s), torch {torch.__version__})")


if __name__ == "__main__":
    main()
