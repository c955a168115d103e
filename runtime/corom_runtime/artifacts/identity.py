"""What a variant's vectors depend on, as one hash: the key of every cache that holds results of a
variant (OpenVINO compiled blobs, load-time verdicts, corpus-job shards).

A file's path, size and mtime say nothing about its content (a model copied over another at the same
path, size and mtime is a different model), so the identity hashes content: the sha256 the manifest
records for a file that `Artifact.check_file` verifies before it is used (graph, OpenVINO weights,
tokenizer), else the file's bytes. Settings that change vectors without changing a file (max length,
pooling, normalisation, prompts, tokenizer settings, family and pad id) are hashed in too.

>>> import json, tempfile
>>> from corom_runtime.artifacts.manifest import Manifest, TokenizerEntry, VariantEntry
>>> folder = Path(tempfile.mkdtemp())
>>> for name in ("model.onnx", "tokenizer.json"):
...     _ = (folder / name).write_text(name)
>>> m = Manifest(name="m", source="s", pooling="mean", normalize=True, score="cosine", max_length=128,
...              embedding_dim=4, tokenizer=TokenizerEntry(file="tokenizer.json", sha256="1" * 64),
...              variants={"fp32": VariantEntry(name="fp32", file="model.onnx", sha256="2" * 64,
...                                             engine="onnxruntime", precision="fp32", devices=["cpu"])})
>>> a = Artifact(path=folder, manifest=m)
>>> [p.name for p in variant_files(a, "fp32")]
['model.onnx', 'tokenizer.json']
>>> before = variant_identity(a, "fp32"); m.max_length = 64
>>> before != variant_identity(a, "fp32")
True
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from corom_runtime.artifacts.artifact import Artifact, sha256_file

# files an ONNX graph may keep its weights in (external data), beside the graph: the conventions
# torch.onnx and onnx.save_model use (`model.onnx.data`, `model.onnx_data`, `model.data`)
_EXTERNAL_SUFFIXES = (".data", "_data")


def _external_data(graph: Path) -> list[Path]:
    names = [graph.name + suffix for suffix in _EXTERNAL_SUFFIXES] + [graph.stem + ".data"]
    return [graph.parent / n for n in dict.fromkeys(names) if (graph.parent / n).is_file()]


def _recorded(artifact: Artifact, variant: str) -> dict[str, str]:
    """relative path -> the sha256 the manifest records (and load verifies) for the variant's files."""
    if variant not in artifact.variants:
        raise KeyError(f"{artifact.path} has no variant {variant!r}; it has {sorted(artifact.variants)}")
    recorded = {rel: sha for rel, sha in artifact.variants[variant].files() if sha}
    recorded[artifact.manifest.tokenizer.file] = artifact.manifest.tokenizer.sha256
    return recorded


def variant_files(artifact: Artifact, variant: str) -> list[Path]:
    """Every file variant `variant` reads: its graph (.onnx, or OpenVINO's .xml and its .bin), the
    graph's external data if any, and tokenizer.json."""
    _recorded(artifact, variant)  # names the artifact and its variants when `variant` is unknown
    entry = artifact.variants[variant]
    paths = [artifact.path / rel for rel, _ in entry.files()]
    paths += _external_data(artifact.path / entry.file)
    paths.append(artifact.path / artifact.manifest.tokenizer.file)
    return list(dict.fromkeys(paths))


def vector_settings(artifact: Artifact) -> dict:
    """The manifest's settings that change vectors without changing a file."""
    m = artifact.manifest
    tok = m.tokenizer
    return {"max_length": m.max_length, "pooling": m.pooling, "normalize": m.normalize,
            "prompts": dict(sorted(m.prompts.items())), "family": m.family, "pad_id": m.pad_id,
            "inputs": list(m.inputs), "output": m.output, "embedding_dim": m.embedding_dim,
            "tokenizer": {"lowercase": tok.lowercase, "truncation": tok.truncation, "padding": tok.padding,
                          "kind": tok.kind}}


def variant_identity(artifact: Artifact, variant: str) -> str:
    """sha256 (hex) over the content hashes of `variant_files` and `vector_settings`: equal identities
    mean equal vectors from the same engine, wherever the artifact lies."""
    recorded = _recorded(artifact, variant)
    files = []
    for path in variant_files(artifact, variant):
        rel = path.relative_to(artifact.path).as_posix()
        # a recorded checksum is verified at load before the file is used; others are hashed here
        files.append([rel, recorded.get(rel) or sha256_file(path)])
    entry = artifact.variants[variant]
    payload = {"engine": entry.engine, "precision": entry.precision, "files": files,
               "settings": vector_settings(artifact)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()
