"""The fixed text every figure rests on: corpus files in `corom_export/corpora/`, hash-checked on read.

- `parity`: 200 queries and 2,000 passages of every kind a fragile recipe stumbles on (prose of 1 to
  past 128 tokens, code, numbers, punctuation, 15+ languages, one-word snippets): the gates.
- `bench-mixed` / `bench-long`: the benchmark workloads (a log-uniform short mix, mean ~33 tokens;
  MS MARCO-like long passages, 24-128 tokens, mean ~94), 200 queries and 6,000 passages each.
- `calibration`: int8 calibration text, cut from source texts that no evaluation text comes from.

The files are written once by `python -m corom_export.corpus_build` and committed; nothing here is
rebuilt from the live interpreter, so figures reproduce between machines, the CLI and the tests.

>>> c = parity_corpus(10, 50); len(c.queries), len(c.passages)
(10, 50)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from corom_runtime.errors import CoromError

CORPORA = Path(__file__).parent / "corpora"
# what `python -m corom_export.corpus_build` printed; a file that no longer matches is refused
CORPUS_SHA256 = {
    "parity.json": "bb449c6ab321c55dd8e27530101e0c9d6bdf86926e50f8fe4b5915d51b16be31",
    "bench-mixed.json": "3df594f85915b7882bc179018988820c421fbeb0be78ab22c7535a9d2ef8a45f",
    "bench-long.json": "d13f25e0fa3de76d6dcf85c2e25d5e94834b9a6c002397d2394eb9ceb2cc7abd",
    "calibration.json": "3dabcc2e85b7d29c3233f674d18bdcc48cbb5c8a1b366bec99cf58e29a1d839d",
}
WORKLOADS = ("mixed", "long")


@dataclass(frozen=True)
class Corpus:
    queries: list[str]
    passages: list[str]


@lru_cache(maxsize=None)
def read_corpus(name: str) -> dict:
    """One corpus file, after checking its sha256 against `CORPUS_SHA256`."""
    if name not in CORPUS_SHA256:
        raise ValueError(f"unknown corpus {name!r}; known: {sorted(CORPUS_SHA256)}")
    path = CORPORA / name
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CoromError(f"corpus file {path} cannot be read ({exc}); reinstall corom-onnx") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != CORPUS_SHA256[name]:
        raise CoromError(f"corpus file {path} has sha256 {digest}, expected {CORPUS_SHA256[name]}: it changed. "
                         "Restore it (git checkout), or rebuild the corpora on purpose with "
                         "`python -m corom_export.corpus_build` and update CORPUS_SHA256")
    return json.loads(data.decode("utf-8"))


def _take(data: dict, n_queries: int, n_passages: int, name: str) -> Corpus:
    queries, passages = data["queries"], data["passages"]
    if n_queries > len(queries) or n_passages > len(passages):
        raise ValueError(f"{name} holds {len(queries)} queries and {len(passages)} passages; "
                         f"asked for {n_queries} and {n_passages}")
    return Corpus(queries=queries[:n_queries], passages=passages[:n_passages])


def parity_corpus(n_queries: int = 200, n_passages: int = 2000) -> Corpus:
    """The evaluation text of the parity gates (the files are shuffled: any prefix is a fair sample)."""
    return _take(read_corpus("parity.json"), n_queries, n_passages, "parity.json")


def workload_corpus(workload: str, n_queries: int = 200, n_passages: int = 2000) -> Corpus:
    """A benchmark workload: "mixed" (short mix) or "long" (MS MARCO-like passages)."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    name = f"bench-{workload}.json"
    return _take(read_corpus(name), n_queries, n_passages, name)


def calibration_texts(n: int | None = None) -> list[str]:
    """Calibration text (disjoint from every evaluation text by construction), the first `n`."""
    texts = read_corpus("calibration.json")["texts"]
    return list(texts if n is None else texts[:n])
