"""The ``tl-spikesink bos`` subcommand: loss and sink heads with, without and mid-sequence BOS."""

from __future__ import annotations

import argparse

from tl_spikesink.cli import options

N_TEXTS = 16
"""Texts the audit reads by default (each cut to --max-len tokens; about a minute on SmolLM2)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `bos` to the subcommands."""
    help_text = "BOS audit: loss and sink heads with BOS, without, packed mid-sequence, replaced"
    p = sub.add_parser("bos", help=help_text, description=help_text)
    options.add_model(p)
    options.add_corpus(p, max_tokens=None)  # the audit counts texts (--texts), not tokens
    p.add_argument("--texts", type=int, default=N_TEXTS, metavar="N",
                   help=f"texts read (default {N_TEXTS})")  # fmt: skip
    p.add_argument("--max-len", type=int, default=64, metavar="N",
                   help="tokens kept of each text (default 64)")  # fmt: skip
    p.add_argument("--prefix-len", type=int, default=16, metavar="N",
                   help="tokens of another text before the mid-sequence BOS (default 16)")  # fmt: skip
    p.add_argument("--delimiter", default="\n",
                   help="the one-token delimiter that replaces BOS (default a newline)")  # fmt: skip
    options.add_outputs(p, json="write the audit as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Run the four conditions and print the table."""
    from tl_spikesink.corpus import default_texts
    from tl_spikesink.errors import SpikeSinkError
    from tl_spikesink.evaluation.bos import bos_audit

    if args.texts < 1:
        raise SpikeSinkError(f"--texts must be at least 1, got {args.texts}")
    model, texts = options.inputs(args)
    audit = bos_audit(
        model,
        (texts or default_texts())[: args.texts],
        delimiter=args.delimiter,
        prefix_len=args.prefix_len,
        max_len=args.max_len,
        progress=not args.no_progress,
    )
    options.emit(str(audit), args.json, audit.to_dict())


__all__ = ["add_parser", "run"]
