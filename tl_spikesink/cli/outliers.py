"""The ``tl-spikesink detect`` and ``kurtosis`` subcommands: a scan's outliers by other rules."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `detect` and `kurtosis` to the subcommands."""
    from tl_spikesink.cli import options
    from tl_spikesink.cli.commands import scan_parser
    from tl_spikesink.config import DETECTOR_RULES as RULES
    from tl_spikesink.config import MAD_Z

    p = scan_parser(sub, "detect", "massive activations by Sun et al.'s, the MAD and the "
                    "persistence rule, side by side", 4096)  # fmt: skip
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=RULES,
                   help="rules to compare (default all)")  # fmt: skip
    p.add_argument("--z", type=float, default=MAD_Z,
                   help=f"the MAD rule's multiple of the scaled MAD (default {MAD_Z:g})")  # fmt: skip
    p.add_argument("--min-layers", type=int, default=None, metavar="M",
                   help="the persistence rule's run length (default 1 + (L + 1) // 4)")  # fmt: skip
    options.add_outputs(p, json="write every rule's flags as JSON")
    p.set_defaults(run=_detect)

    p = scan_parser(sub, "kurtosis", "OSP's excess kurtosis per layer, with and without the "
                    "spike tokens", 4096)  # fmt: skip
    options.add_outputs(
        p, json="write both curves as JSON", html="write the figure as an offline HTML page"
    )
    p.set_defaults(run=_kurtosis)


def _detect(args: argparse.Namespace) -> None:
    from tl_spikesink.cli import options
    from tl_spikesink.cli.commands import scan_args
    from tl_spikesink.probes.detectors import check_sink_logits, compare_detectors

    model, _, result = scan_args(args)
    check_sink_logits(model)
    table = compare_detectors(result, rules=args.rules, z=args.z, min_layers=args.min_layers)
    options.emit(str(table), args.json, table.to_dict())


def _kurtosis(args: argparse.Namespace) -> None:
    from tl_spikesink.cli import options
    from tl_spikesink.cli.commands import scan_args
    from tl_spikesink.probes.kurtosis import excess_kurtosis

    _, _, result = scan_args(args)
    k = excess_kurtosis(result)
    options.emit(str(k), args.json, k.to_dict())
    if args.html:
        from tl_spikesink.views.kurtosis import plot_kurtosis

        options.write_figure(plot_kurtosis(k), args.html)


__all__ = ["add_parser"]
