"""Shape buckets: the few (batch, length) shapes an engine that compiles per shape is ever given.

OpenVINO's CPU plugin compiles kernels per input shape and keeps them in a cache. Fed every shape a
server meets (any batch size 1..32 times any length 1..128), that cache either grows without bound
or, capped, evicts hot kernels and rebuilds them on the next request (a p99 of 2.5-3x the p50 here).
Padded to a bucket, the shapes are few: lengths to a multiple of `LENGTH_STEP` (at most
max_length / 16 of them) and batches to one of `BATCH_SIZES`, so every kernel stays compiled and the
memory is bounded by the number of buckets, not by a cap. Padded positions are masked; padded rows
repeat a real row and are dropped, so a text's vector does not change beyond its variant's own
batch-invariance gate (tested per variant). Pure functions: tested without an engine.
"""

from __future__ import annotations

import bisect

import numpy as np

LENGTH_STEP = 16
# an engine that compiles per shape compiles a single query's buckets (batch 1, up to this many
# tokens) when the `Embedder` loads: queries are short, and longer texts come in batches
QUERY_WARM_TOKENS = 128
# at most 1.5x the rows of the batch asked for; past the table, multiples of its last size
BATCH_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def bucket_length(length: int, max_length: int, step: int = LENGTH_STEP) -> int:
    """The padded length for a batch whose longest input has `length` tokens.

    >>> [bucket_length(n, 128) for n in (1, 16, 17, 120, 128)]
    [16, 16, 32, 128, 128]
    >>> bucket_length(70, 72)   # a max_length that is not a multiple of the step is its own bucket
    72
    """
    return max(length, min(-(-length // step) * step, max_length))


def bucket_rows(rows: int, sizes: tuple[int, ...] = BATCH_SIZES) -> int:
    """The padded row count for a batch of `rows`.

    >>> [bucket_rows(n) for n in (1, 5, 7, 32, 33, 70)]
    [1, 6, 8, 32, 64, 96]
    """
    i = bisect.bisect_left(sizes, rows)
    if i < len(sizes):
        return sizes[i]
    return -(-rows // sizes[-1]) * sizes[-1]


def bucket_list(max_length: int, max_rows: int = BATCH_SIZES[-1], step: int = LENGTH_STEP) -> list[tuple[int, int]]:
    """Every (rows, length) bucket batches of up to `max_rows` texts can meet, smallest work first.

    >>> bucket_list(32, 2)
    [(1, 16), (1, 32), (2, 16), (2, 32)]
    """
    lengths = sorted({bucket_length(n, max_length, step) for n in range(1, max_length + 1)})
    rows = sorted({bucket_rows(n) for n in range(1, max_rows + 1)})
    return sorted(((r, n) for r in rows for n in lengths), key=lambda shape: (shape[0] * shape[1], shape))


def bucket_shapes(max_length: int, max_rows: int = BATCH_SIZES[-1], step: int = LENGTH_STEP) -> int:
    """How many buckets there are: what a per-shape cache must hold for no hot kernel to be evicted.

    >>> bucket_shapes(128), bucket_shapes(512, 64)
    (80, 352)
    """
    return len(bucket_list(max_length, max_rows, step))


def pad_to_bucket(input_ids: np.ndarray, attention_mask: np.ndarray,
                  max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """`(input_ids, attention_mask)` padded to their bucket: masked columns of id 0 on the right, and
    copies of the first row below (real input, so no row is all padding). Callers keep the first
    `len(input_ids)` output rows.

    >>> ids, mask = pad_to_bucket(np.ones((5, 3), np.int64), np.ones((5, 3), np.int64), 128)
    >>> ids.shape, int(mask[:, 3:].sum()), int(mask[5:].sum())
    ((6, 16), 0, 3)
    """
    rows, length = input_ids.shape
    target_rows, target_length = bucket_rows(rows), bucket_length(length, max(max_length, length))
    if (target_rows, target_length) == (rows, length):
        return input_ids, attention_mask
    ids = np.zeros((target_rows, target_length), dtype=input_ids.dtype)
    mask = np.zeros((target_rows, target_length), dtype=attention_mask.dtype)
    ids[:rows, :length], mask[:rows, :length] = input_ids, attention_mask
    ids[rows:, :length], mask[rows:, :length] = input_ids[0], attention_mask[0]
    return ids, mask
