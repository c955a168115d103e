"""The OpenVINO engine: runs an artifact's graph (ONNX or OpenVINO IR) on a CPU, Intel GPU or NPU.

Imported only when an OpenVINO variant is opened: `openvino` is an optional extra.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path

import numpy as np

from corom_runtime.catalog import ENGINES
from corom_runtime.errors import ArtifactError, ProviderUnavailableError
from corom_runtime.engines.settings import SessionSettings
from corom_runtime.shapes import bucket_length, bucket_list, pad_to_bucket
from corom_runtime.engines.base import OUTPUT, build_feed, check_inputs

log = logging.getLogger(__name__)

OV_DEVICE = {"cpu": "CPU", "gpu": "GPU", "npu": "NPU"}
# The CPU plugin keeps compiled kernels per input shape (5,000 by default), and oneDNN inside it one
# primitive per layer and shape, process-wide (1,024). Every input is padded to a shape bucket
# (`corom_runtime.shapes`), so the shapes are few and both caches hold all of them: memory is bounded
# by the buckets, and no hot kernel is evicted (a cap of 64 without buckets evicted and rebuilt them:
# p99 2.8x p50; figures in docs/decisions.md). oneDNN's is read once, when the plugin loads: set
# before OpenVINO is imported; an explicit ONEDNN_PRIMITIVE_CACHE_CAPACITY wins.
OV_SHAPE_CACHE = 1024
ONEDNN_PRIMITIVE_CACHE = 1024
OV_PRECISION = {"bf16": "bf16", "fp16": "f16", "fp32": "f32", "int8": "bf16"}


def import_openvino():
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_PRIMITIVE_CACHE))
    try:
        import openvino
    except ImportError as exc:
        raise ProviderUnavailableError(
            f"this variant runs on OpenVINO, which is not installed: {ENGINES['openvino'].install} "
            "(or choose an onnxruntime variant, e.g. variant='int8')"
        ) from exc
    return openvino


def openvino_devices() -> list[str]:
    """Our device names for what OpenVINO sees on this machine (e.g. ['cpu', 'gpu'])."""
    ov = import_openvino()
    seen = {d.split(".")[0] for d in ov.Core().available_devices}
    return [name for name, ov_name in OV_DEVICE.items() if ov_name in seen]


def model_cache_dir(settings: SessionSettings, identity: str) -> Path:
    """OpenVINO's CACHE_DIR for one variant. OpenVINO keys a compiled blob on the model's path, size
    and mtime, not its content (a model copied over another at the same path, size and mtime ran the
    other's blob: cos 0.66), so each variant content gets a folder of its own."""
    return settings.cache_dir / "openvino" / identity[:32]


def compile_config(device: str, precision: str, settings: SessionSettings, capabilities: list[str],
                   identity: str | None = None) -> dict:
    """OpenVINO compile properties for one variant (a pure function, tested without OpenVINO).

    One stream and the latency hint: batches come one at a time from our batcher, and one stream
    with every thread on it is the fastest for a single request on a small CPU. bf16 only where the CPU
    has it (else f32: an emulated bf16 is slower and no more faithful). int8 graphs keep their
    non-quantized ops in bf16 too.
    """
    config: dict = {"PERFORMANCE_HINT": "LATENCY"}
    if identity:  # no identity, no cache: a path-keyed blob could be another model's
        config["CACHE_DIR"] = str(model_cache_dir(settings, identity))
    if device == "cpu":
        wanted = OV_PRECISION[precision]
        if wanted == "bf16" and "BF16" not in capabilities:
            wanted = "f32"
        config.update({"INFERENCE_NUM_THREADS": settings.resolved_threads(), "NUM_STREAMS": 1,
                       "INFERENCE_PRECISION_HINT": wanted,
                       "CPU_RUNTIME_CACHE_CAPACITY": OV_SHAPE_CACHE})
    elif precision in ("fp32",):
        config["INFERENCE_PRECISION_HINT"] = "f32"
    return config


class OpenVINOSession:
    """`(input_ids, attention_mask) -> embeddings` on OpenVINO. Thread-safe: each call takes its own
    infer request from a pool (created on demand), so concurrent callers never share buffers."""

    def __init__(self, model_path: Path, device: str, settings: SessionSettings, precision: str,
                 max_length: int, identity: str | None = None) -> None:
        ov = import_openvino()
        self.device = device
        self.max_length = max_length
        self.shape_buckets = ENGINES["openvino"].shape_buckets
        self.threads = settings.resolved_threads()
        core = ov.Core()
        target = OV_DEVICE[device]
        try:
            capabilities = list(core.get_property(target, "OPTIMIZATION_CAPABILITIES"))
        except RuntimeError as exc:
            raise ProviderUnavailableError(f"OpenVINO has no {target} device on this machine ({exc})") from exc
        config = compile_config(device, precision, settings, capabilities, identity)
        try:
            if "CACHE_DIR" in config:
                Path(config["CACHE_DIR"]).mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a read-only cache: compile every time rather than fail
            log.info("no OpenVINO model cache in %s (%s)", settings.cache_dir, exc)
            config.pop("CACHE_DIR")
        try:
            # compile from the path, not a read model: that is what lets OpenVINO reuse its cache
            self._compiled = core.compile_model(str(model_path), target, config)
        except RuntimeError as exc:
            raise ArtifactError(
                f"OpenVINO cannot compile {model_path} for {target} ({exc}); if the file is damaged, "
                "re-export it with `corom export ... --force`"
            ) from exc
        self.inputs = check_inputs([port.get_any_name() for port in self._compiled.inputs], model_path)
        self._output = self._compiled.output(OUTPUT)
        hint = self._compiled.get_property("INFERENCE_PRECISION_HINT") if device == "cpu" else None
        # what the CPU plugin really runs the non-int8 ops in (bf16 only where the CPU has it)
        self.inference_precision = hint.get_type_name() if hint is not None else config.get(
            "INFERENCE_PRECISION_HINT", "default")
        self.providers = [f"OpenVINO:{target}:{self.inference_precision}"]
        # at most as many infer requests (each holds its own buffers) as the compiled model can run at
        # once; more concurrent callers wait for one instead of growing the pool
        self._limit = max(1, int(self._compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._created = 0
        self._create_lock = threading.Lock()
        self._requests: queue.Queue = queue.Queue()

    def _take_request(self):
        try:
            return self._requests.get_nowait()
        except queue.Empty:
            pass
        with self._create_lock:
            if self._created < self._limit:
                self._created += 1
                return self._compiled.create_infer_request()
        return self._requests.get()  # every request is busy: wait for one to come back

    def warm_buckets(self, max_rows: int, stop: threading.Event | None = None, max_tokens: int | None = None) -> int:
        """Compile every shape bucket of batches up to `max_rows` rows (and `max_tokens` tokens; None:
        the model's window), smallest first, so no request pays a first compile and memory reaches its
        bound at once instead of over hours. For a server, in a background thread after it is ready: it
        shares the infer requests with live traffic one inference at a time; `stop` ends it between two
        shapes (a process must not exit while OpenVINO runs in a daemon thread: it aborts). Returns how
        many shapes it ran."""
        # never past the model's window: a 128-token bound on a 64-token model is its 64 (a longer input
        # overruns a position table sized to the window)
        window = min(bucket_length(max_tokens, self.max_length), self.max_length) if max_tokens else self.max_length
        shapes = bucket_list(window, max_rows) if self.shape_buckets else []
        for done, (rows, length) in enumerate(shapes):
            if stop is not None and stop.is_set():
                return done
            ids = np.zeros((rows, length), dtype=np.int64)
            self.run(ids, np.ones_like(ids))
        return len(shapes)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        rows = len(input_ids)
        if self.shape_buckets:
            input_ids, attention_mask = pad_to_bucket(input_ids, attention_mask, self.max_length)
        request = self._take_request()
        try:
            # copied into the request's own tensors: sharing our arrays instead (`share_inputs`) saved
            # 0.03-0.05 ms on one query but cost 4% on batches of long passages (docs/decisions.md)
            result = request.infer(build_feed(self.inputs, input_ids, attention_mask))
            # the request reuses its output buffer on the next call: hand the caller its own copy
            return np.array(result[self._output][:rows], dtype=np.float32, copy=True)
        finally:
            self._requests.put(request)
