"""What runs where: the one table of engines, devices and variants that the whole codebase reads.

The runtime (session choice, `variant="auto"`), the CLI (its choices and help), the exporter (which
files to write, which gate each variant must pass), the benchmarks and the tests all read these
tables instead of spelling variant or device names themselves.

- An **engine** is an inference library, each an install extra: ONNX Runtime (`[cpu]`, or `[gpu]` with
  CUDA/TensorRT: one build, never both) or OpenVINO (`[openvino]`).
- A **device** is what a caller asks for (`device="cpu"`); each belongs to one or more engines.
- A **variant** is one graph file plus the engine and precision it is meant to run with. Two variants
  may share a file (`ov-bf16` runs the plain fp32 graph with OpenVINO's bf16 inference precision).

>>> VARIANTS["ov-int8"].engine, VARIANTS["ov-int8"].precision
('openvino', 'int8')
>>> [v.name for v in auto_order("cpu")][:3]
['ov-int8-fast', 'ov-int8', 'ov-bf16']
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Engine:
    name: str
    module: str            # the Python module that must be importable
    install: str           # what to run when it is not
    devices: tuple[str, ...]
    # pads every input to a shape bucket (`corom_runtime.shapes`): engines that compile per shape
    shape_buckets: bool = False


@dataclass(frozen=True)
class Device:
    name: str
    description: str


@dataclass(frozen=True)
class Gate:
    """What a variant must show against the PyTorch reference before it is marked passed."""

    min_cosine: float
    top10_agreement: float = 0.0
    # min cosine between a text embedded alone and the same text inside mixed-length batches
    batch_invariance: float = 0.0
    finite: bool = True


@dataclass(frozen=True)
class VariantSpec:
    name: str
    file: str              # graph file inside the artifact (an OpenVINO IR .xml has its .bin beside it)
    engine: str
    precision: str         # what the matrix products run in: fp32 | fp16 | bf16 | int8
    devices: tuple[str, ...]
    gate: Gate
    recipe: str            # how the exporter builds it, one line for `corom info` and the manifest


ENGINES: dict[str, Engine] = {
    "onnxruntime": Engine("onnxruntime", "onnxruntime", "pip install 'corom-onnx[cpu]' (ONNX Runtime; '[gpu]' on NVIDIA machines)",
                          ("cpu", "cuda", "tensorrt")),
    "openvino": Engine("openvino", "openvino", "pip install 'corom-onnx[openvino]'", ("cpu", "gpu", "npu"),
                       shape_buckets=True),
}

# Table order is `device="auto"`'s preference: accelerators first, the CPU last. Which engine drives a
# device is `ENGINES[...].devices` (the CPU is driven by both).
DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("tensorrt", "NVIDIA GPU through ONNX Runtime's TensorRT provider"),
    Device("cuda", "NVIDIA GPU through ONNX Runtime's CUDA provider"),
    Device("gpu", "Intel GPU through OpenVINO"),
    Device("npu", "Intel NPU through OpenVINO"),
    Device("cpu", "the CPU, through OpenVINO when installed, else ONNX Runtime"),
)}

# Gates tightened where measured better. int8: cos >= 0.99 on *every* evaluation text and top-10 >=
# 0.97: at 0.98 / 0.9 a recipe whose worst text sat at 0.982-0.987 on one CPU passed there and fell
# to 0.61 on another.
_LOSSLESS = Gate(min_cosine=0.99999, batch_invariance=0.99999)

# Table order is the preference of `variant="auto"` when no speed was measured on this machine:
# fastest first, among the variants that passed their gate.
VARIANTS: dict[str, VariantSpec] = {v.name: v for v in (
    # the `fast` tier's recipe: its gate is that tier's min cos (its task quality is judged by the tier)
    VariantSpec("ov-int8-fast", "model.ov-int8-fast.xml", "openvino", "int8", ("cpu",),
                Gate(min_cosine=0.95, batch_invariance=0.999),
                "NNCF static int8 of every weight MatMul (transformer preset, as the peers ship it); the "
                "attention's activation products and the rest in bf16 (f32 where the CPU lacks bf16)"),
    VariantSpec("ov-int8", "model.ov-int8.xml", "openvino", "int8", ("cpu",),
                Gate(min_cosine=0.99, top10_agreement=0.97, batch_invariance=0.9995),
                "NNCF static int8 of the attention's Q/K/V projections (SmoothQuant 0.5); the rest in bf16 "
                "(f32 where the CPU lacks bf16)"),
    VariantSpec("ov-bf16", "model.fp32.onnx", "openvino", "bf16", ("cpu", "gpu", "npu"),
                Gate(min_cosine=0.9999, top10_agreement=0.98, batch_invariance=0.9999),
                "the plain graph, OpenVINO inference precision bf16 (f32 where the CPU lacks bf16)"),
    VariantSpec("int8", "model.int8.onnx", "onnxruntime", "int8", ("cpu",),
                Gate(min_cosine=0.99, top10_agreement=0.97, batch_invariance=0.9999),
                "ONNX Runtime MatMulNBits: 8-bit weights in blocks of 32, int8 activations per token"),
    VariantSpec("opt", "model.opt.onnx", "onnxruntime", "fp32", ("cpu", "cuda"), _LOSSLESS,
                "ONNX Runtime BERT fusions"),
    VariantSpec("fp16", "model.fp16.onnx", "onnxruntime", "fp16", ("cuda", "cpu"),
                Gate(min_cosine=0.999, batch_invariance=0.999), "fp16 after fusion, LayerNorm/Softmax fp32"),
    VariantSpec("fp32", "model.fp32.onnx", "onnxruntime", "fp32", ("tensorrt", "cpu"), _LOSSLESS,
                "plain export (TensorRT's input)"),
)}

@dataclass(frozen=True)
class Tier:
    """A fidelity a user may ask for (`Embedder.load(..., fidelity=)`, `--fidelity`): the figures a
    variant's record must show against the PyTorch reference to be labelled with it (`tiers.tiers_of`)."""

    name: str
    description: str
    min_cosine: float
    top10_agreement: float = 0.0
    batch_invariance: float = 0.0
    # share of fp32's task quality kept: STSb Spearman and retrieval nDCG@10 over the parity corpus
    # (`tiers.retrieval_ndcg`); None: not judged on task quality
    task_quality: float | None = None


# Most faithful first (a variant that passes one passes every later one: `tiers.tiers_of`). `faithful` is today's int8 gate, the default;
# its batch invariance (0.999, the loosest variant gate's) still refuses per-batch int8 scales (0.997-0.998).
TIERS: dict[str, Tier] = {t.name: t for t in (
    Tier("exact", "min cos >= 0.9999 on every text (plus faithful's top-10 and batch invariance)",
         min_cosine=0.9999, top10_agreement=0.97, batch_invariance=0.9999),
    Tier("faithful", "min cos >= 0.99 on every text, top-10 agreement >= 0.97, batch-invariant",
         min_cosine=0.99, top10_agreement=0.97, batch_invariance=0.999),
    Tier("fast", "task quality within 1% of fp32 (STSb Spearman, retrieval nDCG@10 over the parity corpus), "
                 "min cos >= 0.95: what the peers ship", min_cosine=0.95, task_quality=0.99),
)}
DEFAULT_FIDELITY = "faithful"


# How token states become one vector, and how two vectors are scored: presets and manifests
# accept these only.
POOLINGS = ("cls", "mean", "max", "lasttoken", "weightedmean", "mean_sqrt_len_tokens")  # sentence-transformers' modes


SCORES = ("dot", "cosine")

# What `encode(precision=...)` and the server's "precision" return (sentence-transformers' names):
# float32 vectors, or per-dimension int8/uint8 levels, or packed sign bits (`corom_runtime.shaping`).
PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")

# ONNX Runtime int8 recipes (`corom export --int8-recipe`); the first is the default. What each keeps in
# float and what it measured: `corom_export.int8`.
INT8_RECIPES = ("nbits8", "attention", "smooth", "no-ffn-out", "full")

# Where the table order is not the answer: TensorRT builds its own fp16 engine from the plain graph.
_AUTO_FIRST = {"tensorrt": "fp32", "cuda": "fp16"}


def gate_of(variant: str) -> Gate:
    """The gate a variant must pass; a variant this table does not know must match exactly."""
    return VARIANTS[variant].gate if variant in VARIANTS else Gate(min_cosine=1.0)


def engine_installed(engine: str) -> bool:
    """Whether the engine's module can be imported here (without importing it: that costs start time)."""
    module = ENGINES[engine].module
    if module in sys.modules:
        return sys.modules[module] is not None  # None: import blocked on purpose
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def engines_of(device: str) -> list[str]:
    """The engines that drive `device`, in table order (the CPU: both)."""
    return [name for name, engine in ENGINES.items() if device in engine.devices]


def variant_names() -> list[str]:
    return list(VARIANTS)


def device_names() -> list[str]:
    return ["auto", *DEVICES]


def runs_on(spec: VariantSpec, device: str) -> bool:
    return device in spec.devices


def auto_order(device: str) -> list[VariantSpec]:
    """The variants that can run on `device`, in the order `variant="auto"` tries them."""
    candidates = [v for v in VARIANTS.values() if runs_on(v, device)]
    first = _AUTO_FIRST.get(device)
    return sorted(candidates, key=lambda v: v.name != first)
