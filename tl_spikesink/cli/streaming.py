"""The ``tl-spikesink streaming`` subcommand: StreamingLLM's window + sink perplexities."""

from __future__ import annotations

import argparse

from tl_spikesink.cli import options


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `streaming` to the subcommands."""
    from tl_spikesink.config import STREAMING_SEQ_LEN as SEQ_LEN
    from tl_spikesink.config import STREAMING_SINKS as SINKS
    from tl_spikesink.config import STREAMING_WINDOWS as WINDOWS

    help_text = "perplexity with window attention, with and without the first k tokens as sinks"
    p = sub.add_parser("streaming", help=help_text, description=help_text)
    options.add_model(p)
    options.add_corpus(p, max_tokens=16_384)
    p.add_argument("--window", type=int, nargs="+", default=list(WINDOWS), metavar="W",
                   help=f"recent-window sizes (default {' '.join(map(str, WINDOWS))})")
    p.add_argument("--sinks", type=int, nargs="+", default=list(SINKS), metavar="K",
                   help=f"first keys kept visible (default {' '.join(map(str, SINKS))})")
    p.add_argument("--heads", choices=("all", "sink"), default="all",
                   help="restrict every head, or only the scan's sink heads")
    p.add_argument("--seq-len", type=int, default=SEQ_LEN, metavar="N",
                   help=f"tokens per sequence (default {SEQ_LEN}, at most the model's n_ctx)")
    options.add_outputs(p, json="write the rows as JSON")  # fmt: skip
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Evaluate each window + sinks restriction against full attention and print the table."""
    from tl_spikesink.evaluation.streaming import streaming

    options.analyse(args, streaming, "sinks", "heads", "seq_len", windows=args.window)


__all__ = ["add_parser", "run"]
