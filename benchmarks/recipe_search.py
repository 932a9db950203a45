"""The search for a natural-text baseline that grows both phenomena (the README's runs I onward).

Each candidate is the README's ablation baseline (`paper:baseline`: 6 layers, d_model 64, d_head
16, d_mlp 256, 16 × 64 tokens a step, 3,000 steps, lr 1e-2, weight decay 0.1, KJV with verse
numbers on 2,048 tokens) with a few settings changed. Runs are saved under ``--out`` as they
finish and read back on a rerun, like ``tl-spikesink ablate --out``; the table goes to
``--json`` (what the README quotes, checked by ``tests/unit/training/test_committed_results.py``).

    python benchmarks/recipe_search.py --workers 2 --json benchmarks/results/recipe_search.json
    python benchmarks/recipe_search.py --only lr4e-2_wd0.3 --seeds 5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BASE = {
    "n_layers": 6,
    "d_model": 64,
    "d_head": 16,
    "d_mlp": 256,
    "seq_len": 64,
    "batch_size": 16,
    "steps": 3000,
    "lr": 1e-2,
    "warmup": 100,
    "log_every": 500,
}

CANDIDATES: dict[str, dict] = {
    "mlp128": {"d_mlp": 128},
    "lr3e-2": {"lr": 0.03},
    "mlp64": {"d_mlp": 64},
    "seq128": {"seq_len": 128, "batch_size": 8},
    "wd0.3": {"weight_decay": 0.3},
    "lr2e-2_mlp128": {"lr": 0.02, "d_mlp": 128},
    "layers8": {"n_layers": 8, "steps": 2250},
    "kjv": {"source": "kjv"},
    "lr4e-2_wd0.3": {"lr": 0.04, "weight_decay": 0.3},
    "lr3e-2_wd0.3": {"lr": 0.03, "weight_decay": 0.3},
    "lr4e-2_wd1": {"lr": 0.04, "weight_decay": 1.0},
    "lr2e-2_wd0.3": {"lr": 0.02, "weight_decay": 0.3},
    "lr6e-2_wd0.3": {"lr": 0.06, "weight_decay": 0.3},
    "lr4e-2_wd0.3_b999": {"lr": 0.04, "weight_decay": 0.3, "betas": (0.9, 0.999)},
    "lr5e-2_wd0.5": {"lr": 0.05, "weight_decay": 0.5},
    "lr4e-2_wd0.3_L8": {"lr": 0.04, "weight_decay": 0.3, "n_layers": 8, "steps": 2250},
    "lr5e-2_wd0.3": {"lr": 0.05, "weight_decay": 0.3},
    "lr4e-2_wd0.3_s3500": {"lr": 0.04, "weight_decay": 0.3, "steps": 3500},
    "lr4e-2_wd0.3_nodecay": {"lr": 0.04, "weight_decay": 0.3, "min_lr_ratio": 1.0},
    "lr3e-2_wd0.3_nodecay": {"lr": 0.03, "weight_decay": 0.3, "min_lr_ratio": 1.0},
    "lr4e-2_wd0.2": {"lr": 0.04, "weight_decay": 0.2},
    "lr4e-2_wd0.3_warm500": {"lr": 0.04, "weight_decay": 0.3, "warmup": 500},
    # d_head 4 (16 heads): the ablation's d_head_32_width row, whose seed 0 passed both bars.
    "lr4e-2_wd0.3_dh4": {"lr": 0.04, "weight_decay": 0.3, "d_head": 4},
    "lr5e-2_wd0.3_dh4": {"lr": 0.05, "weight_decay": 0.3, "d_head": 4},
    "lr4e-2_wd0.3_seq128": {"lr": 0.04, "weight_decay": 0.3, "seq_len": 128, "batch_size": 8},
    "lr4e-2_wd0.3_mlp128": {"lr": 0.04, "weight_decay": 0.3, "d_mlp": 128},
    # d_head 8 (8 heads): between the baseline's steady 0.12 and d_head 4's bimodal 0.1 / 0.4;
    # seed 0 peaked at 0.11 (step 1000) and faded to 0.007, so seeds 1 and 2 were not run.
    "lr4e-2_wd0.3_dh8": {"lr": 0.04, "weight_decay": 0.3, "d_head": 8},
    # d_head 4's upper mode with more weight decay (Gu et al.: weight decay favours sinks): the
    # recipe that passes both bars, in 6 seeds of 6; then the same in 2,500 steps, to fit the
    # 5-minute budget.
    "lr4e-2_wd0.5_dh4": {"lr": 0.04, "weight_decay": 0.5, "d_head": 4},
    "lr4e-2_wd0.5_dh4_s2500": {"lr": 0.04, "weight_decay": 0.5, "d_head": 4, "steps": 2500},
    # Twice as wide with 16 heads of 8: a baseline the paper's d_head 1/8 rows can shrink.
    "lr4e-2_wd0.5_d128_dh8": {"lr": 0.04, "weight_decay": 0.5, "d_model": 128, "d_head": 8},
    # Its sinks hold but its first-token spike stays at 14-24x: more weight decay, as at d64.
    "lr4e-2_wd0.8_d128_dh8": {"lr": 0.04, "weight_decay": 0.8, "d_model": 128, "d_head": 8},
}
"""Name -> changes to BASE (``source`` changes the text instead)."""

SEEDS = {
    "lr4e-2_wd0.3": 3,
    "lr4e-2_wd0.3_dh4": 5,
    "lr4e-2_wd0.3_seq128": 3,
    "lr4e-2_wd0.3_mlp128": 3,
    "lr4e-2_wd0.5_dh4": 6,
    "lr4e-2_wd0.5_dh4_s2500": 3,
    "lr4e-2_wd0.5_d128_dh8": 2,
    "lr4e-2_wd0.8_d128_dh8": 2,
}
"""Candidates run over more seeds than one (the most promising)."""


def run_one(name: str, seed: int, out: str) -> dict:
    """Train (or read back) one candidate and return its row."""
    import torch

    torch.set_num_threads(1)
    from tl_spikesink.training import TrainConfig, ablation_study
    from tl_spikesink.training.tasks import NaturalText

    changes = dict(CANDIDATES[name])
    task = NaturalText(source=changes.pop("source", "kjv_numbered"), vocab_size=2048)
    config = TrainConfig(**{**BASE, **changes, "seed": seed})
    # One baseline run through the ablation machinery: saved as it finishes, read back after.
    table = ablation_study(
        "paper:baseline", seeds=[seed], config=config, task=task, out=Path(out) / name,
        progress=False,
    )  # fmt: skip
    run = table.rows[0].runs[0]
    last = run.history[-1]
    return {
        "name": name,
        "seed": seed,
        "changes": CANDIDATES[name],
        "perplexity": round(run.perplexity, 2),
        "sink_ratio": round(last.sink_ratio, 4),
        "first_token_spike_ratio": round(last.bos_spike_ratio, 2),
        "max_first_token_score": round(last.max_sink_score, 3),
        "spike": round(last.max_abs, 1),
        "seconds": round(last.seconds, 1),
        "curve": [
            [s.step, round(s.sink_ratio, 3), round(s.bos_spike_ratio, 1)] for s in run.history
        ],
    }


def markdown_row(r: dict) -> str:
    """The README's row for `r` (``tests/unit/training/test_committed_results.py`` reads it)."""
    changes = ", ".join(f"{k} {v}" for k, v in r["changes"].items())
    return (
        f"| `{r['name']}` | {changes} | {r['seed']} | {r['perplexity']:.1f} | "
        f"{r['sink_ratio']:.3f} | {r['first_token_spike_ratio']:.0f} | "
        f"{r['max_first_token_score']:.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(CANDIDATES), help="these candidates")
    parser.add_argument(
        "--seeds", type=int, help="seeds 0..N-1 of each (default: 1, or as SEEDS says)"
    )
    parser.add_argument("--workers", type=int, default=1, help="runs at once, one thread each")
    parser.add_argument("--out", default="benchmarks/runs/recipe", help="checkpoint folder")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--markdown", action="store_true", help="print the README's table")
    args = parser.parse_args()

    jobs = [(n, s) for n in args.only or CANDIDATES for s in range(args.seeds or SEEDS.get(n, 1))]
    if args.workers == 1:
        rows = [run_one(n, s, args.out) for n, s in jobs]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.workers, mp_context=context) as pool:
            rows = list(pool.map(run_one, *zip(*jobs, strict=True), [args.out] * len(jobs)))
    if args.markdown:
        print(
            "| candidate | changes from the baseline | seed | ppl | sink ratio | BOS spike/med "
            "| max first-token α |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(markdown_row(r))
        return
    print(f"{'candidate':<24}{'seed':>5}{'ppl':>7}{'sink':>7}{'BOS/med':>8}{'max α0':>8}{'s':>6}")
    for r in rows:
        print(
            f"{r['name']:<24}{r['seed']:>5}{r['perplexity']:>7.1f}{r['sink_ratio']:>7.3f}"
            f"{r['first_token_spike_ratio']:>8.1f}{r['max_first_token_score']:>8.2f}"
            f"{r['seconds']:>6.0f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"base": BASE, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
