"""Settings as typed, frozen dataclasses: every default and help text is written once, here.

The command line builds its options from these fields (their attribute docstrings are the help
text), every result records the config that produced it, and ``__post_init__`` only validates:
a value outside its range, a NaN, or a string outside its ``Literal`` raises a
:class:`SpikeSinkError` naming the field and what it accepts. This module imports no torch, so
``tl-spikesink --help`` stays fast.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from tl_spikesink.anatomy import Site
from tl_spikesink.errors import SpikeSinkError

LongTexts = Literal["chunk", "truncate", "error"]
PaddingSide = Literal["right", "left"]
SPIKE_SITES: tuple[Site, ...] = ("resid_post", "attn_out", "mlp_out")
"""Hook sites the scan reads for spikes by default: the residual stream and each block's output."""


@dataclass(frozen=True)
class ScanConfig:
    """Settings of a scan; every report records them."""

    batch_size: int = 8
    """Sequences per forward pass."""
    max_seq_len: int | None = None
    """Longest sequence fed to the model; longer texts are chunked (default: the model's n_ctx)."""
    max_tokens: int | None = None
    """Stop after this many tokens of the corpus."""
    long_texts: LongTexts = "chunk"
    """A text longer than max_seq_len is split into chunks, truncated, or refused ("error")."""
    padding_side: PaddingSide = "right"
    """Side on which batches are padded; results do not depend on it."""
    prepend_bos: bool | None = None
    """Prepend BOS to each sequence (default: the model's own `default_prepend_bos`)."""
    abs_threshold: float = 100.0
    """A massive activation exceeds this absolute value ..."""
    rel_threshold: float = 1000.0
    """... and this multiple of its layer's median |x| (Sun et al. 2024)."""
    spike_sites: tuple[Site, ...] = SPIKE_SITES
    """Hook sites whose activations are scanned for spikes (resid_post is required)."""
    epsilon: float = 0.3
    """ε of both sink ratios: a head is a sink head when its α exceeds this (Eq. 28, Gu et al.)."""
    sink_probe_len: int = 64
    """T of the Eq. 28 sink ratio is min(n, this): a sequence's first T queries are read."""
    sink_min_len: int = 8
    """Sequences with T below this are left out of the Eq. 28 sink ratio."""
    sink_token_share: float = 0.1
    """A token is a sink token when this share of all heads give it α > epsilon."""
    min_queries: int = 4
    """Keys seen by fewer queries are not judged as sink tokens."""
    top_k: int = 10
    """Largest entries kept per (site, layer) whatever their size."""
    max_candidates: int = 4096
    """Most entries above threshold kept per (site, layer); results say when it was hit."""
    seed: int = 0
    """Seed set before scanning (the scan itself draws no random numbers)."""

    def batching(self) -> dict[str, Any]:
        """The engine's batching arguments: ``run(model, corpus, ..., **config.batching())``."""
        return {"batch_size": self.batch_size, "padding_side": self.padding_side}

    def __post_init__(self) -> None:
        check_fields(self)
        if "resid_post" not in self.spike_sites:
            raise SpikeSinkError("spike_sites must include 'resid_post' (spikes are defined there)")
        at_least(
            self,
            {
                "batch_size": 1,
                "max_seq_len": 2,
                "max_tokens": 1,
                "abs_threshold": 0,
                "rel_threshold": 1,
                "min_queries": 1,
                "top_k": 3,  # reports show the top 3
                "max_candidates": 3,
            },
        )
        if not 0 < self.sink_token_share <= 1:
            raise SpikeSinkError(
                f"sink_token_share is a share of heads: it must lie in (0, 1], got "
                f"{self.sink_token_share}"
            )
        if not self.spike_sites or len(set(self.spike_sites)) != len(self.spike_sites):
            raise SpikeSinkError(f"spike_sites must be distinct sites, got {self.spike_sites}")
        if self.max_candidates < self.top_k:
            raise SpikeSinkError(
                f"max_candidates ({self.max_candidates}) must be at least top_k ({self.top_k})"
            )
        if not 0 < self.epsilon < 1:
            raise SpikeSinkError(f"epsilon must lie in (0, 1), got {self.epsilon}")
        if self.sink_probe_len < 2:
            raise SpikeSinkError(
                f"sink_probe_len must be at least 2 (keys k < T/2 are judged), "
                f"got {self.sink_probe_len}"
            )
        if not 1 <= self.sink_min_len <= self.sink_probe_len:
            raise SpikeSinkError(
                f"sink_min_len must lie in [1, sink_probe_len = {self.sink_probe_len}] (else no "
                f"sequence is ever counted), got {self.sink_min_len}"
            )


def check_fields(config: Any) -> None:
    """Refuse values that do not fit a config field's type: the check every config runs.

    Numbers must be finite (NaN and infinities give meaningless results silently); ints must be
    ints (bools are not), strings must be one of their ``Literal``'s values, tuples hold items of
    their declared kind. Range checks specific to a field stay in the config's ``__post_init__``.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        _check(type(config).__name__, f.name, getattr(config, f.name), hints[f.name])


def _check(owner: str, name: str, value: Any, hint: Any) -> None:
    where = f"{owner}.{name}"
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _check(owner, name, value, option)
            except SpikeSinkError as e:
                errors.append(str(e))
        raise SpikeSinkError(errors[0])
    if origin is Literal:
        if value not in args:
            raise SpikeSinkError(f"{where} must be one of {args}, got {value!r}")
        return
    if origin is tuple:
        if not isinstance(value, tuple):
            raise SpikeSinkError(f"{where} must be a tuple, got {type(value).__name__}")
        item = args[0] if args else Any
        for v in value:
            _check(owner, name, v, item)
        return
    if hint is bool:
        if not isinstance(value, bool):
            raise SpikeSinkError(f"{where} must be True or False, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpikeSinkError(f"{where} must be an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpikeSinkError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise SpikeSinkError(f"{where} must be finite, got {value!r}")
    elif hint is str and not isinstance(value, str):
        raise SpikeSinkError(f"{where} must be a string, got {value!r}")


def at_least(config: Any, bounds: dict[str, float]) -> None:
    """Refuse fields below their lower bound (None, for optional fields, passes)."""
    for name, low in bounds.items():
        value = getattr(config, name)
        if value is not None and value < low:
            raise SpikeSinkError(
                f"{type(config).__name__}.{name} must be at least {low:g}, got {value!r}"
            )


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass's fields (the string under each field)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


STREAMING_WINDOWS = (64, 256)
"""Default recent windows W of :func:`tl_spikesink.evaluation.streaming.streaming`."""
STREAMING_SINKS = (0, 4)
"""Default numbers of first keys kept (StreamingLLM's 0 and 4)."""
STREAMING_SEQ_LEN = 1024
"""Default tokens per sequence of the streaming evaluation."""

# The neighbouring analyses' defaults, here so that the command line builds without torch.
ANALYSIS_MAX_TOKENS = 1024
"""Tokens the mechanism checks, compression valleys and quantization tables read by default."""
DetectorRule = Literal["sun", "mad", "persistent"]
DETECTOR_RULES: tuple[DetectorRule, ...] = get_args(DetectorRule)
MAD_Z = 1000.0
"""The MAD rule's multiple of the scaled MAD (heretic's ``min_mad_mult``)."""
QuantSite = Literal["resid", "mlp_in", "attn_in", "kv"]
QUANT_SITES: tuple[QuantSite, ...] = get_args(QuantSite)
QUANT_KEEPS = ("none", "spike", "sink", "first:1", "first:4")
"""Tokens kept in full precision, one quantization row each, by default."""


__all__ = [
    "ANALYSIS_MAX_TOKENS",
    "DETECTOR_RULES",
    "MAD_Z",
    "QUANT_KEEPS",
    "QUANT_SITES",
    "DetectorRule",
    "QuantSite",
    "STREAMING_SEQ_LEN",
    "STREAMING_SINKS",
    "STREAMING_WINDOWS",
    "LongTexts",
    "PaddingSide",
    "SPIKE_SITES",
    "ScanConfig",
    "at_least",
    "check_fields",
    "field_docs",
]
