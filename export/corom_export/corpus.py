"""Real English text available offline: the Python standard library's docstrings.

Parity and benchmarks need real text of mixed lengths (random tokens would hide the activation
outliers that make int8 hard). Docstrings are real technical prose, ship with every Python, and are
fixed for a given Python version; a seeded generator turns them into queries and passages.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import warnings
import zlib
from dataclasses import dataclass
from functools import lru_cache

_MODULES = (
    "abc argparse array ast asyncio base64 bisect bz2 calendar cmath codecs collections colorsys "
    "concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib dis "
    "doctest email.message enum filecmp fnmatch fractions ftplib functools gc getopt gettext glob gzip "
    "hashlib heapq hmac html html.parser http.client http.cookies http.server imaplib importlib inspect "
    "io ipaddress itertools json keyword linecache locale logging lzma mailbox math mimetypes "
    "multiprocessing netrc numbers operator optparse os pathlib pickle pkgutil platform plistlib poplib "
    "pprint profile pstats queue quopri random re sched secrets selectors shelve shlex shutil smtplib "
    "socket sqlite3 ssl stat statistics string struct subprocess sysconfig tarfile tempfile textwrap "
    "threading time timeit tokenize trace traceback tracemalloc types typing unicodedata unittest "
    "urllib.parse urllib.request uuid warnings wave weakref xml.dom.minidom xml.etree.ElementTree "
    "xmlrpc.client zipfile zipimport zlib"
).split()

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


@dataclass(frozen=True)
class Corpus:
    queries: list[str]
    passages: list[str]


def _docstrings() -> list[str]:
    docs: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _MODULES:
            try:
                module = importlib.import_module(name)
            except Exception:  # a module this Python lacks (e.g. no _ssl) just contributes nothing
                continue
            docs.append(module.__doc__ or "")
            for attr in sorted(vars(module)):
                obj = getattr(module, attr, None)
                if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
                    doc = getattr(obj, "__doc__", None)
                    if isinstance(doc, str):
                        docs.append(doc)
    return docs


def _is_prose(paragraph: str) -> bool:
    if ">>>" in paragraph or "::" in paragraph or len(paragraph.split()) < 4:
        return False
    letters = sum(c.isalpha() or c == " " for c in paragraph)
    return letters / len(paragraph) > 0.85


@lru_cache(maxsize=1)
def paragraphs() -> tuple[str, ...]:
    """Prose paragraphs from the standard library's docstrings, whitespace collapsed, deduplicated."""
    seen: dict[str, None] = {}
    for doc in _docstrings():
        for block in re.split(r"\n\s*\n", doc):
            text = " ".join(block.split())
            if _is_prose(text):
                seen.setdefault(text, None)
    return tuple(seen)


def sentences() -> list[str]:
    out: dict[str, None] = {}
    for paragraph in paragraphs():
        for sentence in _SENTENCE_END.split(paragraph):
            if len(sentence.split()) >= 3:
                out.setdefault(sentence, None)
    return list(out)


SPLITS = ("eval", "calibration")
WORKLOADS = ("mixed", "long")


def in_split(paragraph: str, split: str) -> bool:
    """About one paragraph in eight is calibration text; the rest is evaluation text: quantizers are
    calibrated on text that the parity gates and benchmarks never evaluate."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    calibration = zlib.crc32(paragraph.encode("utf-8")) % 8 == 0
    return calibration == (split == "calibration")


def _target_words(rng: random.Random, workload: str) -> int:
    if workload == "mixed":
        # log-uniform lengths: as many short passages as long ones, some beyond the max length
        return int(round(2 ** rng.uniform(0, 7.3)))
    # MS MARCO-like passages: 24-128 tokens, mean ~94 (about 1.3 tokens a word, the longest cut at 128)
    return rng.randint(30, 175)


def build_corpus(n_queries: int = 200, n_passages: int = 2000, seed: int = 0, split: str = "eval",
                 workload: str = "mixed") -> Corpus:
    """Passages and short queries drawn from them, from one split of the docstring paragraphs.

    workload "mixed": a few words to over 128 tokens (log-uniform); "long": MS MARCO-like passages
    of 24-128 tokens, mean ~94.

    >>> c = build_corpus(10, 50); len(c.queries), len(c.passages)
    (10, 50)
    """
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    rng = random.Random(seed)
    pool = [p for p in paragraphs() if len(p.split()) >= 3 and in_split(p, split)]
    passages: dict[str, None] = {}
    attempts = 0
    while len(passages) < n_passages and attempts < n_passages * 50:
        attempts += 1
        words = " ".join(pool[(rng.randrange(len(pool)) + i) % len(pool)] for i in range(4)).split()
        target = _target_words(rng, workload)
        start = rng.randrange(max(1, len(words) - target))
        passages.setdefault(" ".join(words[start:start + target]), None)
    plist = list(passages)
    if len(plist) < n_passages:
        raise RuntimeError(f"only {len(plist)} distinct passages could be built from the docstrings")
    queries: dict[str, None] = {}
    while len(queries) < n_queries:
        source = plist[rng.randrange(len(plist))].split()
        if len(source) < 4:
            continue
        n = rng.randint(3, min(12, len(source))) if workload == "mixed" else rng.randint(5, min(10, len(source)))
        start = rng.randrange(len(source) - n + 1)
        queries.setdefault(" ".join(source[start:start + n]), None)
    return Corpus(queries=list(queries), passages=plist)


def snippets(n: int, seed: int = 5, split: str = "calibration", max_words: int = 4) -> list[str]:
    """`n` snippets of 1 to `max_words` words: the one-word queries and titles that int8 calibration
    must also see (without them a 3-token input fell to cos 0.975 in the OpenVINO int8 graph)."""
    rng = random.Random(seed)
    pool = [p for p in paragraphs() if in_split(p, split)]
    out = []
    while len(out) < n:
        words = pool[rng.randrange(len(pool))].split()
        k = rng.randint(1, max_words)
        start = rng.randrange(max(1, len(words) - k))
        out.append(" ".join(words[start:start + k]))
    return out
