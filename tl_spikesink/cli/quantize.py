"""The ``tl-spikesink quantize`` subcommand: RTN quantization error and Δloss by token class."""

from __future__ import annotations

import argparse

from tl_spikesink.cli import options


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `quantize` to the subcommands."""
    from tl_spikesink.config import ANALYSIS_MAX_TOKENS as MAX_TOKENS
    from tl_spikesink.config import QUANT_KEEPS as KEEPS
    from tl_spikesink.config import QUANT_SITES

    help_text = "fake-quantize activations and weights; Δloss at spike, sink and other tokens"
    p = sub.add_parser("quantize", help=help_text, description=help_text)
    options.add_model(p)
    options.add_corpus(p, max_tokens=MAX_TOKENS)
    p.add_argument("--bits", type=int, nargs="*", default=[8, 4], metavar="B",
                   help="activation widths (default 8 4; none: no activation rows)")  # fmt: skip
    p.add_argument("--granularity", nargs="+", default=["token", "tensor"],
                   choices=("token", "tensor"), help="one scale per token or per sequence")  # fmt: skip
    p.add_argument("--keep", nargs="+", default=list(KEEPS), metavar="K",
                   help=f"tokens kept exact: none, spike, sink, first:k (default {' '.join(KEEPS)})")  # fmt: skip
    p.add_argument("--sites", nargs="+", default=list(QUANT_SITES), choices=QUANT_SITES,
                   help="activations quantized together in every block (default all four)")  # fmt: skip
    p.add_argument("--weight-bits", type=int, nargs="*", default=[4], metavar="B",
                   help="weight widths (default 4; none: no weight rows)")  # fmt: skip
    p.add_argument("--weight-scope", nargs="+", default=["mlp_out", "all"],
                   choices=("mlp_out", "all"), help="W_out only, or every linear weight")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8, metavar="B")
    options.add_outputs(p, json="write the table as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Quantize each setting in turn and print the table."""
    from tl_spikesink.evaluation.quantization import quantization

    options.analyse(
        args,
        quantization,
        "bits", "sites", "weight_bits", "batch_size",
        granularities=args.granularity, keeps=args.keep, weight_scopes=args.weight_scope,
    )  # fmt: skip


__all__ = ["add_parser", "run"]
