"""Token records shared by spike and sink results: where a token sits and what kind it is."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass


def is_delimiter(token: str) -> bool:
    r"""True for tokens made only of punctuation and whitespace (".", ",", "\n", ...).

    >>> is_delimiter(" ."), is_delimiter("\n"), is_delimiter(" the")
    (True, True, False)
    """
    return all(c.isspace() or unicodedata.category(c).startswith("P") for c in token)


@dataclass(frozen=True, order=True)
class TokenRef:
    """A token of the corpus: which text, which chunk of it, which position in that chunk."""

    text_index: int
    start: int
    """Token offset of the chunk within its text (0 unless the text was chunked)."""
    position: int
    """Position within the sequence the model read; 0 is the first token (BOS if prepended)."""

    @property
    def is_first(self) -> bool:
        """Whether this is the first token the model saw in its sequence."""
        return self.position == 0
