"""corom-onnx runtime: sentence embeddings on ONNX Runtime, without PyTorch."""

from .dynamic_batcher import BatcherSettings, DynamicBatcher, Ticket
from .embedder import Embedder, EmbedderInfo, ItemReport
from .errors import (ArtifactError, BatcherClosedError, CoromError, OverloadedError, PresetError,
                     ProviderUnavailableError)

__all__ = [
    "Embedder", "EmbedderInfo", "ItemReport", "DynamicBatcher", "BatcherSettings", "Ticket", "CoromError", "ArtifactError", "PresetError",
    "ProviderUnavailableError", "OverloadedError", "BatcherClosedError",
]
__version__ = "0.1.0"
