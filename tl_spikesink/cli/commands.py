"""The ``tl-spikesink`` subcommands: thin wrappers that parse options and call library verbs.

The summary goes to stdout; progress bars and "wrote ..." lines go to stderr, so
``tl-spikesink scan > summary.txt`` keeps only the table. Output paths are checked before any
work. Scan settings come from :class:`~tl_spikesink.config.ScanConfig` (one option per field,
its docstring the help); nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
from collections.abc import Sequence

from tl_spikesink.cli import options
from tl_spikesink.config import ScanConfig
from tl_spikesink.errors import SpikeSinkError

WIDGET_TEXTS = 3
"""The HTML report's widgets read at most this many texts of a --text-file."""

SCAN_FIELDS = (
    "batch_size",
    "max_seq_len",
    "long_texts",
    "padding_side",
    "prepend_bos",
    "abs_threshold",
    "rel_threshold",
    "epsilon",
    "sink_probe_len",
    "sink_min_len",
    "sink_token_share",
    "min_queries",
    "top_k",
    "max_candidates",
    "seed",
)
"""ScanConfig fields the scan-based commands expose."""


def scan_config(args: argparse.Namespace) -> ScanConfig:
    """The ScanConfig the options describe (``--max-tokens 0``: the whole corpus)."""
    return options.config_from(args, ScanConfig, max_tokens=args.max_tokens or None)


def scan_args(args: argparse.Namespace):
    """Load the model and scan the requested corpus; returns (model, texts, result)."""
    from tl_spikesink.probes.scan import scan

    if getattr(args, "distributed", False):  # under torchrun: each rank scans its shard
        from tl_spikesink.distributed import scan_distributed as scan

    config = scan_config(args)
    model, texts = options.inputs(args)
    corpus = options.corpus_of(model, args, config)
    return model, texts, scan(model, corpus, config, progress=not args.no_progress)


def _scan(args: argparse.Namespace) -> None:
    model, texts, result = scan_args(args)
    options.emit(str(result), args.json, result.to_dict())
    if args.html:
        _write_html(args.html, result, model, texts)


def _claims(args: argparse.Namespace) -> None:
    from tl_spikesink.corpus import default_texts
    from tl_spikesink.mechanism.claims import claims

    model, texts, result = scan_args(args)
    table = claims(
        model,
        texts or default_texts(),
        result,
        max_tokens=args.claim_tokens,
        progress=not args.no_progress,
    )
    options.emit(str(table), args.json, table.to_dict())


def _write_html(path: str, result, model, texts: list[str] | None) -> None:
    from tl_spikesink.views.html import write_html

    # Widgets read a few texts again (one forward each); the scan's corpus may be thousands.
    write_html(result, path, model=model, texts=texts[:WIDGET_TEXTS] if texts else None)
    print(f"wrote {path}", file=sys.stderr)


def _intervene(args: argparse.Namespace) -> None:
    from tl_spikesink.corpus import read_text_file
    from tl_spikesink.evaluation.decoupling import experiment

    config = scan_config(args)
    calibration = read_text_file(args.calibration_file) if args.calibration_file else None
    model, texts = options.inputs(args)
    table = experiment(
        model,
        texts,
        calibration=calibration,
        config=config,
        calibration_tokens=args.calibration_tokens,
        progress=not args.no_progress,
        distributed=getattr(args, "distributed", False),
    )
    options.emit(str(table), args.json, table.to_dict())


def scan_parser(sub: argparse._SubParsersAction, name: str, help_text: str, max_tokens: int):
    """A subcommand that scans: model, corpus and every ScanConfig option of SCAN_FIELDS."""
    p = sub.add_parser(name, help=help_text, description=help_text)
    options.add_model(p)
    options.add_corpus(p, max_tokens=max_tokens)
    options.add_config(p, ScanConfig, SCAN_FIELDS)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="tl-spikesink",
        description="Find massive activations and attention sinks in TransformerLens models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    # 8192 tokens of SmolLM2 take about a minute on 2 CPU cores.
    p = scan_parser(sub, "scan", "where are the spikes and sinks? (summary, JSON)", 8192)
    options.add_outputs(
        p, json="write the full report as JSON", html="also write one offline HTML page"
    )
    p.set_defaults(run=_scan)

    p = scan_parser(sub, "report", "scan, then write one offline HTML page", 8192)
    p.add_argument("--html", metavar="OUT", required=True, help="where to write the HTML page")
    options.add_outputs(p, json="also write the full report as JSON")
    p.set_defaults(run=_scan)

    p = scan_parser(sub, "claims", "check each link of the spike-to-sink chain", 4096)
    p.add_argument(
        "--claim-tokens", type=int, default=1024, metavar="N", help="tokens the checks read"
    )
    options.add_outputs(p, json="write the claims table as JSON")
    p.set_defaults(run=_claims)

    # Every row of the table reads the corpus once more: 4096 tokens by default.
    p = scan_parser(
        sub, "intervene", "zero / mean the spikes, remove sink keys, swap norms: a table", 4096
    )
    p.add_argument(
        "--calibration-file",
        metavar="F",
        help="calibration texts, one per line (default: the first quarter of the default corpus)",
    )
    p.add_argument("--calibration-tokens", type=int, default=4096, metavar="N")
    options.add_outputs(p, json="write the table as JSON")
    p.set_defaults(run=_intervene)

    from tl_spikesink.cli import (
        ablate,
        bos,
        outliers,
        paper,
        quantize,
        sae,
        streaming,
        superweights,
        valleys,
    )

    for command in (paper, outliers, streaming, superweights, quantize, valleys, bos, ablate, sae):
        command.add_parser(sub)
    return parser


OUTPUTS = ("json", "html", "summary_json", "markdown", "plot")
"""Every file-writing option of any command: checked before work, silenced on ranks > 0."""


def _as_rank(args: argparse.Namespace, rank: int | None) -> contextlib.AbstractContextManager:
    """Under torchrun every rank computes; ranks other than 0 print, write and show nothing."""
    args.distributed = rank is not None
    if not rank:
        return contextlib.nullcontext()
    args.no_progress = True
    for output in OUTPUTS:
        setattr(args, output, None)
    return contextlib.redirect_stdout(io.StringIO())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tl-spikesink`; returns the exit code (tests call it in-process)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    try:
        options.check_outputs(args, OUTPUTS)
        from tl_spikesink.distributed import torchrun_session

        with torchrun_session() as rank, _as_rank(args, rank):
            args.run(args)
    except SpikeSinkError as e:
        print(f"tl-spikesink: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
