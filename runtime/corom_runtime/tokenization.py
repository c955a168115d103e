"""Tokenization: the artifact's HF `tokenizers` tokenizer, with input checks and bounded work.

No padding here: batches are padded later, each to its own longest input (see `batching`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tokenizers import Encoding, Tokenizer

from corom_runtime.errors import InvalidInputError, InvalidInputTypeError, RequestTooLargeError, TextTooLongError

# Prompt and text are tokenized as one string, as sentence-transformers does, then cut by token. A long
# text is read in growing prefixes (and, for a left cut, suffixes): first this many characters per token
# wanted (real text takes 4-5), doubled until enough tokens are certain or the whole text is read. So a
# 1 MB input costs a bounded read, and a text that fits is never cut by a character count (a cap applied
# before tokenizing dropped '\n' * 4200 + text to nothing).
PREFIX_CHARS_PER_TOKEN = 8
# a cut may split a word or change how the words next to it pre-tokenize: this many words at a cut
# are not trusted (one for the split word, one for a pre-tokenizer that looks one character ahead)
UNSURE_WORDS = 2
# chunking's upper bound on windows per text: 1024 windows of 128-512 tokens cover a 0.5-2 MB text,
# past any request body the server takes; a caller's max_windows beyond it is refused
MAX_WINDOWS = 1024
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


@dataclass(frozen=True)
class _Start:
    """The start of prompt + text tokenized as one string: its first content tokens (no special
    tokens), their character spans in prompt + text, and how many of them are the prompt's."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    prompt_tokens: int
    total: int | None  # content tokens of the whole string; None: more than len(ids) - 1, not counted
    tail: list[int] | None = None  # its last len(ids) tokens, where it was read whole and is longer

    def over(self, budget: int) -> bool:
        return len(self.ids) > budget


def _prompt_tokens(offsets: Sequence[tuple[int, int]], prompt: str) -> int:
    """How many leading tokens are the prompt's: those that start inside it, its trailing blanks not
    counted (a Metaspace '▁hello' that took the prompt's last space is the text's first word)."""
    end, n = len(prompt.rstrip()), 0
    while n < len(offsets) and offsets[n][0] < end:
        n += 1
    return n


def _certain_head(e: Encoding, count: int) -> bool:
    """The first `count` tokens of a prefix's encoding are the whole string's: they lie before the
    words the cut may have changed."""
    n = len(e)
    if count < 1 or n < count:
        return count < 1
    last, word = e.token_to_word(n - 1), e.token_to_word(count - 1)
    return last is not None and word is not None and word <= last - UNSURE_WORDS


def _certain_tail(e: Encoding, count: int) -> bool:
    """The last `count` tokens of a suffix's encoding are the whole string's (see `_certain_head`)."""
    n = len(e)
    if count < 1 or n < count:
        return count < 1
    first, word = e.token_to_word(0), e.token_to_word(n - count)
    return first is not None and word is not None and word >= first + UNSURE_WORDS


def _further(text: str, reach: int, tokens: int, wanted: int) -> int:
    """The next read of `text` after its first `reach` characters gave `tokens` of the `wanted`: twice
    as far, or as far as their density says with a margin of four (the prompt's tokens are among them),
    and at least past the blank and non-blank runs the cut fell in and the next two (a pre-token never
    spans a blank/non-blank change twice). A run of blanks or one giant word thus gives one next read
    to its end, not a doubling series: the worst case costs about one read of the text."""
    return max(2 * reach, 4 * reach * wanted // max(tokens, 1), _past_runs(text, reach))


_RUNS = re.compile(r"\s+|\S+")


def _past_runs(text: str, at: int, runs: int = 3) -> int:
    """The index past the `runs` blank or non-blank runs from `at` on (the first may have begun before)."""
    for _ in range(runs):
        found = _RUNS.match(text, at)
        if found is None:
            return len(text)
        at = found.end()
    return at


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
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=max_length)
        self._tokenizer = tokenizer
        self._plain: Tokenizer | None = None  # a copy without truncation, made when first needed
        self._specials: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    @classmethod
    def from_file(cls, path: Path, max_length: int) -> "TextTokenizer":
        return cls(Tokenizer.from_file(str(path)), max_length)

    def encode(self, texts: Sequence[str], prompt: str = "", truncate: bool = True,
               direction: str = "right") -> list[TokenizedText]:
        """Tokenize checked strings (see `check_texts`), each as `prompt + text` in one string.

        An over-length text is cut at its end (`direction="right"`: exactly the tokenizer's own
        truncation of prompt + text, as sentence-transformers cuts) or its start ("left": the prompt's
        tokens, then the text's last tokens; the prompt is never cut). `truncate=False` raises
        `TextTooLongError` naming every over-length text and its token count instead.
        """
        if direction not in DIRECTIONS:
            raise InvalidInputError(f"truncation_direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
        if not isinstance(truncate, bool):
            raise InvalidInputTypeError(f"truncate must be true or false, got {type(truncate).__name__}")
        head, tail = self._special_ids()
        budget = self.max_length - len(head) - len(tail)  # content tokens: prompt and text
        starts = self._starts(texts, prompt, budget)
        over = [i for i, start in enumerate(starts) if start.over(budget)]
        if over and not truncate:
            counts = self._counts([texts[i] for i in over[:5]], prompt, 16 * self.max_length)
            listed = ", ".join(f"texts[{i}] has {n} tokens" for i, n in zip(over, counts))
            raise TextTooLongError(f"{len(over)} text(s) longer than this model's {self.max_length} tokens and "
                                   f"truncate is false: {listed}{' ...' if len(over) > 5 else ''}; shorten "
                                   "them, or allow truncation")
        ends: dict[int, list[int]] = {}
        if over and direction == "left":
            kept = {i: budget - starts[i].prompt_tokens for i in over}
            short = [i for i in over if kept[i] < 1]
            if short:
                raise InvalidInputError(f"the prompt alone takes {starts[short[0]].prompt_tokens} of this model's "
                                        f"{self.max_length} tokens: nothing of the text would be left")
            ends = {i: starts[i].tail[-kept[i]:] for i in over if starts[i].tail is not None}  # type: ignore[index]
            unread = [i for i in over if i not in ends]  # only the start was read: read the end now
            ends.update(zip(unread, self._ends([texts[i] for i in unread], prompt, [kept[i] for i in unread])))
        out = []
        for i, start in enumerate(starts):
            if i in ends:
                ids = start.ids[:start.prompt_tokens] + ends[i]
            else:
                ids = start.ids[:budget]
            out.append(TokenizedText(ids=head + ids + tail, truncated=start.over(budget)))
        return out

    def split_windows(self, texts: Sequence[str], prompt: str = "", overlap: int = 32, max_windows: int = 32,
                      truncate: bool = True, max_total: int | None = None,
                      ) -> list[tuple[list[TokenizedText], list[tuple[int, int]], bool]]:
        """Each text as windows of the model's length sharing `overlap` tokens with their neighbours:
        per text its windows (special tokens and the prompt's tokens in each), their character spans in
        the text, and whether it was cut (it needs more than `max_windows` windows). A text that fits is
        one window, the tokens `encode` gives it.

        How many windows each text needs is counted before any is built, from tokens read no further
        than the windows need: `truncate=False` raises `TextTooLongError` for a text that needs more
        than `max_windows`, and `max_total` (a request's window budget) raises `RequestTooLargeError`
        when the texts need more windows than that in all.
        """
        head, tail = self._special_ids()
        budget = self.max_length - len(head) - len(tail)
        limit = min(max_windows, max_total) if max_total is not None else max_windows
        # content tokens that cover `limit` windows whatever the prompt takes (its tokens shorten the
        # stride), plus one: reading one token more tells a text that needs more
        keep = budget + (limit - 1) * max(budget - overlap, 1)
        starts = self._starts(texts, prompt, keep)
        needs: list[int | None] = []  # windows each text needs; None: more than `limit`
        for start in starts:
            size = budget - start.prompt_tokens
            if not 0 <= overlap < size:
                raise InvalidInputError(f"chunking overlap must be from 0 to {size - 1} tokens (a window holds "
                                        f"{size} tokens of text after the prompt), got {overlap}")
            needs.append(None if start.over(keep) else windows_needed(len(start.ids) - start.prompt_tokens,
                                                                      size, overlap))
        if not truncate:
            self._refuse_past_max_windows(texts, prompt, starts, needs, budget, overlap, max_windows)
        # a text past `limit` windows counts as limit + 1: all a budget check needs to know
        total = sum(min(n if n is not None else limit + 1, max_windows) for n in needs)
        if max_total is not None and total > max_total:
            raise RequestTooLargeError(f"{len(texts)} text(s) need at least {total} windows, more than the "
                                       f"{max_total} a request may hold: split the request, or lower chunking "
                                       "max_windows")
        out = []
        for start, need in zip(starts, needs):
            count = min(need if need is not None else limit + 1, max_windows)
            size = budget - start.prompt_tokens
            stride, text_ids, text_offsets = size - overlap, start.ids[start.prompt_tokens:], start.offsets[start.prompt_tokens:]
            prompt_ids, shift = start.ids[:start.prompt_tokens], len(prompt)
            windows, spans = [], []
            for first in range(0, count * stride, stride):
                piece = text_ids[first:first + size]
                windows.append(TokenizedText(ids=head + prompt_ids + piece + tail, truncated=False))
                spans.append((max(text_offsets[first][0] - shift, 0), max(text_offsets[first + len(piece) - 1][1] - shift, 0))
                             if piece else (0, 0))
            out.append((windows, spans, need is None or need > max_windows))
        return out

    def _refuse_past_max_windows(self, texts: Sequence[str], prompt: str, starts: list[_Start],
                                 needs: list[int | None], budget: int, overlap: int, max_windows: int) -> None:
        over = [i for i, n in enumerate(needs) if n is None or n > max_windows]
        if not over:
            return
        extra = sum(map(len, self._special_ids()))
        cap = 16 * budget * max_windows  # counting stops there: the message says "more than"
        listed = []
        for i, n in zip(over, self._counts([texts[i] for i in over[:5]], prompt, cap)):
            more = "more than " if n > cap else ""
            n = min(n, cap)
            need = windows_needed(n - extra - starts[i].prompt_tokens, budget - starts[i].prompt_tokens, overlap)
            listed.append(f"texts[{i}] has {more}{n} tokens and would need {more}{need} windows")
        raise TextTooLongError(f"{len(over)} text(s) need more windows than chunking max_windows {max_windows} "
                               f"and truncate is false: {', '.join(listed)}{' ...' if len(over) > 5 else ''}; "
                               f"raise max_windows (at most {MAX_WINDOWS}), shorten them, or allow truncation")

    def token_counts(self, texts: Sequence[str], prompt: str = "", limit: int | None = None) -> list[int]:
        """Tokens each text would take untruncated, special tokens and prompt included. With `limit`,
        reading stops past it: a text longer than `limit` tokens counts as `limit + 1`."""
        return self._counts(texts, prompt, limit)

    def _counts(self, texts: Sequence[str], prompt: str, limit: int | None) -> list[int]:
        head, tail = self._special_ids()
        extra = len(head) + len(tail)
        if limit is None:
            plain = self._untruncated()
            return [extra + len(e) for e in plain.encode_batch([_clean(prompt + t) for t in texts],
                                                               add_special_tokens=False)]
        content = max(limit - extra, 0)
        return [extra + (s.total if s.total is not None else content + 1) for s in self._starts(texts, prompt, content)]

    def _starts(self, texts: Sequence[str], prompt: str, keep: int) -> list[_Start]:
        """prompt + text tokenized as one string, the first `keep` + 1 content tokens of each (one more
        than `keep` tells a text that has more), read in growing prefixes (`PREFIX_CHARS_PER_TOKEN`)."""
        plain = self._untruncated()
        strings = [_clean(prompt + t) for t in texts]
        out: list[_Start | None] = [None] * len(strings)
        reach = [len(prompt) + PREFIX_CHARS_PER_TOKEN * (keep + 1)] * len(strings)
        todo = list(range(len(strings)))
        while todo:
            pieces = [strings[i][:reach[i]] for i in todo]
            later = []
            for i, piece, e in zip(todo, pieces, plain.encode_batch(pieces, add_special_tokens=False)):
                whole = len(piece) == len(strings[i])
                if not whole and not _certain_head(e, keep + 1):
                    reach[i] = _further(strings[i], reach[i], len(e), keep + 1)
                    later.append(i)
                    continue
                total, tail = (len(e) if whole else None), None
                if len(e) > keep + 1:
                    e.truncate(keep + 1)  # in Rust: no Python list of a megabyte's tokens
                    if whole:  # the rest is in pieces of keep + 1: the last two hold the last keep + 1
                        rest = e.overflowing
                        tail = ((rest[-2].ids if len(rest) > 1 else e.ids) + rest[-1].ids)[-(keep + 1):]
                offsets = e.offsets
                out[i] = _Start(e.ids, offsets, _prompt_tokens(offsets, prompt),
                                total if total is not None and total <= keep else None, tail)
            todo = later
        return out  # type: ignore[return-value]

    def _ends(self, texts: Sequence[str], prompt: str, counts: Sequence[int]) -> list[list[int]]:
        """The last `counts[i]` tokens of prompt + text (each longer than that, past its prompt's
        tokens), read in growing suffixes of the text."""
        plain = self._untruncated()
        out: list[list[int] | None] = [None] * len(texts)
        reach = [PREFIX_CHARS_PER_TOKEN * (n + 1) for n in counts]
        backwards: dict[int, str] = {}  # texts reversed, made when a suffix needs reading further
        todo = list(range(len(texts)))
        while todo:
            # a suffix that reaches the text's start is read with the prompt: the whole string, all certain
            pieces = [_clean(texts[i][-reach[i]:] if reach[i] < len(texts[i]) else prompt + texts[i]) for i in todo]
            later = []
            for i, piece, e in zip(todo, pieces, plain.encode_batch(pieces, add_special_tokens=False)):
                if reach[i] < len(texts[i]) and not _certain_tail(e, counts[i]):
                    if i not in backwards:
                        backwards[i] = texts[i][::-1]
                    reach[i] = _further(backwards[i], reach[i], len(e), counts[i])
                    later.append(i)
                    continue
                if len(e) > counts[i]:
                    e.truncate(counts[i], direction="left")
                out[i] = e.ids
            todo = later
        return out  # type: ignore[return-value]

    def _untruncated(self) -> Tokenizer:
        if self._plain is None:  # a race builds two equal copies: harmless
            plain = Tokenizer.from_str(self._tokenizer.to_str())
            plain.no_truncation()
            self._plain = plain
        return self._plain

    def _special_ids(self) -> tuple[list[int], list[int]]:
        """The special tokens the model puts before and after one text ([CLS] / [SEP], <s> / </s>);
        read once (a tokenizer call on every request's path), copies handed out."""
        if self._specials is None:
            e = self._tokenizer.encode("a")
            first = e.special_tokens_mask.index(0)
            last = len(e.ids) - e.special_tokens_mask[::-1].index(0)
            self._specials = (tuple(e.ids[:first]), tuple(e.ids[last:]))
        head, tail = self._specials
        return list(head), list(tail)


def windows_needed(tokens: int, size: int, overlap: int) -> int:
    """Windows of `size` tokens, neighbours sharing `overlap`, that cover `tokens` tokens of text.

    >>> [windows_needed(n, size=10, overlap=3) for n in (0, 10, 11, 17, 18)]
    [1, 1, 2, 2, 3]
    """
    return 1 if tokens <= size else -(-(tokens - overlap) // (size - overlap))
