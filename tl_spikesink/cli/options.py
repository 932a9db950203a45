"""Options shared by the subcommands, and options generated from config dataclasses.

A config field becomes ``--field-name`` with its attribute docstring as the help text and its
default shown, so a default is written once, in the dataclass (tuned-lens's pattern). Nothing
here imports torch: ``tl-spikesink --help`` builds every parser without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from tl_spikesink.config import field_docs
from tl_spikesink.errors import SpikeSinkError


def add_config(
    parser: argparse.ArgumentParser,
    cls: type,
    fields: tuple[str, ...],
    defaults: dict[str, Any] | None = None,
) -> None:
    """Add ``--name`` options for the chosen `fields` of config dataclass `cls`.

    `defaults` overrides a field's default for this command only (the help says so); options
    left out of the command line keep the dataclass's default.
    """
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    group = parser.add_argument_group(f"{cls.__name__} settings")
    for name in fields:
        field, hint = by_name[name], hints[name]
        default = (defaults or {}).get(name, field.default)
        kind, choices = _parse_type(hint)
        help_text = docs.get(name, "").replace("%", "%%") + f" (default: {default})"
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        else:
            group.add_argument(
                flag, type=kind, choices=choices, default=default,
                metavar=None if choices else name.upper(),
                help=help_text,
            )  # fmt: skip


def config_from(args: argparse.Namespace, cls: type, **extra: Any) -> Any:
    """`cls` built from the options :func:`add_config` added (and `extra` fields)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return cls(**{**values, **extra})


def _parse_type(hint: Any) -> tuple[Any, tuple | None]:
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return str, args
    if origin is not None and type(None) in args:  # X | None
        return _parse_type(next(a for a in args if a is not type(None)))
    return hint, None


def add_model(parser: argparse.ArgumentParser) -> None:
    """``--model`` / ``--gguf`` / ``--device``."""
    from tl_spikesink.models.registry import DEFAULT_MODEL, MODEL_NAMES

    src = parser.add_mutually_exclusive_group()
    src.add_argument(
        "--model", default=DEFAULT_MODEL, choices=sorted(MODEL_NAMES), help="built-in offline model"
    )
    src.add_argument(
        "--gguf", metavar="PATH", help="a local Llama / Qwen2 / Gemma 3 GGUF file instead"
    )
    parser.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu)"
    )


def add_corpus(parser: argparse.ArgumentParser, max_tokens: int | None) -> None:
    """``--text-file`` (repeatable), ``--max-tokens`` (0: all; None: no such option, for
    commands that count texts instead) and ``--no-progress``."""
    parser.add_argument(
        "--text-file",
        action="append",
        metavar="F",
        help="texts, one per line (repeatable); default: Python's pydoc topics",
    )
    if max_tokens is not None:
        parser.add_argument(
            "--max-tokens",
            type=int,
            default=max_tokens,
            metavar="N",
            help="read at most N tokens of the corpus (default %(default)s; 0: all of it)",
        )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def token_limit(args: argparse.Namespace) -> int:
    """``--max-tokens`` as the analyses take it: 0 means the whole corpus."""
    return args.max_tokens or 1 << 62


def add_outputs(parser: argparse.ArgumentParser, **outputs: str) -> None:
    """``--json OUT`` and the like; each help text says what is written."""
    for name, help_text in outputs.items():
        parser.add_argument(f"--{name}", metavar="OUT", help=help_text)


def check_outputs(args: argparse.Namespace, names: tuple[str, ...] = ("json", "html")) -> None:
    """Refuse output paths that cannot be written before any work is done (not after a scan)."""
    for name in names:
        path = getattr(args, name, None)
        if not path:
            continue
        flag = name.replace("_", "-")
        folder = Path(path).expanduser().resolve().parent
        if not folder.is_dir():
            raise SpikeSinkError(f"--{flag} {path}: the folder {folder} does not exist; create it")
        if not os.access(folder, os.W_OK):
            raise SpikeSinkError(f"--{flag} {path}: the folder {folder} is not writable")
        if Path(path).is_dir():
            raise SpikeSinkError(f"--{flag} {path} is a folder; give a file name")


def load_model(args: argparse.Namespace) -> Any:
    """The model the options name, on the chosen device."""
    import torch

    from tl_spikesink.models import load, load_gguf

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.gguf:
        return load_gguf(args.gguf, device=device, progress=not args.no_progress)
    return load(args.model, device=device, progress=not args.no_progress)


def read_texts(args: argparse.Namespace) -> tuple[list[str] | None, str | None]:
    """The texts of every ``--text-file`` and a name for the corpus (None, None: the default)."""
    from tl_spikesink.corpus import read_text_file

    if not args.text_file:
        return None, None
    texts: list[str] = []
    for path in args.text_file:
        texts += read_text_file(path)
    return texts, ", ".join(args.text_file)


def corpus_of(model: Any, args: argparse.Namespace, config: Any) -> Any:
    """The corpus the options name, tokenized as `config` says (None texts: the default)."""
    from tl_spikesink.probes.scan import as_corpus

    texts, name = read_texts(args)
    return as_corpus(model, texts, config, name)


def inputs(args: argparse.Namespace) -> tuple[Any, list[str] | None]:
    """The model and the texts the options name (``main`` has checked the output paths)."""
    return load_model(args), read_texts(args)[0]


def emit(text: str, path: str | None, payload: dict[str, Any] | None = None) -> None:
    """Print `text` to stdout, and write `payload` as JSON to `path` if given."""
    import sys

    print(text)
    if path and payload is not None:
        from tl_spikesink.views.format import json_text

        json_text(payload, path)
        print(f"wrote {path}", file=sys.stderr)


def analyse(
    args: argparse.Namespace, analysis: Any, *same: str, progress: bool = True, **settings: Any
) -> Any:
    """Run ``analysis(model, texts, ...)`` on the options' inputs, print it and write ``--json``.

    `same` names options passed on under their own name; `settings` are passed as given (and
    may override ``max_tokens``). `progress`: whether `analysis` takes ``progress=``.
    """
    model, texts = inputs(args)
    kwargs = {"max_tokens": token_limit(args), **{n: getattr(args, n) for n in same}, **settings}
    if progress:
        kwargs["progress"] = not args.no_progress
    result = analysis(model, texts, **kwargs)
    emit(str(result), args.json, result.to_dict())
    return result


def write_figure(fig: Any, path: str) -> None:
    """Write a plotly figure as a page that opens offline (plotly.js embedded)."""
    import sys

    fig.write_html(path, include_plotlyjs=True, full_html=True)
    print(f"wrote {path}", file=sys.stderr)


__all__ = [
    "add_config",
    "add_corpus",
    "add_model",
    "add_outputs",
    "check_outputs",
    "config_from",
    "corpus_of",
    "emit",
    "load_model",
    "read_texts",
    "token_limit",
    "write_figure",
]
