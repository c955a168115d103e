"""Tokenization: the artifact's HF `tokenizers` tokenizer, with input checks and bounded work.

No padding here: batches are padded later, each to its own longest input (see `batching`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tokenizers import Encoding, Tokenizer

from corom_runtime.errors import InvalidInputError, InvalidInputTypeError, TextTooLongError

# A text is read up to this many characters per token of max length: far beyond real text (about 4-5
# characters per token), it bounds the work and memory a 1 MB input can cost.
CHARS_PER_TOKEN_CAP = 32
_SURROGATES = re.compile("[\ud800-\udfff]")
# which end of an over-length text is cut (TEI's `truncation_direction`): "right" keeps its start
DIRECTIONS = ("right", "left")


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
        self._plain: Tokenizer | None = None  # a copy without truncation, made when first needed

    @classmethod
    def from_file(cls, path: Path, max_length: int) -> "TextTokenizer":
        return cls(Tokenizer.from_file(str(path)), max_length)

    def encode(self, texts: Sequence[str], prompt: str = "", truncate: bool = True,
               direction: str = "right") -> list[TokenizedText]:
        """Tokenize checked strings (see `check_texts`) in one parallel call, each after `prompt`.

        An over-length text is cut at its end (`direction="right"`) or its start ("left"); the prompt
        is never cut. `truncate=False` raises `TextTooLongError` naming every over-length text and its
        token count instead.
        """
        if direction not in DIRECTIONS:
            raise InvalidInputError(f"truncation_direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
        if not isinstance(truncate, bool):
            raise InvalidInputTypeError(f"truncate must be true or false, got {type(truncate).__name__}")
        items = self._encode_right(texts, prompt) if direction == "right" else self._encode_left(texts, prompt)
        if not truncate:
            over = [i for i, item in enumerate(items) if item.truncated]
            if over:
                counts = self.token_counts([texts[i] for i in over[:5]], prompt)
                listed = ", ".join(f"texts[{i}] has {n} tokens" for i, n in zip(over, counts))
                raise TextTooLongError(f"{len(over)} text(s) longer than this model's {self.max_length} tokens and "
                                       f"truncate is false: {listed}{' ...' if len(over) > 5 else ''}; shorten "
                                       "them, or allow truncation")
        return items

    def _encode_right(self, texts: Sequence[str], prompt: str) -> list[TokenizedText]:
        # the prompt comes first, so cutting on the right never reaches it (unless it alone fills the window)
        cut = [len(t) > self.char_cap for t in texts]
        prepared = [_clean(prompt + (t[: self.char_cap] if c else t)) for t, c in zip(texts, cut)]
        encodings: list[Encoding] = self._tokenizer.encode_batch(prepared)
        return [
            TokenizedText(ids=e.ids, truncated=c or bool(e.overflowing)) for e, c in zip(encodings, cut)
        ]

    def _encode_left(self, texts: Sequence[str], prompt: str) -> list[TokenizedText]:
        # built by hand: special tokens, the prompt whole, then as much of the text's end as fits
        plain, head, tail, prompt_ids = self._framing(prompt)
        budget = self.max_length - len(head) - len(tail) - len(prompt_ids)
        if budget < 1:
            raise InvalidInputError(f"the prompt alone takes {len(prompt_ids)} of this model's {self.max_length} tokens")
        cut = [len(t) > self.char_cap for t in texts]
        prepared = [_clean(t[-self.char_cap:] if c else t) for t, c in zip(texts, cut)]
        out = []
        for e, c in zip(plain.encode_batch(prepared, add_special_tokens=False), cut):
            over = len(e.ids) > budget
            out.append(TokenizedText(ids=head + prompt_ids + (e.ids[len(e.ids) - budget:] if over else e.ids) + tail,
                                     truncated=c or over))
        return out

    def split_windows(self, texts: Sequence[str], prompt: str = "", overlap: int = 32,
                      max_windows: int = 32) -> list[tuple[list[TokenizedText], list[tuple[int, int]], bool]]:
        """Each text as windows of the model's length sharing `overlap` tokens with their neighbours:
        per text its windows (special tokens and the prompt in each), their character spans in the text,
        and whether it was cut (more than `max_windows` windows). A text that fits is one window."""
        plain, head, tail, prompt_ids = self._framing(prompt)
        size = self.max_length - len(head) - len(tail) - len(prompt_ids)
        if not 0 <= overlap < size:
            raise InvalidInputError(f"chunking overlap must be from 0 to {size - 1} tokens (a window holds {size}), "
                                    f"got {overlap}")
        stride, cap = size - overlap, self.char_cap * max_windows
        out = []
        for e, text in zip(plain.encode_batch([_clean(t[:cap]) for t in texts], add_special_tokens=False), texts):
            ids, offsets = e.ids, e.offsets
            starts = list(range(0, max(len(ids) - overlap, 1), stride))
            cut = len(starts) > max_windows or len(text) > cap
            windows, spans = [], []
            for start in starts[:max_windows]:
                piece = ids[start:start + size]
                windows.append(TokenizedText(ids=head + prompt_ids + piece + tail, truncated=False))
                spans.append((offsets[start][0], offsets[start + len(piece) - 1][1]) if piece else (0, 0))
            out.append((windows, spans, cut))
        return out

    def token_counts(self, texts: Sequence[str], prompt: str = "") -> list[int]:
        """Tokens each text would take untruncated, special tokens and prompt included (texts past the
        character cap are counted up to it)."""
        plain, head, tail, prompt_ids = self._framing(prompt)
        extra = len(head) + len(tail) + len(prompt_ids)
        return [extra + len(e.ids) for e in plain.encode_batch([_clean(t[: self.char_cap]) for t in texts],
                                                               add_special_tokens=False)]

    def _untruncated(self) -> Tokenizer:
        if self._plain is None:  # a race builds two equal copies: harmless
            plain = Tokenizer.from_str(self._tokenizer.to_str())
            plain.no_truncation()
            self._plain = plain
        return self._plain

    def _framing(self, prompt: str) -> tuple[Tokenizer, list[int], list[int], list[int]]:
        """What every hand-assembled input shares: the untruncated tokenizer, the special tokens before
        and after a text, and the prompt's tokens."""
        plain = self._untruncated()
        head, tail = self._special_ids()
        return plain, head, tail, plain.encode(_clean(prompt), add_special_tokens=False).ids if prompt else []

    def _special_ids(self) -> tuple[list[int], list[int]]:
        """The special tokens the model puts before and after one text ([CLS] / [SEP], <s> / </s>)."""
        e = self._tokenizer.encode("a")
        first = e.special_tokens_mask.index(0)
        last = len(e.ids) - e.special_tokens_mask[::-1].index(0)
        return e.ids[:first], e.ids[last:]
