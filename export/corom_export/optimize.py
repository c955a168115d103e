"""Graph optimisation with ONNX Runtime's BERT fusions (Attention, SkipLayerNorm, BiasGelu, ...)."""

from __future__ import annotations

import logging
from pathlib import Path

from onnxruntime.transformers.onnx_model import OnnxModel
from onnxruntime.transformers.optimizer import optimize_model

log = logging.getLogger(__name__)

# Fusions an optimised BERT graph must contain; fewer means the pattern matching missed something
# and the "optimised" model would be silently slow.
REQUIRED_FUSIONS = ("Attention", "SkipLayerNormalization")


def fuse(plain: Path, num_heads: int, hidden_size: int, num_layers: int, model_type: str = "bert") -> OnnxModel:
    """Fuse the plain export; raise if a layer's attention or LayerNorm was not fused."""
    model = optimize_model(str(plain), model_type=model_type, num_heads=num_heads, hidden_size=hidden_size)
    stats = model.get_fused_operator_statistics()
    log.info("fusions: %s", {k: v for k, v in stats.items() if v})
    if stats.get("Attention", 0) + stats.get("MultiHeadAttention", 0) < num_layers:
        raise RuntimeError(f"attention fused in fewer than {num_layers} layers: {stats}")
    if stats.get("SkipLayerNormalization", 0) < num_layers:
        raise RuntimeError(f"SkipLayerNormalization fused in fewer than {num_layers} layers: {stats}")
    return model


def write_fp16(fused: OnnxModel, path: Path) -> None:
    """fp16 weights and compute, fp32 inputs/outputs.

    Converting *after* fusion keeps LayerNorm inside SkipLayerNormalization kernels (which
    accumulate in fp32) instead of as decomposed fp16 ops (cos 0.83-0.90 when done naively).
    The pooling tail (ReduceSum/Div/ReduceL2) stays fp32: sums over 128 tokens overflow fp16 range.
    """
    fused.convert_float_to_float16(
        keep_io_types=True,
        op_block_list=["ReduceSum", "ReduceL2", "Div", "Clip", "Expand", "Softmax", "Erf", "Pow", "Sqrt"],
    )
    fused.save_model_to_file(str(path))
