"""Sessions: one engine running one variant, `(input_ids, attention_mask) -> embeddings`.

`open_session` is the seam the `Embedder` talks to; the engine table (`engines.py`) says which
class serves a variant. ONNX Runtime's session lives here; OpenVINO's in `openvino_session`
(imported only when used: it is an optional extra).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

# the seam every engine shares (re-exported here for the imports users and tests have)
from .engine_base import (ATTENTION_MASK, FEEDABLE, INPUT_IDS, OUTPUT, TOKEN_TYPE_IDS,  # noqa: F401
                          EncoderSession, build_feed, check_inputs)
from .errors import ArtifactError
from .manifest import VariantEntry
from .providers import PROVIDER_OF, SessionSettings, provider_list, session_options

log = logging.getLogger(__name__)


def open_session(entry: VariantEntry, model_path: Path, device: str, settings: SessionSettings,
                 max_length: int) -> EncoderSession:
    """Open `entry`'s graph on `device` with the engine the manifest names."""
    if entry.engine == "openvino":
        from .openvino_session import OpenVINOSession

        return OpenVINOSession(model_path, device, settings, entry.precision)
    return ORTSession(model_path, device, settings, entry.sha256, max_length)


def device_of_provider(provider: str) -> str:
    """Our device name for an ONNX Runtime provider name ("cpu" for any provider we do not drive). Pure."""
    return next((device for device, name in PROVIDER_OF.items() if name == provider), "cpu")


class ORTSession:
    """Runs the sentence-embedding graph on ONNX Runtime. Thread-safe: ONNX Runtime's `run` may be called concurrently."""

    def __init__(self, model_path: Path, device: str, settings: SessionSettings, model_sha256: str,
                 max_length: int) -> None:
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

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feed = build_feed(self.inputs, input_ids, attention_mask)
        if not self._bind:
            return self._session.run([OUTPUT], feed)[0]
        binding = self._session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output(OUTPUT, "cpu")
        self._session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]
