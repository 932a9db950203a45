"""The ``tl-spikesink superweights`` subcommand: Yu et al.'s super weights, ranked by role."""

from __future__ import annotations

import argparse

from tl_spikesink.cli import options


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `superweights` to the subcommands."""
    help_text = "find the super weights (Yu et al.), tell step-up from step-down, prune the top one"
    p = sub.add_parser("superweights", help=help_text, description=help_text)
    options.add_model(p)
    options.add_corpus(p, max_tokens=1024)
    p.add_argument(
        "--prompt", default=None, help="the prompt the rule reads (default: Yu et al.'s)"
    )
    p.add_argument("--threshold", type=float, default=50.0, metavar="T",
                   help="cut on the MLP's largest |input| and |output| (default 50)")  # fmt: skip
    p.add_argument("--no-eval", action="store_true", help="skip the three perplexities")
    p.add_argument("--scales", type=float, nargs="+", default=[], metavar="S",
                   help="also the perplexity with the top weight scaled by each S (e.g. 0 0.5 2 3)")  # fmt: skip
    options.add_outputs(p, json="write the candidates and perplexities as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Rank the candidates of the model and test the top one."""
    from tl_spikesink.mechanism.super_weights import PROMPT, super_weights

    options.analyse(
        args,
        super_weights,
        "threshold",
        "scales",
        prompt=args.prompt or PROMPT,
        evaluate=not args.no_eval,
    )


__all__ = ["add_parser", "run"]
