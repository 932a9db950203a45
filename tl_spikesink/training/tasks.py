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
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Protocol

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


@dataclass(frozen=True)
class NaturalText:
    """Windows of the default offline corpus, tokenized with SmolLM2's tokenizer."""

    name: str = "natural_text"
    held_out: float = 0.1
    """Share of the token stream (its end) kept out of training, for the probe batch."""

    @functools.cached_property
    def _tok(self) -> Any:
        from transformers import AutoTokenizer

        from tl_spikesink.models import cache_dir, load

        path = cache_dir() / "smollm2-135m" / "tokenizer"
        if not path.exists():  # the first load converts the model and caches its tokenizer
            load("smollm2-135m", progress=False)
        return AutoTokenizer.from_pretrained(path, local_files_only=True)

    @functools.cached_property
    def _stream(self) -> Int[torch.Tensor, " n"]:
        from tl_spikesink.corpus import default_texts

        ids = self._tok(default_texts(), add_special_tokens=False)["input_ids"]
        return torch.tensor([i for text in ids for i in text])

    @property
    def d_vocab(self) -> int:
        """Vocabulary size."""
        return len(self._tok)

    def sample(
        self, n: int, length: int, generator: torch.Generator, *, split: str = "train"
    ) -> Int[torch.Tensor, "n pos"]:
        """`n` random windows of `length - 1` tokens, each after BOS."""
        stream = self._stream
        cut = int(len(stream) * (1 - self.held_out))
        part = stream[:cut] if split == "train" else stream[cut:]
        starts = torch.randint(0, len(part) - length, (n,), generator=generator)
        windows = torch.stack([part[s : s + length - 1] for s in starts.tolist()])
        bos = torch.full((n, 1), int(self._tok.bos_token_id))
        return torch.cat([bos, windows], 1)

    def tokenizer(self) -> Any:
        """SmolLM2's tokenizer."""
        return self._tok

    def to_dict(self) -> dict[str, Any]:
        """The task's settings."""
        return {"kind": "natural_text", **asdict(self)}


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
