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


def build_corpus(n_queries: int = 200, n_passages: int = 2000, seed: int = 0) -> Corpus:
    """Passages of mixed length (a few words to over 128 tokens) and short queries drawn from them.

    >>> c = build_corpus(10, 50); len(c.queries), len(c.passages)
    (10, 50)
    """
    rng = random.Random(seed)
    pool = [p for p in paragraphs() if len(p.split()) >= 3]
    passages: dict[str, None] = {}
    attempts = 0
    while len(passages) < n_passages and attempts < n_passages * 50:
        attempts += 1
        words = " ".join(pool[(rng.randrange(len(pool)) + i) % len(pool)] for i in range(3)).split()
        # log-uniform lengths: as many short passages as long ones, some beyond the max length
        target = int(round(2 ** rng.uniform(0, 7.3)))
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
        n = rng.randint(3, min(12, len(source)))
        start = rng.randrange(len(source) - n + 1)
        queries.setdefault(" ".join(source[start:start + n]), None)
    return Corpus(queries=list(queries), passages=plist)
