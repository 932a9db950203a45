"""The `tl-spikesink ablate` subcommand (registered by :mod:`tl_spikesink.cli.commands`).

Light on import: argparse only; training code loads when the command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import Any

_DEFAULT_VARIANTS = ("baseline", "sandwich", "gate_input")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `ablate` to the subcommands."""
    p = sub.add_parser(
        "ablate",
        help="train small variants (norms, gates, head dim, regime) and tabulate spikes and sinks",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(_DEFAULT_VARIANTS),
        metavar="V",
        help="variant names (see tl_spikesink.training.VARIANTS); 'all' for every one; 'paper' "
        "for every row of the paper's Tables 3-8, 'paper:NAME' for one",
    )
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds per variant")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="training steps per run")
    p.add_argument("--layers", type=int, default=None, metavar="N", help="blocks per model")
    p.add_argument("--d-model", type=int, default=None, metavar="D", help="residual width")
    p.add_argument("--d-mlp", type=int, default=None, metavar="D", help="MLP hidden width")
    p.add_argument("--d-head", type=int, default=None, metavar="D", help="head dimension")
    p.add_argument("--seq-len", type=int, default=None, metavar="L", help="training length")
    p.add_argument("--batch-size", type=int, default=None, metavar="B", help="sequences a step")
    p.add_argument("--warmup", type=int, default=None, metavar="N", help="warmup steps")
    p.add_argument("--weight-decay", type=float, default=None, metavar="W", help="AdamW decay")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--log-every", type=int, default=None, metavar="N", help="probe every N steps")
    p.add_argument(
        "--task",
        choices=("bigram_backcopy", "natural_text"),
        default="bigram_backcopy",
        help="synthetic bigram-backcopy data (fast) or natural text with SmolLM2's tokenizer",
    )
    p.add_argument("--source", choices=("pydoc", "kjv", "kjv_numbered"), default="pydoc",
                   help="natural text: Python's docs, the KJV Bible (with verse numbers)")  # fmt: skip
    p.add_argument("--vocab", type=int, default=None, metavar="V",
                   help="natural text: keep the V most frequent tokens (default all)")  # fmt: skip
    p.add_argument("--device", default=None, help="train on this device (cpu, cuda)")
    p.add_argument("--precision", choices=("float32", "bfloat16"), default=None,
                   help="bfloat16: autocast of the training forward (GPU)")  # fmt: skip
    p.add_argument("--trigger-rate", type=float, default=0.15, metavar="R",
                   help="bigram-backcopy: share of tokens followed by a trigger (default 0.15)")  # fmt: skip
    p.add_argument("--out", metavar="DIR", help="save every checkpoint under DIR/variant/seedS")
    p.add_argument("--json", metavar="OUT", help="write the table (and every run) as JSON")
    p.add_argument(
        "--summary-json",
        metavar="OUT",
        help="write the table beside the paper's Tables 3-8 (directions, agrees) as JSON",
    )
    p.add_argument(
        "--markdown",
        metavar="OUT",
        help="write the table beside the paper's as Markdown (the README's table)",
    )
    p.add_argument(
        "--plot",
        metavar="OUT",
        help="write the table beside the paper's as an offline interactive figure (HTML): "
        "each row's change from the baseline, ours against the paper's",
    )
    p.add_argument(
        "--load",
        metavar="JSON",
        help="train nothing: read a table --json wrote, print it (and --html it)",
    )
    p.add_argument(
        "--html",
        metavar="OUT",
        help="write an offline HTML report: the scan of the first variant's first seed, the "
        "table as bars and every emergence curve",
    )
    p.add_argument("--finished-only", action="store_true",
                   help="train nothing: tabulate the finished runs under --out (a table built "
                   "over several sittings, read part-way)")  # fmt: skip
    p.add_argument(
        "--reuse",
        metavar="JSON",
        help="take the runs of a table --json wrote (same variant, settings, task and seed) "
        "instead of training them: finish a table from its committed JSON",
    )
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="train N runs at once, one process and one thread each (default 1)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Run the ablation the arguments describe and print the table."""
    import time
    from dataclasses import replace

    from tl_spikesink.training.ablation import ablation_study, load_table
    from tl_spikesink.training.runs import TrainConfig
    from tl_spikesink.training.tasks import BigramBackcopy, NaturalText

    if args.load:
        _emit(load_table(args.load), args)
        return
    start = time.perf_counter()
    names = "all" if args.variants == ["all"] else args.variants
    overrides = {
        "steps": args.steps,
        "n_layers": args.layers,
        "d_model": args.d_model,
        "d_mlp": args.d_mlp,
        "d_head": args.d_head,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "warmup": args.warmup,
        "device": args.device,
        "precision": args.precision,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "log_every": args.log_every,
    }
    config = replace(TrainConfig(), **{k: v for k, v in overrides.items() if v is not None})
    if args.task == "natural_text":
        task = NaturalText(source=args.source, vocab_size=args.vocab)
    else:
        task = BigramBackcopy(trigger_rate=args.trigger_rate)
    with contextlib.ExitStack() as stack:
        out = args.out
        if args.html and out is None:  # the report scans a trained model: keep it until then
            out = stack.enter_context(tempfile.TemporaryDirectory(prefix="tl-spikesink-ablate-"))
        table = ablation_study(
            names,
            seeds=args.seeds,
            config=config,
            task=task,
            out=out,
            progress=not args.no_progress,
            workers=args.workers,
            finished_only=args.finished_only,
            reuse=args.reuse,
        )
        _emit(table, args)
    minutes = (time.perf_counter() - start) / 60
    print(f"\n{len(table.runs)} runs in {minutes:.1f} min (finished runs read back, not trained)")


def _emit(table: Any, args: argparse.Namespace) -> None:
    import sys

    print(table)
    if args.json:
        table.to_json(args.json)
        print(f"\nwrote {args.json}", file=sys.stderr)
    if args.summary_json or args.markdown or args.plot:
        from tl_spikesink.training.tables import compare
        from tl_spikesink.views.paper_table import to_markdown

        comparison = compare(table)
        print()
        print(comparison)
        if args.summary_json:
            comparison.to_json(args.summary_json)
            print(f"wrote {args.summary_json}", file=sys.stderr)
        if args.markdown:
            Path(args.markdown).write_text(to_markdown(comparison))
            print(f"wrote {args.markdown}", file=sys.stderr)
        if args.plot:
            from tl_spikesink.cli.options import write_figure
            from tl_spikesink.views.training import plot_comparison

            write_figure(plot_comparison(comparison), args.plot)
    if args.html:
        _write_report(table, args.html)
        print(f"wrote {args.html}", file=sys.stderr)


def _write_report(table: Any, path: str) -> None:
    from tl_spikesink.errors import SpikeSinkError
    from tl_spikesink.probes.scan import scan
    from tl_spikesink.training.runs import load_checkpoint, probe_batch
    from tl_spikesink.training.tasks import task_from_dict
    from tl_spikesink.views.html import write_html

    run = table.rows[0].runs[0]
    c = run.config
    if run.checkpoint is None or not Path(run.checkpoint).exists():
        raise SpikeSinkError(
            f"the report scans the first run's checkpoint, which was not kept ({run.checkpoint}); "
            "train with --out DIR so that checkpoints are kept"
        )
    model = load_checkpoint(run.checkpoint)
    probe = probe_batch(task_from_dict(table.task), c)
    result = scan(model, probe, progress=False)
    title = f"tl_spikesink ablation ({run.variant.name}, seed {c.seed}, scanned on the probe batch)"
    write_html(result, path, extra_tables=[table], title=title)


__all__ = ["add_parser", "run"]
