"""The knobs of a session, for every engine (ONNX Runtime and OpenVINO read the same settings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from corom_runtime.artifacts.cache import cache_root
from corom_runtime.machine import available_cpus

GRAPH_LEVELS = {  # names of onnxruntime.GraphOptimizationLevel members
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}


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
