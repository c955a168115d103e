"""The systems compared: each becomes `encode(texts, batch_size) -> float32 [n, dim]` on the same threads.

Peers are built the way their users build them (sentence-transformers' own ONNX export helpers,
Optimum's optimizer and quantizer presets); a peer that fails to build is reported with its reason.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from corom_runtime.catalog import VARIANTS

log = logging.getLogger(__name__)

Encode = Callable[[list[str], int], np.ndarray]
CACHE = Path(__file__).resolve().parent / ".cache"


@dataclass
class System:
    name: str
    family: str  # reference | peer | corom
    build: Callable[[], Encode]
    note: str = ""


def window(artifact: Path) -> int:
    """The artifact's max_length: every system cuts its texts there, so the systems compare like with
    like (a peer cut shorter than ours reads as a fidelity loss on long passages)."""
    from corom_runtime.artifacts.artifact import load_artifact

    return load_artifact(artifact).max_length


def _threads(threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return so


def _mean_pool_normalize(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(hidden.dtype)
    pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def pytorch(folder: Path, threads: int, bf16: bool = False, *, max_length: int) -> Encode:
    """The reference: transformers eager on torch, batches in the caller's order, padded per batch."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()

    def encode(texts: list[str], batch_size: int) -> np.ndarray:
        out = []
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for i in range(0, len(texts), batch_size):
                enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                hidden = model(**enc).last_hidden_state.float()
                m = enc["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return np.concatenate(out) if out else np.empty((0, model.config.hidden_size), np.float32)

    return encode


def _st_folder(folder: Path) -> Path:
    """A writable copy of the model folder: sentence-transformers writes its ONNX exports beside it."""
    dest = CACHE / "st-model"
    if not dest.exists():
        shutil.copytree(folder, dest)
    return dest


def sentence_transformers(folder: Path, threads: int, backend: str = "torch", variant: str = "plain", *,
                          max_length: int) -> Encode:
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(threads)
    if backend == "torch":
        model = SentenceTransformer(str(folder), device="cpu")
    else:
        from sentence_transformers.backend import export_dynamic_quantized_onnx_model, export_optimized_onnx_model

        path = _st_folder(folder)
        kwargs = {"provider": "CPUExecutionProvider", "session_options": _threads(threads)}
        base = SentenceTransformer(str(path), device="cpu", backend="onnx", model_kwargs=kwargs)
        if not (path / "onnx" / "model.onnx").exists():
            base.save_pretrained(str(path))
        files = {"plain": "onnx/model.onnx", "O3": "onnx/model_O3.onnx",
                 "int8": "onnx/model_qint8_avx512_vnni.onnx"}
        if not (path / files[variant]).exists():
            if variant == "O3":
                export_optimized_onnx_model(base, "O3", str(path))
            elif variant == "int8":
                export_dynamic_quantized_onnx_model(base, "avx512_vnni", str(path))
        model = SentenceTransformer(str(path), device="cpu", backend="onnx",
                                    model_kwargs={**kwargs, "file_name": files[variant]})
    model.max_seq_length = max_length

    def encode(texts: list[str], batch_size: int) -> np.ndarray:
        return model.encode(texts, batch_size=batch_size, convert_to_numpy=True)

    return encode


def optimum(folder: Path, threads: int, variant: str = "plain", *, max_length: int) -> Encode:
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTOptimizer, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig, AutoQuantizationConfig
    from transformers import AutoTokenizer

    base_dir = _optimum_plain(folder)
    path, file = base_dir, "model.onnx"
    if variant == "O2":
        path, file = CACHE / "optimum-O2", "model_optimized.onnx"
        if not (path / file).exists():
            ORTOptimizer.from_pretrained(str(base_dir)).optimize(AutoOptimizationConfig.O2(), save_dir=str(path))
    elif variant == "int8":
        path, file = CACHE / "optimum-int8", "model_quantized.onnx"
        if not (path / file).exists():
            config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
            ORTQuantizer.from_pretrained(str(base_dir)).quantize(save_dir=str(path), quantization_config=config)
    model = ORTModelForFeatureExtraction.from_pretrained(str(path), file_name=file, session_options=_threads(threads))
    tok = AutoTokenizer.from_pretrained(str(folder))

    def encode(texts: list[str], batch_size: int) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="np")
            hidden = model(**enc).last_hidden_state
            out.append(_mean_pool_normalize(np.asarray(hidden), enc["attention_mask"]))
        return np.concatenate(out)

    return encode


def _optimum_plain(folder: Path) -> Path:
    """The model's plain ONNX export with token outputs, as Optimum writes it (what OpenVINO and fastembed
    users start from), with the tokenizer files beside it."""
    from optimum.onnxruntime import ORTModelForFeatureExtraction

    base_dir = CACHE / "optimum-plain"
    if not (base_dir / "model.onnx").exists():
        ORTModelForFeatureExtraction.from_pretrained(str(folder), export=True).save_pretrained(str(base_dir))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (folder / name).exists() and not (base_dir / name).exists():
            shutil.copy(folder / name, base_dir / name)
    return base_dir


def _peer_calibration(folder: Path, max_length: int, n: int = 300) -> list[dict[str, np.ndarray]]:
    """Calibration batches for the peers' static int8, from the calibration split (never evaluated)."""
    from transformers import AutoTokenizer

    from corom_export.corpus import calibration_texts

    tok = AutoTokenizer.from_pretrained(str(folder))
    texts = calibration_texts(n)
    out = []
    for i in range(0, len(texts), 8):
        enc = tok(texts[i:i + 8], padding=True, truncation=True, max_length=max_length, return_tensors="np")
        out.append({k: v.astype(np.int64) for k, v in enc.items()})
    return out


def openvino(folder: Path, threads: int, mode: str = "bf16", *, max_length: int) -> Encode:
    """OpenVINO as its users run it: the model's ONNX export, OpenVINO's CPU defaults (bf16 on a CPU that
    has it), the latency hint; optionally NNCF int8 (weights + per-token dynamic activations, or static)."""
    import openvino as ov
    from transformers import AutoTokenizer

    core = ov.Core()
    onnx_path = _optimum_plain(folder) / "model.onnx"
    config: dict = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if mode == "bf16":
        model = core.read_model(str(onnx_path))
    elif mode == "int8-dynamic":
        import nncf

        model = nncf.compress_weights(core.read_model(str(onnx_path)), mode=nncf.CompressWeightsMode.INT8_ASYM)
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 32
    elif mode == "int8-static":
        xml = CACHE / f"openvino-nncf-static-{max_length}" / "model.xml"  # calibrated at this window
        if not xml.exists():
            import nncf

            quantized = nncf.quantize(core.read_model(str(onnx_path)), nncf.Dataset(_peer_calibration(folder, max_length)),
                                      model_type=nncf.ModelType.TRANSFORMER, subset_size=300)
            xml.parent.mkdir(parents=True, exist_ok=True)
            ov.save_model(quantized, str(xml), compress_to_fp16=False)
        model = core.read_model(str(xml))
    else:
        raise ValueError(mode)
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    names = {n for port in compiled.inputs for n in port.get_names()}
    tok = AutoTokenizer.from_pretrained(str(folder))

    def encode(texts: list[str], batch_size: int) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="np")
            feed = {k: v.astype(np.int64) for k, v in enc.items() if k in names}
            hidden = request.infer(feed)[compiled.output(0)]
            out.append(_mean_pool_normalize(np.asarray(hidden, dtype=np.float32), enc["attention_mask"]))
        return np.concatenate(out)

    return encode


def ctranslate2_int8(folder: Path, threads: int, *, max_length: int) -> Encode:
    """CTranslate2's int8 encoder, converted with its own Transformers converter."""
    import ctranslate2
    from ctranslate2.converters import TransformersConverter
    from transformers import AutoTokenizer

    out_dir = CACHE / "ctranslate2-int8"
    if not (out_dir / "model.bin").exists():
        TransformersConverter(str(folder)).convert(str(out_dir), quantization="int8", force=True)
    encoder = ctranslate2.Encoder(str(out_dir), device="cpu", compute_type="int8", intra_threads=threads)
    tok = AutoTokenizer.from_pretrained(str(folder))

    def encode(texts: list[str], batch_size: int) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            ids = tok(texts[i:i + batch_size], truncation=True, max_length=max_length)["input_ids"]
            hidden = np.asarray(encoder.forward_batch(ids).last_hidden_state, dtype=np.float32)
            mask = np.zeros(hidden.shape[:2], dtype=np.int64)
            for row, seq in enumerate(ids):
                mask[row, :len(seq)] = 1
            out.append(_mean_pool_normalize(hidden, mask))
        return np.concatenate(out)

    return encode


def fastembed(folder: Path, threads: int, *, max_length: int) -> Encode:
    """fastembed on the model's ONNX export, loaded from the local folder (no hub here)."""
    from fastembed import TextEmbedding

    model = TextEmbedding("sentence-transformers/all-MiniLM-L6-v2", specific_model_path=str(_optimum_plain(folder)),
                          threads=threads)
    # fastembed cuts at tokenizer_config's model_max_length (512 here): told the artifact's window instead
    model.model.tokenizer.enable_truncation(max_length=max_length)

    def encode(texts: list[str], batch_size: int) -> np.ndarray:
        return np.stack(list(model.embed(texts, batch_size=batch_size))).astype(np.float32)

    return encode


def corom(artifact: Path, threads: int, variant: str, shape_buckets: bool = True) -> Encode:
    from corom_runtime import Embedder

    embedder = Embedder.load(artifact, variant=variant, device="cpu", threads=threads, verify_here=False)
    if not shape_buckets:  # what the runtime did before shape buckets: every shape as it comes
        embedder.session.shape_buckets = False

    def encode(texts: list[str], batch_size: int) -> np.ndarray:
        return embedder.encode(texts, batch_size=batch_size)

    encode.embedder = embedder  # type: ignore[attr-defined]
    return encode


def smooth_artifact() -> Path:
    """The bundled model exported with the "smooth" int8 recipe (FFN inputs rescaled, int8 too)."""
    path = CACHE / "artifact-smooth"
    if not (path / "manifest.json").is_file():
        from corom_export.build import ExportOptions, export_artifact
        from corom_export.verify import verify_artifact

        export_artifact("all-minilm-l6-v2", path, ExportOptions(int8_recipe="smooth", force=True))
        verify_artifact(path, variants=["int8"], stsb=False)
    return path


def all_systems(folder: Path, artifact: Path, threads: int, quick: bool, bf16_ok: bool) -> list[System]:
    """Every system, in the order they are run. `quick` keeps one of each kind. All cut where `artifact` does."""
    cut = window(artifact)
    systems = [System("pytorch-fp32", "reference", lambda: pytorch(folder, threads, max_length=cut))]
    if bf16_ok and not quick:
        systems.append(System("pytorch-bf16", "reference", lambda: pytorch(folder, threads, bf16=True, max_length=cut),
                              "torch.autocast bf16 (CPU has avx512_bf16/amx)"))
    if not quick:
        systems += [
            System("st-torch", "peer", lambda: sentence_transformers(folder, threads, max_length=cut)),
            System("st-onnx-O3", "peer", lambda: sentence_transformers(folder, threads, "onnx", "O3", max_length=cut)),
            System("st-onnx-int8", "peer", lambda: sentence_transformers(folder, threads, "onnx", "int8", max_length=cut),
                   "sentence-transformers' avx512_vnni dynamic int8 export"),
            System("optimum-O2", "peer", lambda: optimum(folder, threads, "O2", max_length=cut)),
            System("optimum-int8", "peer", lambda: optimum(folder, threads, "int8", max_length=cut),
                   "Optimum AutoQuantizationConfig.avx512_vnni, dynamic"),
            System("ctranslate2-int8", "peer", lambda: ctranslate2_int8(folder, threads, max_length=cut)),
            System("fastembed", "peer", lambda: fastembed(folder, threads, max_length=cut), "fp32 ONNX, batches in the given order"),
            System("openvino-int8-dynamic", "peer", lambda: openvino(folder, threads, "int8-dynamic", max_length=cut),
                   "NNCF int8 weights + per-token dynamic activation quantization (group 32)"),
        ]
    systems += [
        System("openvino-bf16", "peer", lambda: openvino(folder, threads, "bf16", max_length=cut),
               "OpenVINO CPU defaults on the ONNX export: bf16 on this CPU"),
        System("openvino-nncf-int8", "peer", lambda: openvino(folder, threads, "int8-static", max_length=cut),
               "NNCF static int8, transformer preset, everything quantized"),
        System("corom-opt", "corom", lambda: corom(artifact, threads, "opt")),
        System("corom-int8", "corom", lambda: corom(artifact, threads, "int8"), VARIANTS["int8"].recipe),
        System("corom-ov-bf16", "corom", lambda: corom(artifact, threads, "ov-bf16"), "lossless CPU mode"),
        System("corom-ov-int8", "corom", lambda: corom(artifact, threads, "ov-int8"), VARIANTS["ov-int8"].recipe),
    ]
    if not quick:  # shape buckets on and off, same run: what they cost or buy in throughput
        systems.append(System("corom-ov-bf16-unbucketed", "corom",
                              lambda: corom(artifact, threads, "ov-bf16", shape_buckets=False),
                              "ov-bf16 without shape buckets (the runtime before them)"))
    return systems
