"""SmoothQuant-style rescaling of MatMul inputs, so that int8 can cover the FFN too.

A few channels of the FFN inputs (LayerNorm outputs) and of the FFN hidden states (GELU outputs)
carry activations 10-100x larger than the rest. With one scale per tensor, int8 spends its range on
them. Dividing input channel j by s_j and multiplying weight row j by s_j leaves the product
unchanged and moves the difficulty into the weights, which are quantized per channel:
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (Xiao et al., 2023). The division is an explicit Mul
in front of the MatMul, because the LayerNorm output also feeds the residual path unscaled.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)


def activation_absmax(model_path: Path, tensors: list[str], batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-channel max |x| of the named intermediate tensors over real-text batches."""
    model = onnx.load(str(model_path))
    for name in tensors:
        model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the tensors addressable
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    absmax: dict[str, np.ndarray] = {}
    for ids, mask in batches:
        outs = session.run(tensors, {"input_ids": ids, "attention_mask": mask})
        keep = mask.reshape(-1).astype(bool)
        for name, value in zip(tensors, outs):
            rows = np.abs(value.reshape(-1, value.shape[-1])[keep])  # padding rows do not count
            cur = rows.max(axis=0)
            absmax[name] = np.maximum(absmax[name], cur) if name in absmax else cur
    return absmax


def smooth(model_path: Path, out_path: Path, matmuls: list[str], batches, alpha: float = 0.5) -> dict[str, float]:
    """Write a copy of the model with the inputs of `matmuls` rescaled; returns max scale per node."""
    model = onnx.load(str(model_path))
    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    targets = [nodes[m] for m in matmuls]
    absmax = activation_absmax(model_path, sorted({n.input[0] for n in targets}), batches)
    report = {}
    for node in targets:
        x_name, w_name = node.input[0], node.input[1]
        weight = numpy_helper.to_array(inits[w_name]).astype(np.float32)  # [in, out]
        x_max = np.maximum(absmax[x_name], 1e-5)
        w_max = np.maximum(np.abs(weight).max(axis=1), 1e-5)
        scale = (x_max ** alpha / w_max ** (1 - alpha)).astype(np.float32)
        scale = np.clip(scale, 1e-2, 1e3)
        inits[w_name].CopyFrom(numpy_helper.from_array((weight * scale[:, None]).astype(np.float32), w_name))
        inv_name = f"{node.name}_smooth_inv_scale"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inv_name))
        scaled = f"{x_name}_smoothed_for_{node.name}"
        model.graph.node.insert(list(model.graph.node).index(node),
                                helper.make_node("Mul", [x_name, inv_name], [scaled], name=f"{node.name}_smooth"))
        node.input[0] = scaled
        report[node.name] = float(scale.max())
    onnx.save(model, str(out_path))
    return report
