"""The plain ONNX export: pooling (and normalisation) inside the graph, dynamic batch and length."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch

from .reference import SentenceEncoder

log = logging.getLogger(__name__)

INPUT_NAMES = ["input_ids", "attention_mask"]
OUTPUT_NAME = "sentence_embedding"
OPSET = 17  # LayerNormalization is a single op from 17 on; ORT's fusions and TensorRT both read it


def dummy_batch(token_ids: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows for tracing, the second one token shorter and padded with `pad_id`: real tokens of the
    model's own tokenizer (no family's special ids hard-wired), and padding, so masks are traced too."""
    if len(token_ids) < 3:
        raise ValueError(f"need at least 3 tokens to trace the export, got {token_ids}")
    short = token_ids[:-2] + token_ids[-1:] + [pad_id]
    ids = torch.tensor([token_ids, short], dtype=torch.int64)
    mask = torch.tensor([[1] * len(token_ids), [1] * (len(token_ids) - 1) + [0]], dtype=torch.int64)
    return ids, mask


def export_plain(encoder: SentenceEncoder, path: Path, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Write `encoder` as ONNX fp32 to `path` (traced on `ids`, `mask`; see `dummy_batch`) and check it."""
    dynamic = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    dynamic[OUTPUT_NAME] = {0: "batch"}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        # The TorchScript exporter (dynamo=False): its BERT graph is the one ONNX Runtime's
        # transformer fusions (Attention, SkipLayerNormalization, BiasGelu) are written against.
        torch.onnx.export(
            encoder,
            (ids, mask),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=INPUT_NAMES,
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    # The exporter names the embedding width symbolically; it is a constant of the model, and the
    # runtime, TensorRT and readers of the graph are all better off seeing it as one.
    model = onnx.load(str(path))
    width = model.graph.output[0].type.tensor_type.shape.dim[1]
    width.Clear()
    width.dim_value = encoder.dim  # the Dense layers' width where a folder has them
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)


def input_names(path: Path) -> list[str]:
    """The inputs the exported graph declares (the manifest records them; the runtime feeds them)."""
    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
