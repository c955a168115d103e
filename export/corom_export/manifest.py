"""Writing the artifact's manifest.json (the runtime reads it with `corom_runtime.artifact`)."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from corom_runtime.artifact import FORMAT_VERSION, MANIFEST, sha256_file

PROVIDERS = {
    "fp32": ["TensorrtExecutionProvider", "CPUExecutionProvider"],
    "opt": ["CPUExecutionProvider", "CUDAExecutionProvider"],
    "fp16": ["CUDAExecutionProvider"],
    "int8": ["CPUExecutionProvider"],
}
PRECISION = {"fp32": "fp32", "opt": "fp32", "fp16": "fp16", "int8": "int8"}


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("corom-onnx", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tokenizers", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def new_manifest(*, name: str, source: str, preset: str | None, config: dict, pooling: str, normalize: bool,
                 score: str, max_length: int, lowercase: bool, extra: dict | None = None) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "source": source,
        "source_preset": preset,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "architecture": {k: config.get(k) for k in (
            "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "vocab_size", "max_position_embeddings", "hidden_act", "layer_norm_eps")},
        "pooling": pooling,
        "normalize": normalize,
        "score": score,
        "max_length": max_length,
        "embedding_dim": config["hidden_size"],
        "inputs": ["input_ids", "attention_mask"],
        "output": "sentence_embedding",
        "tokenizer": {"file": "tokenizer.json", "sha256": "", "lowercase": lowercase,
                      "truncation": "longest_first", "max_length": max_length, "padding": "per batch"},
        "tools": tool_versions(),
        "export": extra or {},
        "variants": {},
        "quality": {},
    }


def add_variant(manifest: dict, folder: Path, name: str, file: str) -> None:
    manifest["variants"][name] = {
        "file": file,
        "sha256": sha256_file(folder / file),
        "precision": PRECISION[name],
        "providers": PROVIDERS[name],
        "passed": False,  # only `verify` sets it, after the gate held
        "parity": {},
    }


def write_manifest(folder: Path, manifest: dict) -> None:
    """Write atomically, so a crash never leaves a half-written manifest behind."""
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, folder / MANIFEST)
