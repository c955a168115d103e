"""Parity of a variant's vectors against reference vectors: the figures every gate is judged on.

The runtime owns them: `corom verify` (the exporter) judges a variant against PyTorch with them, and
`Embedder.load` judges it again on a CPU the artifact was never verified on (`cpu_check`).

>>> v = np.eye(3, dtype=np.float32)
>>> compare(v, v, 1, "cosine").min_cosine
1.0
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from corom_runtime.catalog import Gate  # the gates live in the engine table, beside each variant


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of `a` with the same row of `b`."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


@dataclass(frozen=True)
class Parity:
    min_cosine: float
    mean_cosine: float
    max_abs_diff: float
    top10_agreement: float
    finite: bool
    texts: int
    queries: int
    # min cosine of a text embedded alone vs inside mixed-length batches (1.0 until measured)
    batch_invariance: float = 1.0

    def failures(self, gate: Gate) -> list[str]:
        out = []
        if gate.finite and not self.finite:
            out.append("NaN or Inf in the embeddings")
        if not self.min_cosine >= gate.min_cosine:
            out.append(f"min cosine {self.min_cosine:.6f} < {gate.min_cosine}")
        if not self.top10_agreement >= gate.top10_agreement:
            out.append(f"top-10 agreement {self.top10_agreement:.4f} < {gate.top10_agreement}")
        if not self.batch_invariance >= gate.batch_invariance:
            out.append(f"batch invariance {self.batch_invariance:.6f} < {gate.batch_invariance}")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def top_k(queries: np.ndarray, passages: np.ndarray, score: str, k: int = 10) -> np.ndarray:
    if score == "cosine":
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        passages = passages / np.maximum(np.linalg.norm(passages, axis=1, keepdims=True), 1e-12)
    scores = queries @ passages.T
    k = min(k, passages.shape[0])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def batch_invariance(alone: np.ndarray, in_batches: np.ndarray) -> float:
    """Min cosine between each text's vector embedded alone and inside a mixed batch."""
    return float(cosine_rows(alone, in_batches).min()) if len(alone) else 1.0


def compare(reference: np.ndarray, candidate: np.ndarray, n_queries: int, score: str) -> Parity:
    """Compare embeddings of the same texts; the first `n_queries` rows are queries, the rest passages."""
    finite = bool(np.isfinite(candidate).all())
    safe = np.nan_to_num(candidate, nan=0.0, posinf=0.0, neginf=0.0)
    cos = cosine_rows(reference, safe)
    agreement = 1.0
    if 0 < n_queries < len(reference):
        ref_top = top_k(reference[:n_queries], reference[n_queries:], score)
        cand_top = top_k(safe[:n_queries], safe[n_queries:], score)
        agreement = float(np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(ref_top, cand_top)]))
    return Parity(
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        max_abs_diff=float(np.abs(reference - safe).max()),
        top10_agreement=agreement,
        finite=finite,
        texts=len(reference),
        queries=n_queries,
    )
