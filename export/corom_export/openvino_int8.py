"""OpenVINO static int8 (NNCF post-training quantization), for CPUs with VNNI / AMX.

Static scales make the int8 graph batch-invariant: an activation's scale no longer depends on the
rest of the batch (ONNX Runtime's dynamic int8 takes one scale per tensor, for the whole batch).
Calibrated on real text from the calibration split, disjoint from the parity and benchmark text.

The FFN output projections read GELU outputs whose outlier channels a per-tensor int8 scale cannot
hold; they are found by graph structure (a MatMul fed by the GELU's product) and left to run in bf16.
Measured recipes: see the README's Pareto table and `corom verify`'s figures in the manifest.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnx

log = logging.getLogger(__name__)

CALIBRATION_TEXTS = 300
CALIBRATION_BATCH = 8


def ffn_output_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMuls fed by an exact (Erf) GELU in a plain BERT export.

    GELU is exported as x * 0.5 * (1 + erf(x / sqrt 2)): the FFN output MatMul's input is a Mul with
    an Erf two or three producers upstream. Found by structure, not by node names, so it holds for
    any checkpoint naming.
    """
    producer = {out: node for node in model.graph.node for out in node.output}

    def has_erf_upstream(name: str, depth: int) -> bool:
        node = producer.get(name)
        if node is None or depth < 0:
            return False
        return node.op_type == "Erf" or any(has_erf_upstream(i, depth - 1) for i in node.input)

    out = []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        src = producer.get(node.input[0])
        if src is not None and src.op_type == "Mul" and has_erf_upstream(node.input[0], 3):
            out.append(node.name)
    return out


def calibration_inputs(tokenizer_file: Path, max_length: int, n: int = CALIBRATION_TEXTS,
                       batch: int = CALIBRATION_BATCH, pad_id: int = 0) -> list[dict[str, np.ndarray]]:
    """Length-sorted batches of calibration-split text: long and mixed passages, queries and one-to-four
    word snippets, padded per batch as the runtime pads them.

    Measured (all-MiniLM-L6-v2, no-FFN-out recipe): without the snippets a 3-token text fell to cos
    0.975; with them the mixed-length parity corpus keeps min cos 0.986 and top-10 0.958."""
    from corom_runtime.batching import pad_batch, plan_batches
    from corom_runtime.tokenization import TextTokenizer

    from .corpus import build_corpus, snippets

    long = build_corpus(n_queries=n // 10, n_passages=n // 2, seed=1234, split="calibration", workload="long")
    mixed = build_corpus(n_queries=0, n_passages=n // 2, seed=4321, split="calibration", workload="mixed")
    texts = long.queries + long.passages + mixed.passages + snippets(n // 2)
    items = TextTokenizer.from_file(tokenizer_file, max_length).encode(texts)
    out = []
    for idx in plan_batches([i.length for i in items], batch):
        ids, mask = pad_batch([items[i] for i in idx], pad_id)
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def write_ov_int8(plain: Path, out_xml: Path, calibration: list[dict[str, np.ndarray]],
                  keep_ffn_out: bool = True) -> dict:
    """Quantize the plain fp32 graph with NNCF (transformer preset) and save OpenVINO IR (.xml + .bin).

    Returns the recipe record for the manifest.
    """
    import nncf
    import openvino as ov

    ignored = ffn_output_matmuls(onnx.load(str(plain), load_external_data=False)) if keep_ffn_out else []
    start = time.perf_counter()
    model = ov.Core().read_model(str(plain))
    quantized = nncf.quantize(
        model, nncf.Dataset(calibration), model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(calibration), ignored_scope=nncf.IgnoredScope(names=ignored) if ignored else None,
    )
    # keep the fp32 weights of what stays unquantized: fp16 storage would round them twice
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    seconds = time.perf_counter() - start
    log.info("NNCF quantized %s in %.1fs, %d MatMuls left unquantized", plain.name, seconds, len(ignored))
    return {"tool": "nncf.quantize", "model_type": "transformer", "calibration_batches": len(calibration),
            "calibration_texts": sum(len(b["input_ids"]) for b in calibration), "calibration_split": "calibration",
            "not_quantized": ignored, "seconds": round(seconds, 1)}
