"""`open_session`: the seam the `Embedder` talks to. The manifest names a variant's engine; this opens
it. OpenVINO is imported only when one of its variants is opened (an optional extra)."""

from __future__ import annotations

from pathlib import Path

from corom_runtime.artifacts.manifest import VariantEntry
from corom_runtime.engines.base import EncoderSession
from corom_runtime.engines.ort import ORTSession
from corom_runtime.engines.settings import SessionSettings


def open_session(entry: VariantEntry, model_path: Path, device: str, settings: SessionSettings,
                 max_length: int, identity: str | None = None) -> EncoderSession:
    """Open `entry`'s graph on `device` with the engine the manifest names. `identity`
    (`artifacts.identity.variant_identity`) keys the engine's compiled-model caches by content; None:
    the graph's checksum (OpenVINO then compiles without a cache)."""
    if entry.engine == "openvino":
        from corom_runtime.engines.openvino import OpenVINOSession

        return OpenVINOSession(model_path, device, settings, entry.precision, max_length, identity=identity)
    return ORTSession(model_path, device, settings, identity or entry.sha256, max_length,
                      precision=entry.precision)
