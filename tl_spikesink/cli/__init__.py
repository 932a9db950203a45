"""The ``tl-spikesink`` command line: one thin subcommand per library verb."""

from tl_spikesink.cli.commands import build_parser, main

__all__ = ["build_parser", "main"]
