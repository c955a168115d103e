"""Tokenization: the artifact's HF `tokenizers` tokenizer, with input checks and bounded work.

No padding here: batches are padded later, each to its own longest input (see `batching`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tokenizers import Encoding, Tokenizer

from corom_runtime.errors import InvalidInputTypeError

# A text is read up to this many characters per token of max length: far beyond real text (about 4-5
# characters per token), it bounds the work and memory a 1 MB input can cost.
CHARS_PER_TOKEN_CAP = 32
_SURROGATES = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class TokenizedText:
    """One tokenized input: its ids, and whether anything of it was cut off."""

    ids: list[int]
    truncated: bool

    @property
    def length(self) -> int:
        return len(self.ids)


def check_texts(texts: Sequence[object], start: int = 0) -> list[str]:
    """Return `texts` as a list of str, or raise `TypeError` naming the first non-string item
    (its index counted from `start`, for a window of a longer stream)."""
    if isinstance(texts, (str, bytes)):
        raise InvalidInputTypeError("texts must be a list of strings, not a single string: wrap it as [text]")
    if texts is None or isinstance(texts, (dict, set, frozenset)) or not hasattr(texts, "__iter__"):
        # a dict would silently embed its keys, a set in no defined order
        raise InvalidInputTypeError(f"texts must be a string or a list of strings, got {type(texts).__name__}")
    out = list(texts)
    for index, text in enumerate(out):
        if not isinstance(text, str):
            raise InvalidInputTypeError(f"texts[{start + index}] is {type(text).__name__}, not str: every item must be a string")
    return out


def _clean(text: str) -> str:
    # Lone surrogates cannot be encoded as UTF-8 (the Rust tokenizer would fail on them):
    # they become U+FFFD, the replacement character, which is what a UTF-8 decoder would produce.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = _SURROGATES.sub("\ufffd", text)
    return text


class TextTokenizer:
    """Wraps a `tokenizers.Tokenizer`: truncation at `max_length`, no padding.

    >>> from tokenizers import Tokenizer
    >>> from tokenizers.models import WordLevel
    >>> from tokenizers.pre_tokenizers import Whitespace
    >>> t = Tokenizer(WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]")); t.pre_tokenizer = Whitespace()
    >>> TextTokenizer(t, max_length=8).encode(["hi there"])[0].ids
    [1, 0]
    """

    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        self.max_length = max_length
        self.char_cap = max_length * CHARS_PER_TOKEN_CAP
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=max_length)
        self._tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: Path, max_length: int) -> "TextTokenizer":
        return cls(Tokenizer.from_file(str(path)), max_length)

    def encode(self, texts: Sequence[str]) -> list[TokenizedText]:
        """Tokenize checked strings (see `check_texts`) in one parallel call."""
        cut = [len(t) > self.char_cap for t in texts]
        prepared = [_clean(t[: self.char_cap] if c else t) for t, c in zip(texts, cut)]
        encodings: list[Encoding] = self._tokenizer.encode_batch(prepared)
        return [
            TokenizedText(ids=e.ids, truncated=c or bool(e.overflowing)) for e, c in zip(encodings, cut)
        ]
