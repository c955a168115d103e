"""The gates' figures: top-10 agreement that does not cry wolf on near ties (and never forgives a real
swap), and a verdict that fails on every figure it names."""

from __future__ import annotations

import numpy as np
import pytest

from corom_runtime.catalog import VARIANTS, Gate
from corom_runtime.parity import Parity, compare, top_k_agreement


def _scores(n_queries: int = 20, n_passages: int = 60, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n_queries, n_passages))


def _swap_tenth(ref: np.ndarray, gap: float) -> tuple[np.ndarray, np.ndarray]:
    """Reference where each query's 11th passage sits `gap` under its 10th, and a candidate with
    those two swapped by a score error of `gap` (every other score unchanged)."""
    ref = ref.copy()
    order = np.argsort(-ref, axis=1)
    cand = ref.copy()
    for row, o in enumerate(order):
        tenth, eleventh = o[9], o[10]
        ref[row, eleventh] = ref[row, tenth] - gap
        cand[row, eleventh] = ref[row, tenth] + gap
    return ref, cand


def test_a_near_tie_swap_counts_as_agreement():
    """The random-weight CoROM case: the 10th and 11th are 1e-7 apart in the reference, a faithful
    variant (score error 2e-7) swaps them: the reference cannot tell them apart."""
    ref, cand = _swap_tenth(_scores(), 1e-7)
    assert top_k_agreement(ref, cand) == 1.0
    # the strict count, for contrast: one of ten neighbours differs on every query
    strict = np.mean([len(set(np.argsort(-r)[:10]) & set(np.argsort(-c)[:10])) / 10 for r, c in zip(ref, cand)])
    assert strict == pytest.approx(0.9)


def test_a_real_swap_does_not():
    ref, cand = _swap_tenth(_scores(), 0.05)  # the reference ranks them 0.05 apart
    assert top_k_agreement(ref, cand) == pytest.approx(0.9)


def test_a_noisy_variant_gets_no_tie_credit():
    """Ties are granted only where the variant's own score error is tiny: noise elsewhere on the
    query (1e-2) makes the same near-tie swap count as disagreement."""
    ref, cand = _swap_tenth(_scores(), 1e-7)
    cand = cand + np.where(np.arange(cand.shape[1]) == cand.shape[1] - 1, 1e-2, 0.0)
    # the noisy passage must not itself enter the top-10
    assert top_k_agreement(ref, cand) == pytest.approx(0.9, abs=0.01)


def test_compare_uses_the_tie_aware_count():
    """Through `compare` (what verify and the load-time check call), on what a random-weight encoder
    gives: passages that are all nearly the same vector, so their order is decided by 1e-6 details."""
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    passages = (rng.standard_normal(16) + rng.standard_normal((300, 16)) * 1e-4).astype(np.float32)
    ref = np.concatenate([queries, passages])
    cand = ref + (rng.standard_normal(ref.shape) * 1e-5).astype(np.float32)
    strict = np.mean([len(set(np.argsort(-r)[:10]) & set(np.argsort(-c)[:10])) / 10
                      for r, c in zip(queries @ passages.T, cand[:20] @ cand[20:].T)])
    assert strict < 0.97  # what the gate saw before: a lossless-looking variant failing top-10
    assert compare(ref, cand, 20, "dot").top10_agreement == 1.0
    shuffled = ref.copy()
    shuffled[20:] = passages[rng.permutation(300)]  # real disagreement, same vectors
    assert compare(ref, shuffled, 20, "dot").top10_agreement < 0.5


@pytest.mark.parametrize("field, value, named", [
    ("min_cosine", 0.5, "min cosine"), ("top10_agreement", 0.5, "top-10 agreement"),
    ("batch_invariance", 0.5, "batch invariance"), ("finite", False, "NaN or Inf"),
])
def test_every_gate_figure_can_fail_the_verdict(field, value, named):
    good = Parity(min_cosine=1.0, mean_cosine=1.0, max_abs_diff=0.0, top10_agreement=1.0, finite=True, texts=10,
                  queries=2, batch_invariance=1.0)
    assert good.failures(VARIANTS["int8"].gate) == []
    bad = Parity(**{**good.to_dict(), field: value})
    failures = bad.failures(VARIANTS["int8"].gate)
    assert len(failures) == 1 and named in failures[0]


def test_every_variant_gates_top10_and_batch_invariance_where_it_is_lossy():
    for name, spec in VARIANTS.items():
        assert spec.gate.batch_invariance >= 0.999, name
        if spec.precision in ("int8", "bf16") and name != "ov-int8-fast":  # the fast tier: task quality
            assert spec.gate.top10_agreement >= 0.97, name
    assert isinstance(VARIANTS["fp32"].gate, Gate) and VARIANTS["fp32"].gate.min_cosine >= 0.99999


# -- verify and export, on the conformance suite's tiny sentence-transformers BERT -------------------

from pathlib import Path  # noqa: E402



@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory) -> tuple[Path, Path]:
    from test_conformance import conformance_model

    return conformance_model(None, tmp_path_factory, "bert")


def test_verify_compares_each_variant_with_the_reference(tiny_st, monkeypatch):
    """A variant whose vectors are wrong fails verify (a verify comparing the variant with itself, or
    the reference with itself, would pass it)."""
    from corom_export.verify import verify_artifact
    from corom_runtime import Embedder

    _, artifact = tiny_st
    honest = Embedder.embed_tokenized

    def wrong(self, items, *args, **kwargs):
        vectors = honest(self, items, *args, **kwargs)
        return np.roll(vectors, 1, axis=1)  # every vector, each number one place over

    kwargs = dict(n_queries=10, n_passages=40, variants=["fp32"], stsb=False, write=False, speed_texts=16,
                  speed_rounds=1)
    assert verify_artifact(artifact, **kwargs).passed  # the honest variant passes
    monkeypatch.setattr(Embedder, "embed_tokenized", wrong)
    (result,) = verify_artifact(artifact, **kwargs).results
    assert not result.passed and any("min cosine" in f for f in result.failures), result.failures


def test_the_speed_auto_ranks_by_is_measured_on_long_passages(tiny_st, monkeypatch):
    """`auto` ranks by the verify speed pass: it must time long passages, where int8 and bf16 differ
    (on the parity corpus's short mix they tie, and the tie sent long-passage users to the slower one)."""
    from corom_export import verify
    from corom_export.corpus import parity_corpus, workload_corpus
    from corom_runtime.tokenization import TextTokenizer

    _, artifact = tiny_st
    timed: list = []
    real = verify.measure_speeds
    monkeypatch.setattr(verify, "measure_speeds", lambda embedders, items, rounds: timed.extend(items) or real(embedders, items, rounds))
    report = verify.verify_artifact(artifact, n_queries=10, n_passages=40, variants=["fp32"], stsb=False, write=False,
                                    speed_texts=16, speed_rounds=1)
    long = workload_corpus("long", 0, 16).passages
    tokenizer = TextTokenizer.from_file(artifact / "tokenizer.json", 10_000)
    assert [i.ids[:8] for i in timed] == [i.ids[:8] for i in tokenizer.encode(long)]  # those texts, not the parity mix
    lengths = lambda texts: np.mean([i.length for i in tokenizer.encode(texts)])  # noqa: E731
    assert lengths(long) > 2 * lengths(parity_corpus(0, 16).passages)
    assert "long passages" in report.results[0].speed["method"]


def test_export_is_deterministic(tiny_st, tmp_path):
    """Two exports of one checkpoint write the same graphs and the same calibration vectors (a random
    calibration subset, or any other draw, would make two artifacts of one model disagree)."""
    import json

    from test_conformance import _export_tiny

    folder, first = tiny_st
    again = tmp_path / "again"
    _export_tiny(folder, again)
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (first, again))
    assert {n: v["sha256"] for n, v in a["variants"].items()} == {n: v["sha256"] for n, v in b["variants"].items()}
    assert a["quantization"]["sha256"] == b["quantization"]["sha256"]
