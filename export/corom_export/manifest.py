"""Building the artifact's manifest (the typed `corom_runtime.artifacts.manifest.Manifest`, which the runtime owns)."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from tokenizers import Tokenizer

from corom_runtime.artifacts.artifact import sha256_file
from corom_runtime.artifacts.manifest import Manifest, TokenizerEntry, VariantEntry

from .families import Family


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("corom-onnx", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino",
                 "nncf", "tokenizers", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def new_manifest(*, name: str, source: str, preset: str | None, config: dict, family: Family, pooling: str,
                 normalize: bool, score: str, max_length: int, lowercase: bool, tokenizer: Tokenizer,
                 tokenizer_sha256: str, prompts: dict[str, str] | None = None, extra: dict | None = None) -> Manifest:
    sizes = family.sizes(config)
    return Manifest(
        name=name, source=source, source_preset=preset,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        architecture={"model_type": config.get("model_type"), **sizes,
                      **{k: config.get(k) for k in ("vocab_size", "max_position_embeddings", "hidden_act",
                                                    "layer_norm_eps", "pad_token_id")}},
        pooling=pooling, normalize=normalize, score=score, max_length=max_length,
        embedding_dim=sizes["hidden"], family=family.name, pad_id=family.pad_id(config), prompts=dict(prompts or {}),
        tokenizer=TokenizerEntry(file="tokenizer.json", sha256=tokenizer_sha256, lowercase=lowercase,
                                 kind=tokenizer_kind(tokenizer)),
        tools=tool_versions(), export=extra or {},
    )


def tokenizer_kind(tokenizer: Tokenizer) -> str:
    """WordPiece, Unigram, BPE or WordLevel: the `tokenizers` model inside."""
    return str(json.loads(tokenizer.to_str())["model"]["type"])


def add_variant(manifest: Manifest, folder: Path, name: str) -> VariantEntry:
    """Record variant `name` (its file as the engine table names it, already written in `folder`)."""
    entry = VariantEntry.for_variant(name, sha256="")
    entry.sha256 = sha256_file(folder / entry.file)
    if entry.weights_file:
        entry.weights_sha256 = sha256_file(folder / entry.weights_file)
    manifest.variants[name] = entry
    return entry
