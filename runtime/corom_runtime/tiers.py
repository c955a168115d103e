"""Fidelity tiers: which tiers (`catalog.TIERS`) a variant passed, derived from its recorded figures.

Pure functions over the manifest's records: `corom verify` records the figures (min cosine, top-10
agreement, batch invariance, STSb Spearman, retrieval nDCG@10) and the labels are computed from them
wherever they are needed, so a manifest written before tiers existed gets its labels from the same
figures, and a changed tier table relabels every artifact at once. The tiers nest: a faithful
variant is fast too, even where the fast tier's own figures (STSb, retrieval) were not recorded.

>>> tiers_of({"min_cosine": 0.995, "top10_agreement": 0.975, "batch_invariance": 1.0, "finite": True})
('faithful', 'fast')
"""

from __future__ import annotations

import numpy as np

from corom_runtime.catalog import DEFAULT_FIDELITY, TIERS, VARIANTS, Gate, Tier

# the figure that carries the retrieval task quality in a variant's parity record
RETRIEVAL_KEY = "retrieval_ndcg10"


def check_fidelity(fidelity: str | None) -> str | None:
    """`fidelity` as given (None or "auto": the default tier); an unknown
    name is a `ValueError` listing the tiers."""
    if fidelity is None or fidelity == "auto":
        return None
    if fidelity not in TIERS:
        raise ValueError(f"fidelity must be one of {list(TIERS)} (or 'auto': {DEFAULT_FIDELITY}), "
                         f"got {fidelity!r}: " + "; ".join(f"{t.name}: {t.description}" for t in TIERS.values()))
    return fidelity


def retrieval_ndcg(reference: np.ndarray, candidate: np.ndarray, k: int = 10) -> float:
    """Retrieval quality of `candidate`'s rankings judged by the reference: mean nDCG@k where a
    passage's gain is its reference score above the query's mean reference score (clipped at 0).
    The reference scores 1.0; a swap of two passages the reference scores alike costs almost
    nothing, a real neighbour lost costs its gain. `reference`, `candidate`: `[queries, passages]`.

    >>> ref = np.array([[0.9, 0.5, 0.1, 0.0]])
    >>> retrieval_ndcg(ref, ref, k=2), round(retrieval_ndcg(ref, np.array([[0.9, 0.0, 0.1, 0.5]]), k=2), 3)
    (1.0, 0.869)
    """
    reference, candidate = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    k = min(k, reference.shape[1])
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    shares = []
    for ref_row, cand_row in zip(reference, candidate):
        gain = np.clip(ref_row - ref_row.mean(), 0.0, None)
        ideal = float((np.sort(gain)[::-1][:k] * discount).sum())
        got = float((gain[np.argsort(-cand_row, kind="stable")[:k]] * discount).sum())
        shares.append(got / ideal if ideal > 0 else 1.0)
    return float(np.mean(shares)) if shares else 1.0


def figures_of(name: str, parity: dict, passed: bool) -> dict:
    """The figures to label a variant by: its recorded ones; for a passed variant with none recorded,
    the floors its gate guaranteed (a gate at min cos >= 0.999 does not gate top-10, which is >= 0.998
    wherever it was recorded for one)."""
    if parity and parity.get("min_cosine") is not None:
        return parity
    if not passed or name not in VARIANTS:
        return {}
    gate: Gate = VARIANTS[name].gate
    return {"min_cosine": gate.min_cosine, "batch_invariance": gate.batch_invariance, "finite": True,
            "top10_agreement": gate.top10_agreement or (1.0 if gate.min_cosine >= 0.999 else 0.0)}


def meets(tier: Tier, figures: dict, reference_stsb: float | None = None) -> bool:
    """Whether `figures` (a parity record) show `tier`'s fidelity; a figure not recorded fails the
    tier that needs it."""
    def at_least(key: str, floor: float) -> bool:
        value = figures.get(key)
        return floor <= 0 or (isinstance(value, (int, float)) and value >= floor)

    if not figures or figures.get("finite") is False or not at_least("min_cosine", tier.min_cosine):
        return False
    if not (at_least("top10_agreement", tier.top10_agreement) and at_least("batch_invariance", tier.batch_invariance)):
        return False
    if tier.task_quality is not None:
        stsb = figures.get("stsb_spearman")
        if not isinstance(stsb, (int, float)) or not reference_stsb or stsb < tier.task_quality * reference_stsb:
            return False
        if not at_least(RETRIEVAL_KEY, tier.task_quality):
            return False
    return True


def missing_figures(tier: Tier, figures: dict, reference_stsb: float | None = None) -> list[str]:
    """The figures `tier` reads that `figures` (or the manifest, for the reference STSb) lack: what a
    re-run of `corom verify` would record. Pure.

    >>> missing_figures(TIERS["fast"], {"min_cosine": 1.0, "stsb_spearman": 0.86}, 0.87)
    ['retrieval_ndcg10']
    """
    wanted = ["min_cosine"] + (["top10_agreement"] if tier.top10_agreement > 0 else []) \
        + (["batch_invariance"] if tier.batch_invariance > 0 else []) \
        + (["stsb_spearman", RETRIEVAL_KEY] if tier.task_quality is not None else [])
    missing = [key for key in wanted if not isinstance(figures.get(key), (int, float))]
    if tier.task_quality is not None and not reference_stsb:
        missing.append("the reference's STSb")
    return missing


def tiers_of(figures: dict, reference_stsb: float | None = None) -> tuple[str, ...]:
    """The tiers `figures` pass, most faithful first. The tiers nest: a variant that passed one passes
    every looser one (every text already closer to fp32 than the looser tier asks), also where a
    figure only the looser tier reads was not recorded (STSb, where its data was absent): a request
    for `fast` is never refused, nor sent up a tier, for a variant that is `exact`."""
    order = list(TIERS)
    met = [i for i, t in enumerate(TIERS.values()) if meets(t, figures, reference_stsb)]
    return tuple(order[min(met):]) if met else ()


def variant_tiers(entry, reference_stsb: float | None = None) -> tuple[str, ...]:
    """The tiers a manifest's `VariantEntry` passed; none unless it passed its own gate."""
    if not entry.passed:
        return ()
    return tiers_of(figures_of(entry.name, entry.parity, entry.passed), reference_stsb)


def faithfulness(tiers: tuple[str, ...]) -> int:
    """Higher is more faithful: the rank of the strictest tier passed (0: none)."""
    order = list(TIERS)
    return len(order) - min(order.index(t) for t in tiers) if tiers else 0


def served_tier(tiers: tuple[str, ...], fidelity: str | None) -> str:
    """The tier a variant labelled `tiers` (nested: `tiers_of`) serves for a request of `fidelity`
    (None: auto): the one asked for (the default for None); else (a variant named below the default)
    its strictest; "none" for a variant without one.

    >>> served_tier(("exact", "faithful", "fast"), "fast"), served_tier(("faithful", "fast"), None)
    ('fast', 'faithful')
    >>> served_tier(("fast",), None), served_tier((), None)
    ('fast', 'none')
    """
    asked = check_fidelity(fidelity) or DEFAULT_FIDELITY
    return asked if asked in tiers else (tiers[0] if tiers else "none")
