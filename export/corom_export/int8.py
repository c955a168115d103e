"""int8 quantization of the fused graph, for CPUs (AVX-512 VNNI / AVX2).

The default recipe, "nbits8", stores the MatMul weights (attention output, FFN in and out) as 8-bit
blocks of 32 (ONNX Runtime's MatMulNBits) and quantizes activations per token and block at run time
(accuracy level 4): no scale is shared across the batch, so a text's vector does not depend on its
batch mates, and no calibration range can be exceeded by an outlier. Measured on the parity corpus
(README, "Parity"). The dynamic recipes below are kept as options.

The FFN inputs read LayerNorm outputs, and the FFN outputs GELU outputs, with a few huge outlier
channels: a per-tensor (per-batch) activation scale cannot hold both the outliers and the rest, which
is why the dynamic recipes keep some FFN MatMuls in fp32. Measurements: docs/decisions.md.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_dynamic, quantize_static)

from corom_runtime.catalog import INT8_RECIPES as RECIPES

log = logging.getLogger(__name__)

NBITS_BLOCK = 32  # block 128 sat too close to the top-10 gate (docs/decisions.md)
SMOOTH_ALPHA = 0.7  # the best of 0.3/0.5/0.7/0.85 measured (docs/decisions.md)


def excluded_nodes(model: onnx.ModelProto, recipe: str, hidden: int, intermediate: int) -> list[str]:
    if recipe not in RECIPES:
        raise ValueError(f"int8 recipe must be one of {RECIPES}, got {recipe!r}")
    ffn_in, ffn_out = ffn_matmuls_by_weight(model, hidden, intermediate)
    if recipe == "nbits8":
        return []
    if recipe == "attention":
        return ffn_in + ffn_out
    if recipe in ("no-ffn-out", "smooth"):
        return ffn_out
    return []


def write_int8_dynamic(fused: Path, out: Path, recipe: str, hidden: int, intermediate: int,
                       calibration: Iterable[tuple[np.ndarray, np.ndarray]] | None = None) -> list[str]:
    """Dynamic quantization (s8 per-channel weights, u8 activations scaled per batch).

    The "smooth" recipe first rescales the FFN inputs with activation ranges measured on
    `calibration` batches (see `smooth.py`).
    """
    model = onnx.load(str(fused), load_external_data=False)
    if recipe == "nbits8":
        return write_int8_nbits(model, out)
    exclude = excluded_nodes(model, recipe, hidden, intermediate)
    source = fused
    if recipe == "smooth":
        if calibration is None:
            raise ValueError("the smooth recipe needs calibration batches of real text")
        from .smooth import smooth

        ffn_in, _ = ffn_matmuls_by_weight(model, hidden, intermediate)
        source = out.with_suffix(".smoothed.onnx")
        smooth(fused, source, ffn_in, calibration, alpha=SMOOTH_ALPHA)
    try:
        _quantize(source, out, exclude)
    finally:
        if source != fused:
            source.unlink(missing_ok=True)
    return exclude


def write_int8_nbits(model: onnx.ModelProto, out: Path, block_size: int = NBITS_BLOCK) -> list[str]:
    """8-bit blockwise weights with per-token int8 activations (MatMulNBits, accuracy level 4).

    Returns the nodes kept in float: none of the MatMuls (the fused Attention's own QKV product stays
    fp32: MatMulNBits covers MatMul nodes only)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=4, bits=8)
    quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, is_symmetric=True, accuracy_level=4,
                                     algo_config=config)
    quantizer.process()
    if not any(node.op_type == "MatMulNBits" for node in quantizer.model.model.graph.node):
        raise ValueError("no MatMul of this graph could be stored as MatMulNBits: refusing to write an "
                         "unquantized graph as int8")
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    return []


def _quantize(source: Path, out: Path, exclude: list[str]) -> None:
    quantize_dynamic(
        str(source), str(out), per_channel=True, weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude,
        # the fused graph's com.microsoft ops defeat shape inference; their outputs are float
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


class _TextBatches(CalibrationDataReader):
    def __init__(self, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
        self._it = iter(batches)

    def get_next(self) -> dict | None:
        nxt = next(self._it, None)
        return None if nxt is None else {"input_ids": nxt[0], "attention_mask": nxt[1]}


def ffn_matmuls_by_weight(model: onnx.ModelProto, hidden: int, intermediate: int) -> tuple[list[str], list[str]]:
    """FFN input ([hidden, intermediate] weight) and output ([intermediate, hidden]) MatMuls, found by the
    shapes of their weights: the same in every family and in the plain and fused graphs, whatever the
    node names or the GELU form (erf or tanh). The one FFN detector of every int8 recipe."""
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    ffn_in, ffn_out = [], []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        weight = next((shapes[i] for i in node.input if i in shapes), None)
        if weight == (hidden, intermediate):
            ffn_in.append(node.name)
        elif weight == (intermediate, hidden):
            ffn_out.append(node.name)
    return ffn_in, ffn_out


def write_int8_static(plain: Path, out: Path, batches: Iterable[tuple[np.ndarray, np.ndarray]],
                      recipe: str, hidden: int, intermediate: int) -> list[str]:
    """Static QDQ quantization calibrated on real text (percentile ranges clip rare outliers).

    Runs on the plain graph: ONNX Runtime folds the QDQ pairs into QLinear kernels at load time.
    """
    model = onnx.load(str(plain), load_external_data=False)
    if recipe == "smooth":
        raise ValueError("the smooth recipe is for dynamic quantization; use attention, no-ffn-out or full")
    ffn_in, ffn_out = ffn_matmuls_by_weight(model, hidden, intermediate)
    exclude = [] if recipe == "full" else ffn_out + (ffn_in if recipe == "attention" else [])
    quantize_static(
        str(plain), str(out), _TextBatches(batches), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
        nodes_to_exclude=exclude, calibrate_method=CalibrationMethod.Percentile,
        extra_options={"CalibPercentile": 99.99},
    )
    return exclude
