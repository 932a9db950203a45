"""The `tl-spikesink` command line: thin subcommands over the library functions."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
from collections.abc import Sequence

from tl_spikesink.errors import SpikeSinkError

_WIDGET_TEXTS = 3
"""The HTML report's widgets read at most this many texts of a --text-file."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from tl_spikesink.models.loading import DEFAULT_MODEL, MODEL_NAMES

    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        choices=sorted(MODEL_NAMES),
        help="built-in offline model",
    )
    src.add_argument(
        "--gguf", metavar="PATH", help="a local Llama / Qwen2 / Gemma 3 GGUF file instead"
    )
    p.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu)"
    )


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--text-file",
        action="append",
        metavar="F",
        help="texts, one per line (repeatable); default: Python's pydoc topics",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=8192,
        metavar="N",
        help="read at most N tokens (default %(default)s; 0: all). The scan reads 8192 tokens "
        "of SmolLM2 in about a minute on 2 CPU cores",
    )
    p.add_argument(
        "--max-seq-len", type=int, default=None, metavar="L", help="chunk texts to L tokens"
    )
    p.add_argument("--batch-size", type=int, default=8, metavar="B")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_threshold_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epsilon", type=float, default=0.3, help="sink-head threshold (Gu et al.)")
    p.add_argument("--abs-threshold", type=float, default=100.0, help="a spike exceeds this |x|")
    p.add_argument(
        "--rel-threshold", type=float, default=1000.0, help="... and this x layer median"
    )


def _load_model(args: argparse.Namespace):
    import torch

    from tl_spikesink.models.loading import load, load_gguf

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.gguf:
        return load_gguf(args.gguf, device=device)
    return load(args.model, device=device, progress=not args.no_progress)


def _texts(args: argparse.Namespace) -> tuple[list[str] | None, str | None]:
    from tl_spikesink.corpus import read_text_file

    if not args.text_file:
        return None, None
    texts: list[str] = []
    for path in args.text_file:
        texts += read_text_file(path)
    return texts, ", ".join(args.text_file)


def _scan_args(args: argparse.Namespace):
    """Load the model and scan the requested corpus; returns (model, texts, result)."""
    from tl_spikesink.corpus import tokenize
    from tl_spikesink.probes.scan import ScanConfig, scan

    if getattr(args, "distributed", False):  # under torchrun: each rank scans its shard
        from tl_spikesink.distributed import scan_distributed as scan

    args.max_tokens = args.max_tokens or None  # 0 reads the whole corpus
    config = ScanConfig(
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        max_seq_len=args.max_seq_len,
        epsilon=args.epsilon,
        abs_threshold=args.abs_threshold,
        rel_threshold=args.rel_threshold,
    )
    model = _load_model(args)
    texts, name = _texts(args)
    corpus = None
    if texts is not None:
        corpus = tokenize(
            model, texts, name=name, max_seq_len=args.max_seq_len, max_tokens=args.max_tokens
        )
    return model, texts, scan(model, corpus, config, progress=not args.no_progress)


def _scan(args: argparse.Namespace) -> None:
    model, texts, result = _scan_args(args)
    print(result)
    if args.json:
        result.to_json(args.json)
        print(f"\nwrote {args.json}")
    if args.html:
        _write_html(args.html, result, model, texts)


def _claims(args: argparse.Namespace) -> None:
    from tl_spikesink.corpus import default_texts
    from tl_spikesink.mechanism.claims import claims

    model, texts, result = _scan_args(args)
    table = claims(model, texts or default_texts(), result, max_tokens=args.claim_tokens)
    print(table)
    if args.json:
        from tl_spikesink.views.format import json_text

        json_text(table.to_dict(), args.json)
        print(f"\nwrote {args.json}")


def _write_html(path: str, result, model, texts: list[str] | None) -> None:
    from tl_spikesink.views.html import write_html

    # Widgets read a few texts again (one forward each); the scan's corpus may be thousands.
    write_html(result, path, model=model, texts=texts[:_WIDGET_TEXTS] if texts else None)
    print(f"\nwrote {path}")


def _intervene(args: argparse.Namespace) -> None:
    from tl_spikesink.corpus import read_text_file
    from tl_spikesink.evaluation.decoupling import experiment
    from tl_spikesink.probes.scan import ScanConfig

    config = ScanConfig(
        batch_size=args.batch_size, max_tokens=args.max_tokens, max_seq_len=args.max_seq_len
    )
    calibration = read_text_file(args.calibration_file) if args.calibration_file else None
    model = _load_model(args)
    texts, _ = _texts(args)
    table = experiment(
        model,
        texts,
        calibration=calibration,
        config=config,
        calibration_tokens=args.calibration_tokens,
        progress=not args.no_progress,
        distributed=getattr(args, "distributed", False),
    )
    print(table)
    if args.json:
        table.to_json(args.json)
        print(f"\nwrote {args.json}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="tl-spikesink",
        description="Find massive activations and attention sinks in TransformerLens models.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("scan", help="where are the spikes and sinks? (summary table, JSON)")
    _add_model_args(p)
    _add_corpus_args(p)
    _add_threshold_args(p)
    p.add_argument("--json", metavar="OUT", help="write the full report as JSON")
    p.add_argument("--html", metavar="OUT", help="also write the report as one offline HTML page")
    p.set_defaults(run=_scan)

    p = sub.add_parser("report", help="scan, then write one offline HTML page (plots, widgets)")
    _add_model_args(p)
    _add_corpus_args(p)
    _add_threshold_args(p)
    p.add_argument("--html", metavar="OUT", required=True, help="where to write the HTML page")
    p.add_argument("--json", metavar="OUT", help="also write the full report as JSON")
    p.set_defaults(run=_scan)

    p = sub.add_parser("claims", help="check each link of the spike-to-sink chain on this model")
    _add_model_args(p)
    _add_corpus_args(p)
    _add_threshold_args(p)
    p.set_defaults(max_tokens=4096)
    p.add_argument(
        "--claim-tokens", type=int, default=1024, metavar="N", help="tokens the checks read"
    )
    p.add_argument("--json", metavar="OUT", help="write the claims table as JSON")
    p.set_defaults(run=_claims)

    p = sub.add_parser(
        "intervene",
        help="zero / mean the spikes, remove sink keys, swap norms: the decoupling table",
    )
    _add_model_args(p)
    _add_corpus_args(p)
    p.set_defaults(max_tokens=4096)  # every row reads the corpus about three times
    p.add_argument(
        "--calibration-file",
        metavar="F",
        help="calibration texts, one per line (default: the first quarter of the default corpus)",
    )
    p.add_argument("--calibration-tokens", type=int, default=4096, metavar="N")
    p.add_argument("--json", metavar="OUT", help="write the table as JSON")
    p.set_defaults(run=_intervene)

    from tl_spikesink.cli.ablate import add_parser as add_ablate_parser  # argparse only

    add_ablate_parser(sub)
    from tl_spikesink.cli.sae import add_parser as add_sae_parser

    add_sae_parser(sub)
    return parser


def _as_rank(args: argparse.Namespace, rank: int | None) -> contextlib.AbstractContextManager:
    """Under torchrun every rank computes; ranks other than 0 print, write and show nothing."""
    args.distributed = rank is not None
    if not rank:
        return contextlib.nullcontext()
    args.no_progress = True
    for output in ("json", "html"):
        setattr(args, output, None)
    return contextlib.redirect_stdout(io.StringIO())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `tl-spikesink`; returns the exit code (tests call it in-process)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    try:
        from tl_spikesink.distributed import torchrun_session

        with torchrun_session() as rank, _as_rank(args, rank):
            args.run(args)
    except SpikeSinkError as e:
        print(f"tl-spikesink: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
