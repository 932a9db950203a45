"""Corpus: texts tokenized as the model's own tokenizer does, chunked to the context and batched.

A text longer than the context is cut into chunks; each chunk is a sequence of its own and starts
as the model's inputs start (with BOS where the model prepends one), so "the first token" always
means the first real token the model sees. Every batch carries a mask, so pads never count.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any, get_args

import torch
from jaxtyping import Bool, Int

from tl_spikesink.config import LongTexts, PaddingSide
from tl_spikesink.errors import SpikeSinkError


@dataclass(frozen=True)
class Chunk:
    """One sequence the model reads: a whole text or one chunk of a long text."""

    text_index: int
    start: int
    """Offset of this chunk's first token within its text's token list (BOS not counted)."""
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class Batch:
    """Padded sequences for one forward pass, with where each came from."""

    tokens: Int[torch.Tensor, "batch pos"]
    mask: Bool[torch.Tensor, "batch pos"]
    text_index: Int[torch.Tensor, " batch"]
    start: Int[torch.Tensor, " batch"]
    first: Int[torch.Tensor, " batch"]
    """Column of each sequence's first real token (non-zero only under left padding)."""
    lengths: Int[torch.Tensor, " batch"]


@dataclass(frozen=True)
class Corpus:
    """Texts turned into model-ready chunks, with a fingerprint so reports can name the corpus."""

    name: str
    n_texts: int
    chunks: tuple[Chunk, ...]
    prepend_bos: bool
    max_seq_len: int
    sha256: str
    """Hash of the texts, so two reports can be checked to have read the same corpus."""

    @property
    def n_tokens(self) -> int:
        """Tokens the model reads, BOS included."""
        return sum(len(c.tokens) for c in self.chunks)

    def describe(self) -> dict[str, Any]:
        """The record a report keeps of this corpus."""
        return {
            "name": self.name,
            "n_texts": self.n_texts,
            "n_sequences": len(self.chunks),
            "n_tokens": self.n_tokens,
            "max_seq_len": self.max_seq_len,
            "sha256": self.sha256,
        }

    def batches(self, batch_size: int, padding_side: PaddingSide = "right") -> Iterator[Batch]:
        """Yield padded batches, longest sequences first so memory peaks at once, not late."""
        if batch_size < 1:
            raise SpikeSinkError(f"batch_size must be at least 1, got {batch_size}")
        if padding_side not in get_args(PaddingSide):
            raise SpikeSinkError(
                f"padding_side must be one of {get_args(PaddingSide)}, got {padding_side!r}"
            )
        order = sorted(range(len(self.chunks)), key=lambda i: -len(self.chunks[i].tokens))
        for lo in range(0, len(order), batch_size):
            yield _pad([self.chunks[i] for i in order[lo : lo + batch_size]], padding_side)

    def shard(self, rank: int, world_size: int) -> Corpus:
        """The chunks one of `world_size` workers reads; the shards partition the corpus."""
        if not 0 <= rank < world_size:
            raise SpikeSinkError(f"rank {rank} is outside 0..{world_size - 1}")
        return Corpus(
            name=f"{self.name}[{rank}/{world_size}]",
            n_texts=self.n_texts,
            chunks=self.chunks[rank::world_size],
            prepend_bos=self.prepend_bos,
            max_seq_len=self.max_seq_len,
            sha256=self.sha256,
        )


def _pad(chunks: list[Chunk], side: PaddingSide) -> Batch:
    width = max(len(c.tokens) for c in chunks)
    tokens = torch.zeros(len(chunks), width, dtype=torch.long)
    mask = torch.zeros(len(chunks), width, dtype=torch.bool)
    first = torch.zeros(len(chunks), dtype=torch.long)
    for row, chunk in enumerate(chunks):
        n = len(chunk.tokens)
        lo = 0 if side == "right" else width - n
        tokens[row, lo : lo + n] = torch.tensor(chunk.tokens)
        mask[row, lo : lo + n] = True
        first[row] = lo
    return Batch(
        tokens=tokens,
        mask=mask,
        text_index=torch.tensor([c.text_index for c in chunks]),
        start=torch.tensor([c.start for c in chunks]),
        first=first,
        lengths=mask.sum(-1),
    )


def tokenize(
    model: Any,
    texts: Sequence[str] | str,
    *,
    name: str = "texts",
    max_seq_len: int | None = None,
    max_tokens: int | None = None,
    long_texts: LongTexts = "chunk",
    prepend_bos: bool | None = None,
) -> Corpus:
    """Tokenize `texts` with the model's tokenizer into a :class:`Corpus`.

    Args:
        model: a HookedTransformer-like model with a tokenizer and `to_tokens`.
        texts: the texts; one string counts as one text.
        name: what reports call this corpus.
        max_seq_len: longest sequence fed to the model (default and ceiling: the model's n_ctx).
        max_tokens: stop once this many tokens are collected (the last chunk is cut short).
        long_texts: what to do with a text longer than `max_seq_len`: split it into chunks,
            keep only its first chunk, or refuse it.
        prepend_bos: override the model's `default_prepend_bos`.
    """
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, (Mapping, Set)):  # list() would take a dict's keys, a set in any order
        raise SpikeSinkError(
            f"texts is a {type(texts).__name__}; pass a list of strings ("
            + ("list(d.values()) for the dict's values)" if isinstance(texts, Mapping)
               else "sorted(s): a set's order, and so every text index, changes between runs)")
        )  # fmt: skip
    if long_texts not in get_args(LongTexts):
        raise SpikeSinkError(f"long_texts must be one of {get_args(LongTexts)}, got {long_texts!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)):
        raise SpikeSinkError(f"max_tokens must be an integer or None, got {max_tokens!r}")
    texts = list(texts)
    if not texts:
        raise SpikeSinkError("no texts given; pass at least one non-empty string")
    if getattr(model, "tokenizer", None) is None:
        raise SpikeSinkError(
            "the model has no tokenizer; build it with one (HookedTransformer(cfg, tokenizer)) "
            "or pass token ids through a model that has one"
        )
    n_ctx = int(model.cfg.n_ctx)
    max_seq_len = n_ctx if max_seq_len is None else int(max_seq_len)
    if not 2 <= max_seq_len <= n_ctx:
        raise SpikeSinkError(
            f"max_seq_len must lie in 2..{n_ctx} (the model's n_ctx), got {max_seq_len}"
        )
    if prepend_bos is None:
        prepend_bos = bool(getattr(model.cfg, "default_prepend_bos", True))
    bos = [int(model.tokenizer.bos_token_id)] if prepend_bos else []
    if prepend_bos and model.tokenizer.bos_token_id is None:
        raise SpikeSinkError(
            "prepend_bos=True but the tokenizer has no BOS token; pass prepend_bos=False"
        )
    body = max_seq_len - len(bos)

    chunks: list[Chunk] = []
    budget = math.inf if max_tokens is None else max_tokens
    digest = hashlib.sha256()
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise SpikeSinkError(
                f"text {index} is a {type(text).__name__}, not a string; pass a list of strings"
            )
        if not text.strip():
            raise SpikeSinkError(
                f"text {index} is empty or whitespace only; drop it or give it some content"
            )
        digest.update(text.encode("utf-8") + b"\0")
        ids = model.to_tokens(text, prepend_bos=False, truncate=False)[0].tolist()
        if len(ids) > body and long_texts == "error":
            raise SpikeSinkError(
                f"text {index} has {len(ids) + len(bos)} tokens, "
                f"more than max_seq_len={max_seq_len}; "
                "pass long_texts='chunk' to split it or long_texts='truncate' to cut it"
            )
        starts = range(0, len(ids), body) if long_texts == "chunk" else range(0, 1)
        for start in starts:
            if budget <= len(bos):
                break
            piece = ids[start : start + min(body, budget - len(bos))]
            chunks.append(Chunk(index, start, tuple(bos + piece)))
            budget -= len(bos) + len(piece)
    if not chunks:
        raise SpikeSinkError(f"max_tokens={max_tokens} leaves no tokens to read; raise it")
    return Corpus(
        name=name,
        n_texts=len(texts),
        chunks=tuple(chunks),
        prepend_bos=prepend_bos,
        max_seq_len=max_seq_len,
        sha256=digest.hexdigest(),
    )


def default_texts(n: int | None = None) -> list[str]:
    """The default offline corpus: Python's own documentation topics (modern English prose).

    `pydoc_data.topics` ships with every CPython, was written by people outside this project,
    and is the same on every machine with the same Python version, so scans are reproducible.
    Each topic is split into paragraphs; `n` keeps the first `n` of them.
    """
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            para = " ".join(para.split())
            if len(para) >= 200:
                paragraphs.append(para)
    return paragraphs if n is None else paragraphs[:n]


def read_text_file(path: str) -> list[str]:
    """One text per non-empty line of `path`."""
    try:
        with open(path, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    except OSError as e:
        raise SpikeSinkError(
            f"cannot read text file {path!r}: {e.strerror}; check the path"
        ) from None
    except UnicodeDecodeError:
        raise SpikeSinkError(f"text file {path!r} is not UTF-8 text; convert it first") from None
    if not texts:
        raise SpikeSinkError(f"text file {path!r} holds no non-empty line; one text per line")
    return texts
