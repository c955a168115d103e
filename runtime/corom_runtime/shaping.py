"""Vectors shaped for the index: fewer dimensions and quantized values, after pooling.

Order, everywhere (Python, CLI, server, corpus jobs): embed -> pool -> truncate to N dimensions ->
re-normalize (where the model's vectors are normalized) -> quantize. Pure functions of the vectors and
of ranges calibrated at export (never of the request's own batch, so a vector does not depend on its
batch mates). Meanings are sentence-transformers' (`truncate_dim`, `quantize_embeddings`):

- `ubinary`: `np.packbits(v > 0)` (uint8, dim/8 bytes); `binary`: the same minus 128, as int8.
- `uint8` / `int8`: each dimension scaled from its calibrated [min, max] to 0..255, floored (int8: minus
  128), clipped where a value falls outside the calibrated range: sentence-transformers' formula.

>>> v = np.array([[0.6, -0.8, 0.0, 0.0]], dtype=np.float32)
>>> [round(float(x), 2) for x in shape_vectors(v, truncate_dim=2, renormalize=True)[0]]
[0.6, -0.8]
>>> shape_vectors(v, precision="ubinary").tolist()
[[128]]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from corom_runtime.catalog import PRECISIONS
from corom_runtime.errors import InvalidInputError, InvalidInputTypeError

NEEDS_RANGES = ("int8", "uint8")
QUANTIZATION_FILE = "quantization.npz"  # in the artifact: the reference's vectors of calibration text


DTYPES = {"float32": np.float32, "int8": np.int8, "uint8": np.uint8, "binary": np.int8, "ubinary": np.uint8}


def shaped_width(dim: int, truncate_dim: int | None, precision: str) -> int:
    """Numbers per output row: N, or N/8 bytes (rounded up) for the packed-bit precisions.

    >>> shaped_width(384, 128, "ubinary"), shaped_width(384, None, "int8")
    (16, 384)
    """
    n = truncate_dim or dim
    return -(-n // 8) if precision in ("binary", "ubinary") else n


@dataclass(frozen=True)
class Ranges:
    """Per-dimension calibration ranges of vectors shaped one way (one N, one normalization)."""

    starts: np.ndarray  # float32 [dim]
    steps: np.ndarray   # float32 [dim]: (max - min) / 255


def check_shape_options(dim: int, truncate_dim: object = None, precision: object = "float32") -> tuple[int | None, str]:
    """`truncate_dim` (None or 1..dim) and `precision` (one of `PRECISIONS`), checked; errors name the
    bad value and what is allowed."""
    if truncate_dim is not None:
        if isinstance(truncate_dim, bool) or not isinstance(truncate_dim, (int, np.integer)):
            raise InvalidInputTypeError(f"truncate_dim must be an integer from 1 to {dim}, got {type(truncate_dim).__name__}")
        if not 1 <= int(truncate_dim) <= dim:
            raise InvalidInputError(f"truncate_dim must be from 1 to {dim} (this model's dimensions), got {truncate_dim}")
        truncate_dim = int(truncate_dim)
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise InvalidInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return truncate_dim, precision


def truncate(vectors: np.ndarray, truncate_dim: int | None, renormalize: bool) -> np.ndarray:
    """The first `truncate_dim` numbers of each row, re-normalized to unit length where asked."""
    if truncate_dim is None or truncate_dim >= vectors.shape[1]:
        return vectors
    out = np.array(vectors[:, :truncate_dim], dtype=np.float32)  # a copy: the caller's array is never changed
    if renormalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


def calibration_ranges(calibration: np.ndarray, truncate_dim: int | None, renormalize: bool) -> Ranges:
    """Ranges of the calibration vectors after the same truncation and normalization as the request's."""
    shaped = truncate(np.asarray(calibration, dtype=np.float32), truncate_dim, renormalize)
    low, high = shaped.min(axis=0), shaped.max(axis=0)
    return Ranges(starts=low.astype(np.float32), steps=((high - low) / 255.0).astype(np.float32))


def quantize(vectors: np.ndarray, precision: str, ranges: Ranges | None = None) -> np.ndarray:
    """float32 rows -> `precision` (see the module doc). int8/uint8 need `ranges`."""
    if precision == "float32":
        return vectors
    if precision in ("binary", "ubinary"):
        packed = np.packbits(vectors > 0, axis=-1)
        return (packed.astype(np.int16) - 128).astype(np.int8) if precision == "binary" else packed
    if ranges is None:
        raise InvalidInputError(f"precision {precision!r} needs calibration ranges: re-export the model with "
                                "`corom export` (artifacts exported before vector quantization lack them)")
    steps = np.where(ranges.steps > 0, ranges.steps, 1.0)
    # floor before the shift, as sentence-transformers does: a cast after `- 128` truncates toward zero
    # and put every negative int8 level one above its own
    levels = np.clip(np.floor((vectors - ranges.starts) / steps), 0.0, 255.0)
    return levels.astype(np.uint8) if precision == "uint8" else (levels - 128.0).astype(np.int8)


def shape_vectors(vectors: np.ndarray, truncate_dim: int | None = None, renormalize: bool = False,
                  precision: str = "float32", ranges: Ranges | None = None) -> np.ndarray:
    """Truncate, re-normalize, quantize: the one order every entry point applies."""
    return quantize(truncate(vectors, truncate_dim, renormalize), precision, ranges)
