"""The ``tl-spikesink paper`` subcommand: the model's row beside the seed paper's tables."""

from __future__ import annotations

import argparse
import sys

from tl_spikesink.cli import options


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `paper` to the subcommands."""
    help_text = "the model's Table 1 / Table 2 row, sink ratio, Spike and claims beside the paper"
    p = sub.add_parser("paper", help=help_text, description=help_text)
    options.add_model(p)
    options.add_corpus(p, max_tokens=4096)
    p.add_argument("--no-vocab", action="store_true", help="skip the vocabulary probe (Table 2)")
    p.add_argument("--no-claims", action="store_true", help="skip the mechanism claims")
    options.add_outputs(
        p, json="write the row as JSON", html="write the row as one offline HTML page"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Measure the model as the paper does and print the row beside the published ones."""
    from tl_spikesink.mechanism.paper import paper_row

    row = options.analyse(
        args,
        paper_row,
        vocab=not args.no_vocab,
        claims=not args.no_claims,
        max_tokens=args.max_tokens or None,
    )
    if args.html:
        from tl_spikesink.views.paper import write_paper_html

        print(f"wrote {write_paper_html(row, args.html)}", file=sys.stderr)


__all__ = ["add_parser", "run"]
