"""corom-onnx runtime: sentence embeddings on ONNX Runtime, without PyTorch."""

from corom_runtime.serving.batcher import BatcherSettings, DynamicBatcher, Ticket
from corom_runtime.embedder import Embedder, EmbedderInfo, ItemReport
from corom_runtime.errors import (ArtifactError, BatcherClosedError, CoromError, OverloadedError, PresetError,
                                  ProviderUnavailableError)

__all__ = [
    "Embedder", "EmbedderInfo", "ItemReport", "DynamicBatcher", "BatcherSettings", "Ticket", "CoromError", "ArtifactError", "PresetError",
    "ProviderUnavailableError", "OverloadedError", "BatcherClosedError",
]
__version__ = "0.1.0"
