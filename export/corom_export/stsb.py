"""Quality on real data: Spearman correlation on the STS Benchmark dev split (`../shared/data/stsb-en/`)."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from corom_runtime.parity import cosine_rows

FILE = "stsb-en-dev.csv"


@dataclass(frozen=True)
class StsPairs:
    first: list[str]
    second: list[str]
    gold: np.ndarray

    def head(self, n: int | None) -> "StsPairs":
        """The first `n` pairs (all for None): a smoke run's sample, the same pairs every time."""
        return self if n is None else StsPairs(self.first[:n], self.second[:n], self.gold[:n])


def stsb_candidates() -> list[Path]:
    """Where the STSb folder is looked for, in order: `COROM_STSB_DIR`, then `shared/data/stsb-en` beside the
    repository checkout (`../shared` of the folder holding `export/`)."""
    env = os.environ.get("COROM_STSB_DIR")
    return [*([Path(env)] if env else []), Path(__file__).resolve().parents[2].parent / "shared" / "data" / "stsb-en"]


def find_stsb() -> Path | None:
    """The STSb folder (`stsb_candidates`), or None."""
    return next((c for c in stsb_candidates() if (c / FILE).is_file()), None)


def stsb_missing() -> str | None:
    """Why STSb is absent, naming the exact paths looked at and the fix; None when it is there."""
    if find_stsb() is not None:
        return None
    looked = ", ".join(str(c / FILE) for c in stsb_candidates())
    return f"STSb data absent: looked for {looked}; set COROM_STSB_DIR to the folder holding {FILE}"


def load_pairs(folder: Path) -> StsPairs:
    first, second, gold = [], [], []
    with open(folder / FILE, newline="", encoding="utf-8") as handle:
        for row in csv.reader(handle):
            first.append(row[0])
            second.append(row[1])
            gold.append(float(row[2]))
    return StsPairs(first, second, np.asarray(gold))


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as scipy.stats.rankdata)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_vals = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    return float(np.corrcoef(ra, rb)[0, 1])


def stsb_spearman(embed: Callable[[list[str]], np.ndarray], pairs: StsPairs) -> float:
    """Spearman of cosine similarity against the gold scores (the STS convention, whatever the score fn)."""
    emb = embed(pairs.first + pairs.second)
    n = len(pairs.first)
    return spearman(cosine_rows(emb[:n], emb[n:]), pairs.gold)
