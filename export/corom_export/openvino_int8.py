"""OpenVINO static int8 (NNCF post-training quantization), for CPUs with VNNI / AMX.

Static scales make the int8 graph batch-invariant: an activation's scale no longer depends on the
rest of the batch. Calibrated on the calibration corpus, disjoint from the parity and benchmark text.

The recipe (measured on all-MiniLM-L6-v2 against PyTorch on the parity corpus; README has the table):
int8 covers the attention's Q, K, V and output projections, SmoothQuant-rescaled (alpha 0.5). Left in
the engine's float precision:
- the FFN MatMuls: they read LayerNorm and GELU outputs whose few outlier channels a per-tensor int8
  scale cannot hold (quantizing the FFN input too: top-10 0.958 instead of 0.975);
- the attention's activation-by-activation products (Q.K^T, P.V): quantized, 32 texts of 29-32 tokens
  fell to cos 0.61 when the graph ran in bf16 on an Intel Xeon with AMX.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from pathlib import Path

import numpy as np
import onnx

from .int8 import ffn_matmuls_by_weight

log = logging.getLogger(__name__)

SMOOTH_QUANT_ALPHA = 0.5  # measured: 0.5 top-10 0.975; NNCF's default 0.95: 0.9705 and min cos 0.9899


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMuls with no constant operand: the attention's Q.K^T and P.V."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not any(i in constants for i in n.input)]


def not_quantized(model: onnx.ModelProto, hidden: int, intermediate: int) -> list[str]:
    """What the recipe leaves in float; refuses a graph whose FFN MatMuls it cannot find (by weight
    shape), rather than quantizing everything silently."""
    ffn_in, ffn_out = ffn_matmuls_by_weight(model, hidden, intermediate)
    if not ffn_in or not ffn_out:
        raise ValueError(f"no FFN MatMul with a [{hidden}, {intermediate}] / [{intermediate}, {hidden}] weight in "
                         "this graph: the OpenVINO int8 recipe keeps them in float and will not quantize them blindly")
    return ffn_in + ffn_out + activation_matmuls(model)


def calibration_inputs(tokenizer_file: Path, max_length: int, n: int | None = None,
                       pad_id: int = 0) -> list[dict[str, np.ndarray]]:
    """The calibration corpus (every kind of text, none of it evaluated), one unpadded text per sample:
    padding positions carry activations no real token has, and would widen the ranges."""
    from corom_runtime.batching import pad_batch
    from corom_runtime.tokenization import TextTokenizer

    from .corpus import calibration_texts

    items = TextTokenizer.from_file(tokenizer_file, max_length).encode(calibration_texts(n))
    out = []
    for item in items:
        ids, mask = pad_batch([item], pad_id)
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def write_ov_int8(plain: Path, out_xml: Path, calibration: list[dict[str, np.ndarray]], hidden: int,
                  intermediate: int) -> dict:
    """Quantize the plain fp32 graph with NNCF and save OpenVINO IR (.xml + .bin).

    Returns the recipe record for the manifest.
    """
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    verbose = logging.getLogger().isEnabledFor(logging.INFO)
    if not verbose:  # NNCF's per-node chatter and progress bars only under -v: export prints one line a step
        nncf.set_log_level(logging.WARNING)
    ignored = not_quantized(onnx.load(str(plain), load_external_data=False), hidden, intermediate)
    start = time.perf_counter()
    model = ov.Core().read_model(str(plain))
    with contextlib.ExitStack() as quiet:
        if not verbose:
            quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
            quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
        quantized = nncf.quantize(
            model, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration),
            ignored_scope=nncf.IgnoredScope(names=ignored),
            advanced_parameters=AdvancedQuantizationParameters(
                smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=SMOOTH_QUANT_ALPHA)),
        )
    # keep the fp32 weights of what stays unquantized: fp16 storage would round them twice
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    seconds = time.perf_counter() - start
    log.info("NNCF quantized %s in %.1fs, %d MatMuls left unquantized", plain.name, seconds, len(ignored))
    return {"tool": "nncf.quantize", "model_type": "transformer", "smooth_quant_alpha": SMOOTH_QUANT_ALPHA,
            "calibration_texts": len(calibration), "calibration": "corpora/calibration.json, one text a sample",
            "not_quantized": ignored, "seconds": round(seconds, 1)}
