"""ONNX Runtime's execution providers (CPU, CUDA, TensorRT) and the session settings every engine reads."""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from .presets import cache_root
from .threads import available_cpus

log = logging.getLogger(__name__)

PROVIDER_OF = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
GRAPH_LEVELS = {  # names of onnxruntime.GraphOptimizationLevel members
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
# onnxruntime builds that carry GPU providers; the plain `onnxruntime` wheel has only the CPU one
GPU_BUILDS = ("onnxruntime-gpu", "onnxruntime-training", "onnxruntime-directml", "onnxruntime-openvino")


@dataclass(frozen=True)
class SessionSettings:
    """Knobs of a session (ONNX Runtime's or OpenVINO's). `threads=None`: the CPUs this process may use."""

    threads: int | None = None
    graph_optimization: str = "all"
    cpu_mem_arena: bool = True
    cache_dir: Path = field(default_factory=cache_root)  # engine caches (OpenVINO blobs, TensorRT engines)
    # TensorRT shape profile, matched to the batching buckets (batch up to max_batch, any length).
    trt_max_batch: int = 64
    trt_opt_batch: int = 32
    trt_workspace_bytes: int = 4 << 30
    # Idle intra-op threads spin before sleeping: quicker single queries (docs/decisions.md); turn it
    # off where other work must share the CPUs.
    spin: bool = True

    def resolved_threads(self) -> int:
        return self.threads if self.threads else available_cpus()


def _gpu_build_installed() -> bool:
    for dist in GPU_BUILDS:
        try:
            metadata.distribution(dist)
            return True
        except metadata.PackageNotFoundError:
            continue
    return False


def ort_devices() -> list[str]:
    """Our device names for the providers this onnxruntime build offers, accelerators first.

    The CPU wheel is recognised without importing onnxruntime (0.1 s and 30 MB a process that runs an
    OpenVINO variant would pay for nothing)."""
    if not _gpu_build_installed():
        return ["cpu"]
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    return [d for d in ("tensorrt", "cuda", "cpu") if PROVIDER_OF[d] in have]


def session_options(settings: SessionSettings):
    """`onnxruntime.SessionOptions` for `settings`."""
    import onnxruntime as ort

    if settings.graph_optimization not in GRAPH_LEVELS:
        raise ValueError(f"graph_optimization must be one of {list(GRAPH_LEVELS)}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.resolved_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_LEVELS[settings.graph_optimization])
    options.enable_cpu_mem_arena = settings.cpu_mem_arena
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spin else "0")
    return options


def gpu_name() -> str:
    if not shutil.which("nvidia-smi"):
        return "unknown-gpu"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0].replace(" ", "_") if out.stdout.strip() else "unknown-gpu"
    except (OSError, subprocess.SubprocessError):
        return "unknown-gpu"


def tensorrt_version() -> str:
    try:
        import tensorrt  # type: ignore[import-not-found]

        return str(tensorrt.__version__)
    except ImportError:
        return "unknown-trt"


def trt_cache_dir(settings: SessionSettings, model_sha256: str) -> Path:
    """Engine and timing caches are valid for one model, one GPU and one TensorRT version only."""
    key = hashlib.sha256(f"{model_sha256}|{gpu_name()}|{tensorrt_version()}".encode()).hexdigest()[:16]
    return settings.cache_dir / "tensorrt" / key


def provider_list(device: str, settings: SessionSettings, model_sha256: str, max_length: int) -> list:
    """The `providers` argument of `InferenceSession` for `device` (with CPU as the last resort)."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", {"arena_extend_strategy": "kSameAsRequested", "cudnn_conv_algo_search": "HEURISTIC"})
    if device == "cuda":
        return [cuda, "CPUExecutionProvider"]
    cache = trt_cache_dir(settings, model_sha256)
    cache.mkdir(parents=True, exist_ok=True)

    def shape(batch: int, length: int) -> str:
        return f"input_ids:{batch}x{length},attention_mask:{batch}x{length}"

    trt = ("TensorrtExecutionProvider", {
        "trt_fp16_enable": True,
        "trt_layer_norm_fp32_fallback": True,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        "trt_max_workspace_size": settings.trt_workspace_bytes,
        "trt_profile_min_shapes": shape(1, 1),
        "trt_profile_opt_shapes": shape(settings.trt_opt_batch, max_length),
        "trt_profile_max_shapes": shape(settings.trt_max_batch, max_length),
    })
    return [trt, cuda, "CPUExecutionProvider"]
