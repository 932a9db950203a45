"""The `tl-spikesink sae` subcommand (registered by :mod:`tl_spikesink.cli.commands`).

Evaluates saved sae-lens SAE folders with :func:`tl_spikesink.saes.sae_report`; with several
folders, also prints them side by side.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `sae` to the subcommands."""
    from tl_spikesink.cli.commands import _add_corpus_args, _add_model_args

    p = sub.add_parser(
        "sae", help="evaluate saved SAEs split by spike, sink, delimiter and other tokens"
    )
    p.add_argument("saes", nargs="+", metavar="DIR", help="saved sae-lens SAE folders")
    p.add_argument("--hook", default=None, help="hook point (default: the SAE's own)")
    _add_model_args(p)
    _add_corpus_args(p)
    p.set_defaults(max_tokens=1024)  # six forward passes per batch
    p.add_argument("--json", metavar="OUT", help="write the reports as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Evaluate each SAE folder on the corpus and print the reports."""
    from tl_spikesink.cli.commands import _load_model, _texts
    from tl_spikesink.corpus import tokenize
    from tl_spikesink.probes.scan import ScanConfig, as_corpus, scan_corpus
    from tl_spikesink.saes import compare_reports, sae_report
    from tl_spikesink.views.format import json_text

    config = ScanConfig(
        batch_size=args.batch_size,
        max_tokens=args.max_tokens or None,
        max_seq_len=args.max_seq_len,
    )
    model = _load_model(args)
    texts, name = _texts(args)
    corpus = (
        as_corpus(model, None, config)
        if texts is None
        else tokenize(
            model, texts, name=name, max_seq_len=args.max_seq_len, max_tokens=config.max_tokens
        )
    )
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
    if len(reports) > 1:
        print(compare_reports(reports))
    if args.json:
        json_text({k: r.to_dict() for k, r in reports.items()}, args.json)
        print(f"\nwrote {args.json}")


__all__ = ["add_parser", "run"]
