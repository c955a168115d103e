"""The ONNX Runtime engine: its execution providers (CPU, CUDA, TensorRT) and its session.

Imported only when an ONNX Runtime variant is opened or its devices are listed.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import numpy as np

from corom_runtime.engines.base import OUTPUT, build_feed, check_inputs
from corom_runtime.engines.settings import GRAPH_LEVELS, SessionSettings
from corom_runtime.errors import ArtifactError

log = logging.getLogger(__name__)

PROVIDER_OF = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
# onnxruntime builds that carry GPU providers; the plain `onnxruntime` wheel has only the CPU one
GPU_BUILDS = ("onnxruntime-gpu", "onnxruntime-training", "onnxruntime-directml", "onnxruntime-openvino")


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
    """Engine and timing caches are valid for one model (its content identity), one GPU and one
    TensorRT version only."""
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
        "trt_fp16_enable": TRT_FP16,
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


# TensorRT builds its engine in fp16 (LayerNorm kept fp32) from whatever graph it is given: what runs
# is fp16 whatever the variant's name says (`precision_run`), and it is held to the fp16 gate.
TRT_FP16 = True


def precision_run(variant_precision: str, provider: str) -> str:
    """The precision that really runs a variant on `provider`. Pure.

    >>> precision_run("fp32", "TensorrtExecutionProvider"), precision_run("fp32", "CPUExecutionProvider")
    ('fp16', 'fp32')
    """
    if provider == PROVIDER_OF["tensorrt"] and TRT_FP16 and variant_precision == "fp32":
        return "fp16"
    return variant_precision


def device_of_provider(provider: str) -> str:
    """Our device name for an ONNX Runtime provider name ("cpu" for any provider we do not drive). Pure."""
    return next((device for device, name in PROVIDER_OF.items() if name == provider), "cpu")


class ORTSession:
    """Runs the sentence-embedding graph on ONNX Runtime. Thread-safe: ONNX Runtime's `run` may be called concurrently."""

    def __init__(self, model_path: Path, device: str, settings: SessionSettings, model_sha256: str,
                 max_length: int, precision: str = "fp32") -> None:
        self.device = device
        self.threads = settings.resolved_threads()
        import onnxruntime as ort  # here, not at import: a process running OpenVINO never needs it

        providers = provider_list(device, settings, model_sha256, max_length)
        try:
            self._session = ort.InferenceSession(str(model_path), session_options(settings), providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
            raise ArtifactError(
                f"onnxruntime cannot load {model_path} on {device} ({type(exc).__name__}: {exc}); "
                "if the file is damaged, re-export it with `corom export ... --force`"
            ) from exc
        self.inputs = check_inputs([i.name for i in self._session.get_inputs()], model_path)
        self.providers = self._session.get_providers()
        # onnxruntime-gpu lists CUDA/TensorRT whether or not they can run here, and silently falls back
        # to the CPU when they cannot: the device is the one whose provider ORT really put first
        self.device = device_of_provider(self.providers[0] if self.providers else "")
        # IO binding on GPUs: inputs go to the device once, the output is written straight into host
        # memory ORT allocates; no intermediate tensor is copied back.
        self._bind = device in ("cuda", "tensorrt") and self.providers[0] != "CPUExecutionProvider"
        self.precision = precision_run(precision, self.providers[0] if self.providers else "")
        # TensorRT's shape profile ends at trt_max_batch rows: a larger batch runs in slices of it
        self._max_rows = settings.trt_max_batch if self.device == "tensorrt" else None

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        rows = self._max_rows
        if rows and len(input_ids) > rows:  # rows are independent (batch invariance is gated)
            return np.concatenate([self._run(input_ids[i:i + rows], attention_mask[i:i + rows])
                                   for i in range(0, len(input_ids), rows)])
        return self._run(input_ids, attention_mask)

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feed = build_feed(self.inputs, input_ids, attention_mask)
        if not self._bind:
            return self._session.run([OUTPUT], feed)[0]
        binding = self._session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output(OUTPUT, "cpu")
        self._session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]
