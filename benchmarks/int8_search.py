"""The search for a faithful int8 that pays (issue 28): NNCF recipes on the plain graph, each judged on
the parity corpus and timed beside the shipped OpenVINO variants in one run.

`python -m benchmarks.int8_search --artifact A [--recipes NAME ...] [--rounds 3]`. Every recipe
quantizes the artifact's plain fp32 graph with NNCF (static int8, calibrated on the calibration corpus
only; the rest runs in bf16 where the CPU has it), then:
- parity against the artifact's `fp32` variant (itself min cos 1.000000 against PyTorch) on the parity
  corpus (200 queries, 2,000 passages): min cosine, 1st-percentile cosine, top-10 agreement (the gates'
  own functions);
- speed: 500 long passages in length-sorted batches of 32 and single queries (tokenized, session only),
  every recipe and `ov-int8` / `ov-int8-fast` in one process, rounds interleaved, median.

One idea is new here: the outlier split (LLM.int8()'s decomposition). The FFN inputs read LayerNorm
outputs whose largest channel reaches 14-30 where the median channel's maximum is ~2 (measured on the
calibration corpus), so one per-tensor int8 scale is 4-15x coarser than the rest need. The split
rewrites `X.W` as `(X * mask).W` (int8, the outlier channels zeroed) `+ X[:, idx].W[idx, :]` (float,
a few channels): the int8 scale then covers the rest only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

RESULTS = Path(__file__).resolve().parent / "results" / "tiers"
KINDS = ("qkv", "attention-out", "ffn-in", "ffn-out")


@dataclass(frozen=True)
class Recipe:
    """What is int8 (`kinds`), SmoothQuant's alpha (None: NNCF's transformer default, -1: off), the
    outlier split (a channel whose calibration max exceeds `split_ratio` x the median channel's, at
    most `split_max` per input; 0: no split), NNCF's activation range estimator, calibration size."""

    kinds: tuple[str, ...]
    alpha: float | None = None
    split_ratio: float = 0.0
    split_max: int = 8
    minmax: bool = False
    calibration: int | None = 300  # None: the whole calibration corpus (925 texts)
    # "split": outliers through a float MatMul beside the int8 one; "duplicate": outlier channel
    # splitting (each outlier channel repeated, its copies scaled down, in the one int8 MatMul)
    split_how: str = "split"


RECIPES = {
    "full": Recipe(KINDS),
    "full+split": Recipe(KINDS, split_ratio=6.0),
    "full+split3": Recipe(KINDS, split_ratio=3.0),
    "full+split3 sq0.5": Recipe(KINDS, alpha=0.5, split_ratio=3.0),
    "all but ffn-out, split3": Recipe(("qkv", "attention-out", "ffn-in"), split_ratio=3.0),
    "full+dup3": Recipe(KINDS, split_ratio=3.0, split_how="duplicate"),
    "full+dup3 sq0.5": Recipe(KINDS, alpha=0.5, split_ratio=3.0, split_how="duplicate"),
    "full+dup2 all-cal": Recipe(KINDS, split_ratio=2.0, split_max=16, split_how="duplicate", calibration=None),
    "all but ffn-out, dup3": Recipe(("qkv", "attention-out", "ffn-in"), split_ratio=3.0, split_how="duplicate"),
    "qkv+ffn-in sq0.5 dup3": Recipe(("qkv", "ffn-in"), alpha=0.5, split_ratio=3.0, split_how="duplicate"),
    "qkv+ffn-in sq0.5": Recipe(("qkv", "ffn-in"), alpha=0.5),
    "qkv+ffn-in sq0.5 split3": Recipe(("qkv", "ffn-in"), alpha=0.5, split_ratio=3.0),
    "qkv+ffn-in sq0.5 split3 all-cal": Recipe(("qkv", "ffn-in"), alpha=0.5, split_ratio=3.0, calibration=None),
    "qkv+ffn-in sq0.5 split3 minmax all-cal": Recipe(("qkv", "ffn-in"), alpha=0.5, split_ratio=3.0, minmax=True,
                                                     calibration=None),
}


def matmul_kinds(model: onnx.ModelProto, hidden: int, intermediate: int) -> dict[str, str]:
    """Each weight MatMul's kind (`KINDS`), found by weight shape and structure, not by name."""
    from corom_export.int8 import ffn_matmuls_by_weight
    from corom_export.openvino_int8 import activation_matmuls, attention_output_matmuls

    ffn_in, ffn_out = ffn_matmuls_by_weight(model, hidden, intermediate)
    attention_out = set(attention_output_matmuls(model, hidden))
    activations = set(activation_matmuls(model))
    kinds = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.name in activations:
            continue
        kinds[node.name] = ("ffn-in" if node.name in ffn_in else "ffn-out" if node.name in ffn_out
                            else "attention-out" if node.name in attention_out else "qkv")
    return kinds


def channel_maxabs(model: onnx.ModelProto, inputs: list[str], calibration: list[dict[str, np.ndarray]]) -> dict:
    """The largest |activation| of each channel of each tensor in `inputs`, over the calibration texts."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in inputs:
        probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name for i in session.get_inputs()}
    out: dict[str, np.ndarray] = {}
    for sample in calibration:
        for name, value in zip(inputs, session.run(inputs, {k: v for k, v in sample.items() if k in feeds})):
            peak = np.abs(value).reshape(-1, value.shape[-1]).max(0)
            out[name] = np.maximum(out.get(name, peak), peak)
    return out


def outlier_channels(maxabs: np.ndarray, ratio: float, most: int) -> list[int]:
    """The channels whose maximum exceeds `ratio` x the median channel's, the largest `most` of them.

    >>> outlier_channels(np.array([1.0, 1.0, 9.0, 1.2, 30.0]), 6.0, 8)
    [2, 4]
    """
    if ratio <= 0:
        return []
    median = float(np.median(maxabs))
    return sorted(int(i) for i in np.argsort(-maxabs)[:most] if maxabs[i] > ratio * median)


def rewrite_matmuls(model: onnx.ModelProto, picks: dict[str, list[int]], per_input, per_matmul) -> None:
    """The walk both rewrites share: each MatMul named in `picks` (name -> channels of its input) is
    replaced by `per_matmul(node, idx, made)`'s nodes, where `made` is what `per_input(x, w, idx)`
    returned (its nodes, then that value) the first time a picked MatMul read input `x`: MatMuls
    reading the same input share its rewrite."""
    made: dict[str, object] = {}
    nodes = []
    for node in list(model.graph.node):
        idx = picks.get(node.name) or []
        if not idx:
            nodes.append(node)
            continue
        x, w = node.input
        if x not in made:
            extra, made[x] = per_input(x, w, idx)
            nodes += extra
        nodes += per_matmul(node, idx, made[x])
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def split_outliers(model: onnx.ModelProto, picks: dict[str, list[int]]) -> list[str]:
    """Rewrite each MatMul in `picks` (name -> outlier channels of its input) as the int8-friendly
    inliers' product plus the outliers' float product; returns the float MatMuls' names (for NNCF's
    ignored scope). MatMuls reading the same input share its mask and gather."""
    weights = {i.name: i for i in model.graph.initializer}
    floats: list[str] = []

    def per_input(x: str, w: str, idx: list[int]):
        mask = np.ones(weights[w].dims[0], np.float32)
        mask[idx] = 0
        model.graph.initializer.extend([numpy_helper.from_array(mask, f"{x}/inlier_mask"),
                                        numpy_helper.from_array(np.array(idx, np.int64), f"{x}/outlier_index")])
        return [helper.make_node("Mul", [x, f"{x}/inlier_mask"], [f"{x}/inliers"], name=f"{x}/inlier_Mul"),
                helper.make_node("Gather", [x, f"{x}/outlier_index"], [f"{x}/outliers"],
                                 name=f"{x}/outlier_Gather", axis=2)], (f"{x}/inliers", f"{x}/outliers")

    def per_matmul(node, idx: list[int], made):
        (inliers, outliers), w = made, node.input[1]
        rows = numpy_helper.to_array(weights[w])[idx, :].astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(rows, f"{w}/outlier_rows"))
        y = node.output[0]
        node.input[0], node.output[0] = inliers, f"{y}/inlier_part"
        floats.append(f"{node.name}/outlier_MatMul")
        return [node,
                helper.make_node("MatMul", [outliers, f"{w}/outlier_rows"], [f"{y}/outlier_part"],
                                 name=f"{node.name}/outlier_MatMul"),
                helper.make_node("Add", [f"{y}/inlier_part", f"{y}/outlier_part"], [y], name=f"{node.name}/outlier_Add")]

    rewrite_matmuls(model, picks, per_input, per_matmul)
    return floats


def duplicate_outliers(model: onnx.ModelProto, picks: dict[str, list[int]], maxabs: dict[str, np.ndarray],
                       target_ratio: float) -> list[str]:
    """Outlier channel splitting: each MatMul in `picks` reads `Gather(X, order) * scale` where every
    outlier channel j appears s_j times, each copy scaled by 1/s_j (s_j = its max over `target_ratio` x
    the median channel's max, rounded up), and its weight rows repeat to match: the same product in
    float, one int8 MatMul, K grown by the copies. Returns [] (no MatMul is left in float)."""
    weights = {i.name: i for i in model.graph.initializer}

    def per_input(x: str, w: str, idx: list[int]):
        peak = maxabs[x]
        limit = target_ratio * float(np.median(peak))
        copies = {j: int(np.ceil(peak[j] / limit)) for j in idx}
        order = np.concatenate([np.arange(len(peak)), [j for j in idx for _ in range(copies[j] - 1)]]).astype(np.int64)
        scale = np.array([1.0 / copies.get(int(j), 1) for j in order], np.float32)
        model.graph.initializer.extend([numpy_helper.from_array(order, f"{x}/split_order"),
                                        numpy_helper.from_array(scale, f"{x}/split_scale")])
        return [helper.make_node("Gather", [x, f"{x}/split_order"], [f"{x}/split_gathered"],
                                 name=f"{x}/split_Gather", axis=2),
                helper.make_node("Mul", [f"{x}/split_gathered", f"{x}/split_scale"], [f"{x}/split"],
                                 name=f"{x}/split_Mul")], (f"{x}/split", order)

    def per_matmul(node, idx: list[int], made):
        (split, order), w = made, node.input[1]
        rows = numpy_helper.to_array(weights[w])[order, :].astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(rows, f"{w}/split_rows"))
        node.input[0], node.input[1] = split, f"{w}/split_rows"
        return [node]

    rewrite_matmuls(model, picks, per_input, per_matmul)
    return []


def quantize(plain: Path, tokenizer: Path, max_length: int, recipe: Recipe, hidden: int, intermediate: int,
             out_xml: Path) -> dict:
    """NNCF static int8 of `plain` by `recipe`, saved as OpenVINO IR; returns what it did."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    from corom_export.openvino_int8 import activation_matmuls, calibration_inputs

    nncf.set_log_level(logging.WARNING)
    model = onnx.load(str(plain))
    kinds = matmul_kinds(model, hidden, intermediate)
    calibration = calibration_inputs(tokenizer, max_length, recipe.calibration)
    floats: list[str] = []
    split = {}
    if recipe.split_ratio > 0:
        quantized = [n for n in model.graph.node if kinds.get(n.name) in recipe.kinds]
        maxabs = channel_maxabs(model, sorted({n.input[0] for n in quantized}), calibration)
        split = {n.name: outlier_channels(maxabs[n.input[0]], recipe.split_ratio, recipe.split_max) for n in quantized}
        floats = (split_outliers(model, split) if recipe.split_how == "split"
                  else duplicate_outliers(model, split, maxabs, recipe.split_ratio))
    kept = [name for name, kind in kinds.items() if kind not in recipe.kinds]
    advanced = {}
    if recipe.alpha is not None:
        advanced["smooth_quant_alphas"] = AdvancedSmoothQuantParameters(matmul=recipe.alpha)
    if recipe.minmax:
        advanced["activations_range_estimator_params"] = RangeEstimatorParametersSet.MINMAX
    with tempfile.TemporaryDirectory() as tmp:
        rewritten = Path(tmp) / "split.onnx"
        onnx.save(model, str(rewritten))
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            result = nncf.quantize(ov.Core().read_model(str(rewritten)), nncf.Dataset(calibration),
                                   model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration),
                                   ignored_scope=nncf.IgnoredScope(names=activation_matmuls(model) + floats + kept),
                                   **({"advanced_parameters": AdvancedQuantizationParameters(**advanced)} if advanced else {}))
        ov.save_model(result, str(out_xml), compress_to_fp16=False)
    return {"seconds": round(time.perf_counter() - start, 1), "calibration_texts": len(calibration),
            "split_channels": sum(len(v) for v in split.values()), "float_matmuls": len(floats) + len(kept)}


def run(args: argparse.Namespace) -> dict:
    from corom_export.corpus import parity_corpus, workload_corpus
    from corom_runtime import Embedder
    from corom_runtime.engines.openvino import OpenVINOSession
    from corom_runtime.engines.settings import SessionSettings
    from corom_runtime.artifacts.artifact import load_artifact
    from corom_runtime.machine import cpu_model, cpuinfo_values
    from corom_runtime.parity import compare, cosine_rows
    from corom_runtime.tokenization import TextTokenizer

    artifact = load_artifact(args.artifact)
    arch = artifact.manifest.architecture or {}
    hidden, intermediate = int(arch["hidden"]), int(arch["intermediate"])
    tokenizer = TextTokenizer.from_file(artifact.tokenizer_path, artifact.max_length)
    corpus = parity_corpus(200, 2000)
    items = tokenizer.encode(corpus.queries + corpus.passages)
    reference = Embedder.load(artifact.path, variant="fp32", device="cpu", threads=args.threads, warmup=False,
                              verify_here=False).embed_tokenized(items)
    long = workload_corpus("long", 60, 500)
    passages, queries = tokenizer.encode(long.passages), tokenizer.encode(long.queries[:60])
    host = Embedder.load(artifact.path, variant="ov-int8", device="cpu", threads=args.threads, warmup=False,
                         verify_here=False)
    settings = SessionSettings(threads=args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="int8-search-"))
    models = {name: artifact.path / f"model.{name}.xml" for name in ("ov-int8", "ov-int8-fast")
              if (artifact.path / f"model.{name}.xml").exists()}
    rows: dict[str, dict] = {}
    for name in args.recipes:
        recipe = RECIPES[name]
        print(f"[int8-search] {name}: quantizing", file=sys.stderr, flush=True)
        models[name] = scratch / f"{len(rows)}.xml"
        rows[name] = {"recipe": asdict(recipe), **quantize(artifact.path / "model.fp32.onnx", artifact.tokenizer_path,
                                                           artifact.max_length, recipe, hidden, intermediate, models[name])}
    sessions = {name: OpenVINOSession(xml, "cpu", settings, "int8", artifact.max_length) for name, xml in models.items()}
    for name, session in sessions.items():
        host.session = session
        vectors = host.embed_tokenized(items)
        parity = compare(reference, vectors, len(corpus.queries), artifact.score)
        rows.setdefault(name, {"recipe": "shipped variant"}).update(
            min_cosine=parity.min_cosine, p1_cosine=float(np.percentile(cosine_rows(reference, vectors), 1)),
            top10_agreement=parity.top10_agreement)
        host.embed_tokenized(passages[:64])
    speeds: dict[str, list[float]] = {n: [] for n in sessions}
    latency: dict[str, list[float]] = {n: [] for n in sessions}
    for _ in range(args.rounds):
        for name, session in sessions.items():
            host.session = session
            start = time.perf_counter()
            host.embed_tokenized(passages)
            speeds[name].append(len(passages) / (time.perf_counter() - start))
            for q in queries:
                start = time.perf_counter()
                host.embed_tokenized([q])
                latency[name].append(time.perf_counter() - start)
    for name in sessions:
        rows[name].update(long_sent_per_s=float(np.median(speeds[name])),
                          query_p50_ms=float(np.median(latency[name]) * 1000))
    family = cpuinfo_values("cpu family")
    return {"cpu": cpu_model() + (f" (cpu family {family[0]})" if family else ""), "threads": args.threads, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "artifact": str(artifact.path), "rounds": args.rounds,
            "method": "parity against the artifact's fp32 variant on the parity corpus (200 queries, 2,000 passages); "
                      "speed: 500 long passages, length-sorted batches of 32, and 60 single queries, one process, "
                      "rounds interleaved, median", "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"# int8 search, {result['date']}", "",
             f"CPU: {result['cpu']}, {result['threads']} threads. {result['method']}.", "",
             "| recipe | min cos | p1 cos | top-10 | long sent/s | query p50 ms |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['min_cosine']:.4f} | {r['p1_cosine']:.4f} | {r['top10_agreement']:.4f} | "
                     f"{r['long_sent_per_s']:.0f} | {r['query_p50_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.int8_search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, required=True, help="an exported artifact with ov-int8 (make demo)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES), help="recipes to try")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds")
    parser.add_argument("--threads", type=int, default=2, help="inference threads")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown results")
    args = parser.parse_args(argv)
    result = run(args)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"int8-search-{stamp}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"int8-search-{stamp}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
