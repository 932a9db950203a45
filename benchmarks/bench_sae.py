"""Train two small SAEs on SmolLM2's plateau, with and without spike tokens, and compare them.

    python benchmarks/bench_sae.py                      # the run reported in the closing note
    python benchmarks/bench_sae.py --steps 200 --train-tokens 4096 --eval-tokens 512   # quick

Both SAEs are sae-lens StandardSAEs trained at ``blocks.15.hook_resid_post`` (the spike lives on
the first token in channels 507/247 from block 11 to 28) on the same activations from the default
corpus (:func:`tl_spikesink.default_texts`, its first paragraphs), one with the spike tokens
dropped. They are compared with :func:`tl_spikesink.saes.sae_report` on held-out paragraphs of the
same corpus (disjoint from the training ones). Timings are printed per phase.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import tl_spikesink as ts
from tl_spikesink.saes import collect_activations, compare_reports, sae_report, train_sae

TRAIN_PARAGRAPHS = slice(0, 400)
EVAL_PARAGRAPHS = slice(600, None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--train-tokens", type=int, default=16384)
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--l1", type=float, default=5.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write both reports here")
    p.add_argument("--save", default=None, help="save both SAEs under this folder")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    t = time.perf_counter()
    model = ts.load("smollm2-135m", progress=False)
    print(f"load: {time.perf_counter() - t:.1f} s")
    hook = ts.hook_name("resid_post", args.layer)
    texts = ts.default_texts()

    t = time.perf_counter()
    acts = collect_activations(
        model,
        hook,
        texts[TRAIN_PARAGRAPHS],
        max_tokens=args.train_tokens,
        max_seq_len=args.max_seq_len,
    )
    print(
        f"activations: {len(acts):,} tokens, {int(acts.spike.sum())} flagged as spikes, "
        f"{time.perf_counter() - t:.1f} s"
    )
    saes = {}
    for label, exclude in (("with spikes", None), ("without spikes", "spikes")):
        t = time.perf_counter()
        saes[label] = train_sae(
            model,
            hook,
            activations=acts,
            exclude=exclude,
            expansion=args.expansion,
            steps=args.steps,
            batch_size=args.batch_size,
            l1_coefficient=args.l1,
            lr=args.lr,
            seed=args.seed,
        )
        meta = saes[label].cfg.metadata.tl_spikesink_training
        print(
            f"train {label}: {time.perf_counter() - t:.1f} s, mean L0 while training "
            f"{meta['l0_mean_over_training']:.1f}, dead over the last quarter "
            f"{meta['dead_latents_last_quarter']}"
        )
        if args.save:
            saes[label].save_model(f"{args.save}/{label.replace(' ', '_')}")

    corpus = ts.tokenize(
        model,
        texts[EVAL_PARAGRAPHS],
        name="pydoc topics, held-out paragraphs",
        max_seq_len=args.max_seq_len,
        max_tokens=args.eval_tokens,
    )
    t = time.perf_counter()
    scan = ts.scan(model, corpus, progress=False)
    print(f"scan of the held-out texts: {time.perf_counter() - t:.1f} s")
    reports = {}
    for label, sae in saes.items():
        t = time.perf_counter()
        reports[label] = sae_report(model, sae, corpus, scan=scan)
        print(f"report {label}: {time.perf_counter() - t:.1f} s")
        print(reports[label])
        print()
    print(compare_reports(reports))
    print(f"settings: {vars(args)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: r.to_dict() for k, r in reports.items()}, f, indent=1)


if __name__ == "__main__":
    main()
