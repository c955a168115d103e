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


def scores(queries: np.ndarray, passages: np.ndarray, score: str) -> np.ndarray:
    """Every query's score with every passage, `[queries, passages]` (cosine or dot)."""
    if score == "cosine":
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        passages = passages / np.maximum(np.linalg.norm(passages, axis=1, keepdims=True), 1e-12)
    return queries @ passages.T


def top_k(queries: np.ndarray, passages: np.ndarray, score: str, k: int = 10) -> np.ndarray:
    k = min(k, passages.shape[0])
    return np.argsort(-scores(queries, passages, score), axis=1, kind="stable")[:, :k]


# A tie is granted only to a variant whose own score error on the query is this small against the
# query's largest score: a variant that measurably moves scores gets the strict count, so near ties
# never loosen the gate for a variant that really disagrees (1e-4: the `exact` tier's 1 - min cosine).
TIE_ERROR = 1e-4


def top_k_agreement(reference: np.ndarray, candidate: np.ndarray, k: int = 10, tie_error: float = TIE_ERROR,
                    scale: np.ndarray | None = None) -> float:
    """Mean share of each query's top-k (by `candidate` scores) that agrees with the reference's top-k.

    `reference` and `candidate` are score matrices `[queries, passages]`. A neighbour outside the
    reference's top-k still agrees where the reference cannot tell it from its k-th (their reference
    scores differ by no more than the variant's measured score error on that query allows), provided that
    error is below `tie_error` of the query's score scale (`scale[q]`: for dot scores |q| x the largest
    |p|; default the row's largest |score|); otherwise only the reference's own top-k counts.

    >>> ref = np.array([[0.9, 0.8, 0.5000001, 0.5]]); cand = np.array([[0.9, 0.8, 0.4999999, 0.5]])
    >>> top_k_agreement(ref, cand, k=3), top_k_agreement(ref, np.array([[0.9, 0.3, 0.5000001, 0.5]]), k=3)
    (1.0, 0.6666666666666666)
    """
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    k = min(k, reference.shape[1])
    ref_top = np.argsort(-reference, axis=1, kind="stable")[:, :k]
    cand_top = np.argsort(-candidate, axis=1, kind="stable")[:, :k]
    shares = []
    for row, (ref_row, cand_row) in enumerate(zip(ref_top, cand_top)):
        error = float(np.abs(candidate[row] - reference[row]).max())
        row_scale = float(scale[row]) if scale is not None else float(np.abs(reference[row]).max())
        # two scores each off by at most `error` can swap when their reference gap is under twice it
        tolerance = 2 * error if error <= tie_error * row_scale else 0.0
        kth, ref_set = reference[row, ref_row[-1]], set(ref_row.tolist())
        agreed = sum(1 for p in cand_row.tolist() if p in ref_set or reference[row, p] >= kth - tolerance)
        shares.append(agreed / k)
    return float(np.mean(shares)) if shares else 1.0


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
        queries, passages = reference[:n_queries], reference[n_queries:]
        scale = (np.ones(n_queries) if score == "cosine" else
                 np.linalg.norm(queries, axis=1) * np.linalg.norm(passages, axis=1).max())
        agreement = top_k_agreement(scores(queries, passages, score), scores(safe[:n_queries], safe[n_queries:], score),
                                    scale=scale)
    return Parity(
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        max_abs_diff=float(np.abs(reference - safe).max()),
        top10_agreement=agreement,
        finite=finite,
        texts=len(reference),
        queries=n_queries,
    )
