"""Length-aware batching: sort by token length, pad each batch to its own longest input.

Padding a mixed-length batch to a fixed 128 tokens wastes most of the compute on short inputs;
sorting first keeps the lengths inside a batch close, so little padding is left.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from corom_runtime.errors import InvalidInputError
from corom_runtime.tokenization import TokenizedText


def plan_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> list[np.ndarray]:
    """Split item indices into batches of similar length, longest first.

    A batch closes at `batch_size` items or when its padded size (items x longest) would pass
    `max_tokens`. Every index appears in exactly one batch.

    >>> [b.tolist() for b in plan_batches([3, 9, 4, 8], batch_size=2)]
    [[1, 3], [2, 0]]
    """
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = lengths[order[start]]
        size = batch_size
        if max_tokens is not None:
            size = max(1, min(size, max_tokens // max(1, longest)))
        batches.append(order[start:start + size])
        start += size
    return batches


def pad_batch(items: Sequence[TokenizedText], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) as int64 [batch, longest], right-padded."""
    longest = max(item.length for item in items)
    ids = np.full((len(items), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(items), longest), dtype=np.int64)
    for row, item in enumerate(items):
        ids[row, : item.length] = item.ids
        mask[row, : item.length] = 1
    return ids, mask
