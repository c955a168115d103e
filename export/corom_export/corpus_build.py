"""Writes the fixed corpora in `corom_export/corpora/` (run once; the files are committed).

    python -m corom_export.corpus_build            # rewrite the corpus files, print their sha256

Every figure the exporter and the benchmarks report rests on these files, so they are data in the
repository, never rebuilt at run time: text harvested from a live interpreter moved with import order
(3,957 vs 3,956 vs 3,955 docstring paragraphs after importing torch or ray) and with it the figures.
After rewriting them, paste the printed hashes into `corpus.CORPUS_SHA256` (a test checks the files
against them) and re-run `make demo`.

Sources, all text the repository may hold: the Python standard library's docstrings and source code
(PSF licence), sentences written for this project (`corpora/source-*.txt`: 15+ languages and English
passages and questions of everyday domains), and seeded generators of number-, and punctuation-heavy
lines. Every source text is assigned to the calibration or the evaluation split by a hash of its own
content, before any passage is cut from it, so calibration and evaluation never share text.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import random
import re
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

HERE = Path(__file__).parent / "corpora"

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
# pure-Python modules whose source is read for code snippets
_CODE_MODULES = ("argparse bisect calendar csv dataclasses difflib fractions functools heapq json.decoder "
                 "pathlib pprint shlex statistics string textwrap tokenize").split()

# one source text in CALIBRATION_ONE_IN goes to calibration, by a hash of its content
CALIBRATION_ONE_IN = 4


def is_calibration(text: str) -> bool:
    return zlib.crc32(text.encode("utf-8")) % CALIBRATION_ONE_IN == 0


# -- sources --------------------------------------------------------------------------------

def docstring_paragraphs() -> list[str]:
    """Prose paragraphs of the standard library's docstrings (run in an isolated interpreter: `main`)."""
    docs: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _MODULES:
            try:
                module = importlib.import_module(name)
            except Exception:
                continue
            docs.append(module.__doc__ or "")
            for attr in sorted(vars(module)):
                obj = getattr(module, attr, None)
                if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
                    if isinstance(getattr(obj, "__doc__", None), str):
                        docs.append(obj.__doc__)
    seen: dict[str, None] = {}
    for doc in docs:
        for block in re.split(r"\n\s*\n", doc):
            text = " ".join(block.split())
            letters = sum(c.isalpha() or c == " " for c in text) / max(1, len(text))
            if ">>>" not in text and "::" not in text and len(text.split()) >= 4 and letters > 0.85:
                seen.setdefault(text, None)
    return sorted(seen)


def code_blocks(rng: random.Random) -> list[str]:
    """Windows of 1-14 non-blank lines of standard-library source code."""
    out: list[str] = []
    for name in _CODE_MODULES:
        lines = [ln.rstrip() for ln in inspect.getsource(importlib.import_module(name)).splitlines() if ln.strip()]
        for _ in range(40):
            k = rng.randint(1, 14)
            start = rng.randrange(max(1, len(lines) - k))
            out.append("\n".join(lines[start:start + k]))
    return sorted(set(out))


def tagged_lines(file: str) -> list[tuple[str, str]]:
    rows = []
    for line in (HERE / file).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            tag, text = line.split("\t", 1)
            rows.append((tag, text.strip()))
    return rows


_UNITS = ["kg", "km", "mm", "ml", "GB", "MiB", "ms", "°C", "%", "mg/dL", "kWh", "rpm"]
_WORDS = ("order invoice flight room patient sample build release meter account batch parcel "
          "temperature balance ticket version sensor route").split()


def number_lines(rng: random.Random, n: int) -> list[str]:
    """Lines dense with numbers: dates, prices, versions, measurements, ids, phone numbers, tables."""
    def word() -> str:
        return rng.choice(_WORDS)

    forms = [
        lambda: f"{word().title()} #{rng.randint(1000, 999999)} shipped on {rng.randint(2000, 2030)}-"
                f"{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} for ${rng.randint(1, 9999):,}.{rng.randint(0, 99):02d}",
        lambda: f"v{rng.randint(0, 9)}.{rng.randint(0, 40)}.{rng.randint(0, 200)} -> v{rng.randint(0, 9)}."
                f"{rng.randint(0, 40)}.{rng.randint(0, 200)}",
        lambda: f"{rng.uniform(-50, 500):.{rng.randint(0, 3)}f} {rng.choice(_UNITS)}",
        lambda: f"{word()} {rng.randint(1, 99)}: {rng.uniform(0, 1000):.2f} {rng.choice(_UNITS)}, "
                f"{word()} {rng.randint(1, 99)}: {rng.uniform(0, 1000):.2f} {rng.choice(_UNITS)}",
        lambda: f"+{rng.randint(1, 99)} {rng.randint(100, 999)} {rng.randint(1000000, 9999999)}",
        lambda: ", ".join(str(rng.randint(0, 10 ** rng.randint(1, 7))) for _ in range(rng.randint(3, 25))),
        lambda: " | ".join(f"{rng.uniform(0, 100):.1f}" for _ in range(rng.randint(4, 12))),
        lambda: f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d} {rng.choice(['am', 'pm'])} - "
                f"{rng.randint(1, 12)}:{rng.randint(0, 59):02d} {rng.choice(['am', 'pm'])}",
        lambda: f"In {rng.randint(1800, 2030)} the {word()} count rose {rng.randint(1, 400)}% to "
                f"{rng.randint(1, 9999):,} from {rng.randint(1, 9999):,} a year earlier.",
        lambda: f"{rng.randint(1, 9)}e-{rng.randint(1, 12)} {rng.choice(['+/-', '±'])} {rng.randint(1, 9)}e-"
                f"{rng.randint(1, 12)}",
        lambda: str(rng.randint(0, 10 ** rng.randint(1, 18))),
    ]
    return [rng.choice(forms)() for _ in range(n)]


def punctuation_lines(rng: random.Random, n: int, words: list[str]) -> list[str]:
    """Lines dense with punctuation and symbols: URLs, paths, e-mail, markup, CSV/JSON, emphasis."""
    def w() -> str:
        return rng.choice(words).strip(".,;:()\"'").lower() or "x"

    forms = [
        lambda: f"https://{w()}.example.org/{w()}/{w()}?id={rng.randint(1, 9999)}&lang=en#{w()}",
        lambda: f"/usr/local/{w()}/{w()}_{rng.randint(1, 99)}.{rng.choice(['py', 'json', 'log', 'tar.gz'])}",
        lambda: f"C:\\Users\\{w()}\\Documents\\{w()} ({rng.randint(1, 9)}).docx",
        lambda: f"{w()}.{w()}@{w()}.example.com",
        lambda: f"**{w().title()}**: _{w()}_ -- `{w()}()` [{w()}]({w()}.md)",
        lambda: f'{{"{w()}": {rng.randint(0, 99)}, "{w()}": ["{w()}", "{w()}"], "ok": {rng.choice(["true", "null"])}}}',
        lambda: ",".join(f'"{w()}"' if rng.random() < 0.3 else w() for _ in range(rng.randint(3, 9))),
        lambda: f"{w().title()}?! ... {w()} -- {w()}; ({w()}) [{w()}] {{{w()}}} <{w()}>",
        lambda: f"#{w()} #{w()} @{w()} :-) !!! ??? ...",
        lambda: f"<div class=\"{w()}\"><a href=\"/{w()}\">{w().title()}</a></div>",
        lambda: f"{w()} := {w()} <> {w()} && !{w()} || {w()} >= {rng.randint(0, 9)}",
        lambda: "".join(rng.choice("!?.,;:-_=+*/\\|()[]{}<>\"'`~^%$#@&") for _ in range(rng.randint(1, 30))),
    ]
    return [rng.choice(forms)() for _ in range(n)]


# -- passages -------------------------------------------------------------------------------

def passage(rng: random.Random, pool: list[str], words: int) -> str:
    """`words` consecutive words from a window of four source paragraphs."""
    text = " ".join(pool[(rng.randrange(len(pool)) + i) % len(pool)] for i in range(4)).split()
    start = rng.randrange(max(1, len(text) - words))
    return " ".join(text[start:start + words])


def mixed_words(rng: random.Random) -> int:
    return int(round(2 ** rng.uniform(0, 7.3)))  # log-uniform: a word to past 128 tokens


def long_words(rng: random.Random) -> int:
    return rng.randint(30, 175)  # MS MARCO-like: 24-128 tokens, mean ~94


def distinct(make, n: int) -> list[str]:
    out: dict[str, None] = {}
    for _ in range(n * 50):
        if len(out) >= n:
            break
        text = make()
        if text.strip():
            out.setdefault(text, None)
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} distinct texts could be built, {n} wanted")
    return list(out)


def span_queries(rng: random.Random, passages: list[str], n: int, low: int = 3, high: int = 12) -> list[str]:
    def make() -> str:
        words = rng.choice(passages).split()
        k = rng.randint(min(low, len(words)), min(high, len(words)))
        start = rng.randrange(len(words) - k + 1)
        return " ".join(words[start:start + k])
    return distinct(make, n)


def build_all() -> dict[str, dict]:
    rng = random.Random(20261203)
    paragraphs = docstring_paragraphs()
    prose = {s: [p for p in paragraphs if is_calibration(p) == (s == "calibration")] for s in ("eval", "calibration")}
    code = code_blocks(rng)
    code_split = {s: [c for c in code if is_calibration(c) == (s == "calibration")] for s in prose}
    hand = tagged_lines("source-multilingual.txt") + tagged_lines("source-domains.txt")
    hand_split = {s: [t for _, t in hand if is_calibration(t) == (s == "calibration")] for s in prose}
    numbers = number_lines(rng, 600)
    num_split = {s: [t for t in numbers if is_calibration(t) == (s == "calibration")] for s in prose}
    words = " ".join(paragraphs).split()
    punct = punctuation_lines(rng, 600, words)
    punct_split = {s: [t for t in punct if is_calibration(t) == (s == "calibration")] for s in prose}

    def kinds_for(split: str, n_prose: int, n_over: int, n_code: int, n_num: int, n_punct: int,
                  n_short: int) -> list[tuple[str, str]]:
        pool = prose[split]
        rows = [("prose", t) for t in distinct(lambda: passage(rng, pool, mixed_words(rng)), n_prose)]
        rows += [("over-length", t) for t in distinct(lambda: passage(rng, pool, rng.randint(130, 320)), n_over)]
        rows += [("code", t) for t in code_split[split][:n_code]]
        rows += [("numbers", t) for t in num_split[split][:n_num]]
        rows += [("punctuation", t) for t in punct_split[split][:n_punct]]
        rows += [("handwritten", t) for t in hand_split[split]]
        rows += [("short", t) for t in distinct(lambda: passage(rng, pool, rng.randint(1, 4)), n_short)]
        return rows

    # parity: what every variant's gate is measured on (2,000 passages, 200 queries, all kinds)
    rows = kinds_for("eval", 1330, 120, 160, 110, 110, 60)
    rows = list(dict.fromkeys(rows))
    rng.shuffle(rows)
    rows = rows[:2000]
    passages = [t for _, t in rows]
    prose_rows = [t for k, t in rows if k in ("prose", "over-length")]
    queries = span_queries(rng, prose_rows, 150)
    queries += span_queries(rng, [t for k, t in rows if k == "handwritten"], 20, 2, 8)
    queries += span_queries(rng, [t for k, t in rows if k in ("code", "numbers", "punctuation")], 30, 1, 6)
    queries = list(dict.fromkeys(queries))
    rng.shuffle(queries)
    parity = {"description": "parity gates: mixed lengths (1 to past 128 tokens) and kinds; evaluation split",
              "queries": queries[:200], "passages": passages, "kinds": [k for k, _ in rows]}

    def workload(name: str, words_of, n_passages: int, n_queries: int, qlow: int, qhigh: int) -> dict:
        pool = prose["eval"]
        ps = distinct(lambda: passage(rng, pool, words_of(rng)), n_passages)
        return {"description": f"benchmark workload {name!r}: standard-library prose, evaluation split",
                "queries": span_queries(rng, ps, n_queries, qlow, qhigh), "passages": ps}

    mixed = workload("mixed", mixed_words, 6000, 200, 3, 12)
    long = workload("long", long_words, 6000, 200, 5, 10)

    # calibration: the same kinds, from the calibration split only
    crow = kinds_for("calibration", 560, 40, 60, 40, 40, 200)
    evaluation_text = set(parity["passages"]) | set(parity["queries"]) | set(mixed["passages"]) | set(long["passages"])
    # two sources can still yield the same few words ("the file"): such a text stays evaluation text only
    crow = [row for row in dict.fromkeys(crow) if row[1] not in evaluation_text]
    rng.shuffle(crow)
    calibration = {"description": "int8 calibration text: calibration split only (disjoint from all evaluation text)",
                   "texts": [t for _, t in crow], "kinds": [k for k, _ in crow]}

    assert not evaluation_text & set(calibration["texts"]), "calibration text overlaps evaluation text"
    return {"parity.json": parity, "bench-mixed.json": mixed, "bench-long.json": long, "calibration.json": calibration}


def main() -> None:
    if not sys.flags.isolated:  # harvest from a bare interpreter, so nothing imported before changes the text
        raise SystemExit(subprocess.call([sys.executable, "-I", "-c",
                                          f"import sys; sys.path.insert(0, {str(Path(__file__).parents[1])!r}); "
                                          "from corom_export.corpus_build import main; main()"]))
    for name, data in build_all().items():
        path = HERE / name
        path.write_text(json.dumps(data, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
        print(f'    "{name}": "{hashlib.sha256(path.read_bytes()).hexdigest()}",')


if __name__ == "__main__":
    main()
