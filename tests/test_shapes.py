"""Shape buckets (single-query latency issue): the bucket choice as pure functions, and padded inputs
that leave every OpenVINO variant's vectors within its own batch-invariance gate."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SUITE_VARIANTS
from corom_runtime import Embedder
from corom_runtime.batching import pad_batch
from corom_runtime.catalog import ENGINES, VARIANTS, engine_installed
from corom_runtime.shapes import QUERY_WARM_TOKENS, BATCH_SIZES, bucket_length, bucket_rows, bucket_shapes, pad_to_bucket

OPENVINO_VARIANTS = [n for n, v in VARIANTS.items() if v.engine == "openvino" and "cpu" in v.devices
                     and n in SUITE_VARIANTS]


@pytest.mark.parametrize("max_length", [16, 72, 128, 512])
def test_length_buckets_cover_every_length_with_few_shapes(max_length):
    buckets = [bucket_length(n, max_length) for n in range(1, max_length + 1)]
    assert all(b >= n for n, b in zip(range(1, max_length + 1), buckets))  # never cuts
    assert max(buckets) == max_length and buckets == sorted(buckets)       # never past the model's window
    assert len(set(buckets)) <= -(-max_length // 16)                      # a multiple of 16, or max_length
    assert all(b - n < 16 for n, b in zip(range(1, max_length + 1), buckets))


def test_row_buckets_waste_at_most_half_and_are_few():
    for n in range(1, 257):
        r = bucket_rows(n)
        assert n <= r and (r <= 1.5 * n if n <= BATCH_SIZES[-1] else r - n < BATCH_SIZES[-1]), (n, r)
    assert len({bucket_rows(n) for n in range(1, 33)}) == len(BATCH_SIZES) and bucket_rows(1) == 1
    assert bucket_shapes(128) == 8 * len(BATCH_SIZES)


def test_padding_masks_new_columns_and_repeats_a_real_row():
    ids = np.arange(1, 16, dtype=np.int64).reshape(5, 3)
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=np.int64)
    pid, pmask = pad_to_bucket(ids, mask, 128)
    assert pid.shape == pmask.shape == (6, 16)
    np.testing.assert_array_equal(pid[:5, :3], ids)
    np.testing.assert_array_equal(pmask[:5, :3], mask)
    assert pmask[:, 3:].sum() == 0 and (pid[5, :3] == ids[0]).all() and (pmask[5, :3] == mask[0]).all()
    same = np.ones((8, 16), np.int64)
    assert pad_to_bucket(same, same, 128)[0] is same  # already a bucket: no copy


def test_only_engines_that_compile_per_shape_pad():
    assert ENGINES["openvino"].shape_buckets and not ENGINES["onnxruntime"].shape_buckets


@pytest.mark.skipif(not engine_installed("openvino"), reason="the OpenVINO engine is not installed")
@pytest.mark.parametrize("variant", OPENVINO_VARIANTS)
def test_bucketed_vectors_stay_within_the_variants_own_gate(bundled_artifact, variant):
    emb = Embedder.load(bundled_artifact, variant=variant, device="cpu", verify_here=False)
    assert emb.session.shape_buckets
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jars".split()
    texts = [" ".join(words[: 1 + i % len(words)] * (1 + i // 7)) for i in range(37)]
    items = emb.tokenizer.encode(texts)
    padded = np.concatenate([emb.session.run(*pad_batch(items[i:i + 5], emb.artifact.pad_id))
                             for i in range(0, len(items), 5)])  # rows 5 -> 6, lengths to a multiple of 16
    emb.session.shape_buckets = False
    exact = np.concatenate([emb.session.run(*pad_batch([item], emb.artifact.pad_id)) for item in items])
    cos = (padded * exact).sum(1) / np.linalg.norm(padded, axis=1) / np.linalg.norm(exact, axis=1)
    assert padded.shape == exact.shape == (37, emb.dim)
    assert cos.min() >= VARIANTS[variant].gate.batch_invariance, cos.min()


def test_bucket_list_is_every_bucket_smallest_first():
    from corom_runtime.shapes import bucket_list

    shapes = bucket_list(128, 32)
    assert len(shapes) == bucket_shapes(128) == len(set(shapes)) and shapes[0] == (1, 16)
    work = [r * n for r, n in shapes]
    assert work == sorted(work) and shapes[-1] == (32, 128)


@pytest.mark.skipif(not engine_installed("openvino"), reason="the OpenVINO engine is not installed")
def test_warming_runs_every_bucket_once(bundled_artifact, monkeypatch):
    emb = Embedder.load(bundled_artifact, variant="ov-bf16", device="cpu", verify_here=False)
    seen = []
    real = emb.session.run
    monkeypatch.setattr(emb.session, "run", lambda ids, mask: seen.append(ids.shape) or real(ids, mask))
    lengths = -(-emb.max_seq_length // 16)  # 16, 32, ... up to the artifact's window
    assert emb.session.warm_buckets(4) == len(seen) == 4 * lengths  # rows 1, 2, 3, 4 x every length
    assert len(set(seen)) == len(seen) and max(n for _, n in seen) == emb.max_seq_length


@pytest.mark.skipif(not engine_installed("openvino"), reason="the OpenVINO engine is not installed")
def test_loading_compiles_a_single_querys_shapes_so_no_first_query_pays_for_it(bundled_artifact, monkeypatch):
    from corom_runtime.engines.openvino import OpenVINOSession

    seen: list[tuple[int, int]] = []
    real = OpenVINOSession.run
    monkeypatch.setattr(OpenVINOSession, "run", lambda self, ids, mask: seen.append(ids.shape) or real(self, ids, mask))
    emb = Embedder.load(bundled_artifact, variant="ov-bf16", device="cpu", verify_here=False)
    wanted = {(1, n) for n in range(16, QUERY_WARM_TOKENS + 1, 16)}
    assert wanted <= set(seen) and max(n for rows, n in seen if rows == 1) == QUERY_WARM_TOKENS < emb.max_seq_length
    seen.clear()
    Embedder.load(bundled_artifact, variant="ov-bf16", device="cpu", verify_here=False, warmup=False)
    assert len(seen) == 1  # warmup=False: only the probe that checks the graph's width
    seen.clear()  # a bound between two buckets warms the bucket its texts are padded to
    assert emb.session.warm_buckets(1, max_tokens=40) == len(seen) == 3 and seen[-1] == (1, 48)


def test_warming_a_single_querys_buckets_stops_at_a_window_under_128():
    """A model whose window is under QUERY_WARM_TOKENS is warmed to its window, never past it: a 64-token
    model fed 128 tokens overran its position table and `Embedder.load` failed in OpenVINO."""
    from types import SimpleNamespace

    from corom_runtime.engines.openvino import OpenVINOSession

    for window, lengths in ((64, [16, 32, 48, 64]), (72, [16, 32, 48, 64, 72])):
        seen: list[tuple[int, int]] = []
        session = SimpleNamespace(max_length=window, shape_buckets=True, run=lambda ids, mask: seen.append(ids.shape))
        assert OpenVINOSession.warm_buckets(session, 1, max_tokens=QUERY_WARM_TOKENS) == len(lengths)
        assert seen == [(1, n) for n in lengths]
