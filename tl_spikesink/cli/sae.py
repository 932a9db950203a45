"""The `tl-spikesink sae` subcommand (registered by :mod:`tl_spikesink.cli.commands`).

Evaluates saved sae-lens SAE folders with :func:`tl_spikesink.saes.sae_report`; with several
folders, also prints them side by side.
"""

from __future__ import annotations

import argparse

from tl_spikesink.cli import options
from tl_spikesink.config import ScanConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `sae` to the subcommands."""
    p = sub.add_parser(
        "sae", help="evaluate saved SAEs split by spike, sink, delimiter and other tokens"
    )
    p.add_argument("saes", nargs="+", metavar="DIR", help="saved sae-lens SAE folders")
    p.add_argument("--hook", default=None, help="hook point (default: the SAE's own)")
    options.add_model(p)
    options.add_corpus(p, max_tokens=1024)  # six forward passes per batch
    options.add_config(p, ScanConfig, ("batch_size", "max_seq_len"))
    options.add_outputs(p, json="write the reports as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Evaluate each SAE folder on the corpus and print the reports."""
    from tl_spikesink.probes.scan import scan_corpus
    from tl_spikesink.saes import compare_reports, sae_report

    config = options.config_from(args, ScanConfig, max_tokens=args.max_tokens or None)
    model = options.load_model(args)
    corpus = options.corpus_of(model, args, config)
    # One scan for every SAE: the token classes are the same.
    scan = scan_corpus(model, corpus, config, progress=not args.no_progress)
    reports = {}
    for path in args.saes:
        reports[path] = sae_report(
            model,
            path,
            corpus,
            hook=args.hook,
            scan=scan,
            config=config,
            progress=not args.no_progress,
        )
        print(reports[path], end="\n\n")
    text = str(compare_reports(reports)) if len(reports) > 1 else ""
    options.emit(text, args.json, {k: r.to_dict() for k, r in reports.items()})


__all__ = ["add_parser", "run"]
