"""The ``tl-spikesink valleys`` subcommand: compression valleys and whether they follow the spike."""

from __future__ import annotations

import argparse

from tl_spikesink.cli import options


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `valleys` to the subcommands."""
    from tl_spikesink.config import ANALYSIS_MAX_TOKENS as DEFAULT_MAX_TOKENS

    help_text = "matrix entropy, first-token norm ratio, sink ratio and logit-lens loss per layer"
    p = sub.add_parser("valleys", help=help_text, description=help_text)
    options.add_model(p)
    options.add_corpus(p, max_tokens=DEFAULT_MAX_TOKENS)
    p.add_argument("--alpha", type=float, default=1.0, help="Rényi order (default 1: Shannon)")
    p.add_argument("--center", action="store_true", help="center tokens before the Gram matrix")
    p.add_argument("--ablations", nargs="*", default=["mean", "zero"], choices=("mean", "zero"),
                   help="spike ablations run as extra passes (default mean zero)")  # fmt: skip
    p.add_argument("--logit-lens", default="clean", choices=("clean", "all", "none"),
                   help="runs whose logit-lens loss is computed (default clean)")  # fmt: skip
    options.add_outputs(
        p, json="write the curves as JSON", html="write the figure as an offline HTML page"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Measure the curves and print the valley of each run."""
    from tl_spikesink.mechanism.valleys import compression_valleys

    valleys = options.analyse(
        args, compression_valleys, "alpha", "center", "ablations", "logit_lens"
    )
    if args.html:
        from tl_spikesink.views.valleys import plot_valleys

        options.write_figure(plot_valleys(valleys), args.html)


__all__ = ["add_parser", "run"]
