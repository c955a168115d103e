"""OpenVINO static int8 (NNCF post-training quantization), for CPUs with VNNI / AMX.

Static scales make the int8 graph batch-invariant: an activation's scale no longer depends on the
rest of the batch. Calibrated on the calibration corpus, disjoint from the parity and benchmark text.

The recipe (measured on all-MiniLM-L6-v2 against PyTorch on the parity corpus; README has the table):
int8 covers the attention's Q, K and V projections, SmoothQuant-rescaled (alpha 0.5): min cos 0.9954,
top-10 0.976 on an Intel Xeon with AMX. Left in the engine's float precision:
- the attention output projection (quantized too: min cos 0.9924, and top-10 0.928 instead of 0.9665
  on a test BERT with random weights);
- the FFN MatMuls: they read LayerNorm and GELU outputs whose few outlier channels a per-tensor int8
  scale cannot hold (quantizing the FFN input too: top-10 0.958);
- the attention's activation-by-activation products (Q.K^T, P.V): quantized, 32 texts of 29-32 tokens
  fell to cos 0.61 when the graph ran in bf16 on an Intel Xeon with AMX.

The "full" recipe (`ov-int8-fast`, the `fast` fidelity tier) quantizes every weight MatMul as the peers
do (NNCF's transformer preset, its own SmoothQuant), the attention's activation products excepted.
Measured on an AMD EPYC Zen 5 (bf16 for the rest) against PyTorch on the parity corpus, calibrated on
the whole calibration corpus: min cos 0.9735, top-10 0.9375, retrieval nDCG@10 0.9987, STSb 0.8674 (fp32
0.8672): the `fast` tier. On 300 calibration texts: min cos 0.9545, top-10 0.932; with the activation
products quantized too (what the peer ships): min cos 0.952, top-10 0.9325.
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


def attention_output_matmuls(model: onnx.ModelProto, hidden: int) -> list[str]:
    """The [hidden, hidden] MatMuls fed by the attention's context (P.V, through its Transpose and
    Reshape), i.e. the attention output projections: found by structure, whatever the node names."""
    producer = {out: node for node in model.graph.node for out in node.output}
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    context = set(activation_matmuls(model))

    def fed_by_context(name: str, depth: int = 3) -> bool:
        node = producer.get(name)
        if node is None or depth < 0:
            return False
        return node.name in context or (node.op_type in ("Transpose", "Reshape")
                                        and fed_by_context(node.input[0], depth - 1))

    return [n.name for n in model.graph.node if n.op_type == "MatMul"
            and any(shapes.get(i) == (hidden, hidden) for i in n.input) and fed_by_context(n.input[0])]


def not_quantized(model: onnx.ModelProto, hidden: int, intermediate: int) -> list[str]:
    """What the recipe leaves in float; refuses a graph whose FFN MatMuls or attention output
    projections it cannot find (by weight shape and structure), rather than quantizing them blindly."""
    ffn_in, ffn_out = ffn_matmuls_by_weight(model, hidden, intermediate)
    attention_out = attention_output_matmuls(model, hidden)
    if not ffn_in or not ffn_out or len(attention_out) != len(ffn_in):
        raise ValueError(f"found {len(ffn_in)} FFN input, {len(ffn_out)} FFN output and {len(attention_out)} attention "
                         f"output MatMuls (weights [{hidden}, {intermediate}], [{intermediate}, {hidden}], [{hidden}, "
                         f"{hidden}]) in this graph: the OpenVINO int8 recipe keeps them in float and will not "
                         "quantize a graph it does not recognise")
    return ffn_in + ffn_out + attention_out + activation_matmuls(model)


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


# recipe -> (SmoothQuant alpha for MatMuls, None: NNCF's transformer preset default; what stays in float)
RECIPES = {
    "qkv": SMOOTH_QUANT_ALPHA,
    "full": None,
}


def kept_in_float(model: onnx.ModelProto, recipe: str, hidden: int, intermediate: int) -> list[str]:
    """The MatMuls a recipe leaves in the engine's float precision (`RECIPES`)."""
    if recipe == "full":
        return activation_matmuls(model)
    if recipe == "qkv":
        return not_quantized(model, hidden, intermediate)
    raise ValueError(f"unknown OpenVINO int8 recipe {recipe!r}; known: {sorted(RECIPES)}")


def write_ov_int8(plain: Path, out_xml: Path, calibration: list[dict[str, np.ndarray]], hidden: int,
                  intermediate: int, recipe: str = "qkv") -> dict:
    """Quantize the plain fp32 graph with NNCF and save OpenVINO IR (.xml + .bin): `recipe` "qkv"
    (`ov-int8`: Q/K/V only) or "full" (`ov-int8-fast`: every weight MatMul).

    Returns the recipe record for the manifest.
    """
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    verbose = logging.getLogger().isEnabledFor(logging.INFO)
    if not verbose:  # NNCF's per-node chatter and progress bars only under -v: export prints one line a step
        nncf.set_log_level(logging.WARNING)
    ignored = kept_in_float(onnx.load(str(plain), load_external_data=False), recipe, hidden, intermediate)
    alpha = RECIPES[recipe]
    start = time.perf_counter()
    model = ov.Core().read_model(str(plain))
    with contextlib.ExitStack() as quiet:
        if not verbose:
            quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
            quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
        quantized = nncf.quantize(
            model, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration),
            ignored_scope=nncf.IgnoredScope(names=ignored),
            **({} if alpha is None else {"advanced_parameters": AdvancedQuantizationParameters(
                smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=alpha))}),
        )
    # keep the fp32 weights of what stays unquantized: fp16 storage would round them twice
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    seconds = time.perf_counter() - start
    log.info("NNCF quantized %s in %.1fs, %d MatMuls left unquantized", plain.name, seconds, len(ignored))
    return {"tool": "nncf.quantize", "model_type": "transformer", "recipe": recipe,
            "smooth_quant_alpha": alpha if alpha is not None else "nncf transformer default",
            "calibration_texts": len(calibration), "calibration": "corpora/calibration.json, one text a sample",
            "not_quantized": ignored, "seconds": round(seconds, 1)}
