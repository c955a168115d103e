"""The artifact lifecycle: content identity, atomic export/verify, caches keyed by content."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from corom_runtime.artifacts.artifact import load_artifact
from corom_runtime.artifacts.identity import variant_files, variant_identity



@pytest.fixture()
def copied_artifact(tmp_path, bundled_artifact) -> Path:
    out = tmp_path / "artifact"
    shutil.copytree(bundled_artifact, out)
    return out


def test_variant_files_name_every_file_read(bundled_artifact):
    artifact = load_artifact(bundled_artifact)
    ov = [v for v, e in artifact.variants.items() if e.file.endswith(".xml")]
    for name in ov:
        names = [p.name for p in variant_files(artifact, name)]
        assert names[0].endswith(".xml") and names[1].endswith(".bin") and "tokenizer.json" in names
    names = [p.name for p in variant_files(artifact, "int8")]
    assert names == [artifact.variants["int8"].file, artifact.manifest.tokenizer.file]


def test_variant_identity_follows_content_and_settings_not_place(copied_artifact, bundled_artifact):
    here, there = load_artifact(copied_artifact), load_artifact(bundled_artifact)
    assert variant_identity(here, "int8") == variant_identity(there, "int8")       # place-independent
    assert variant_identity(here, "int8") != variant_identity(here, "opt")
    base = variant_identity(here, "int8")
    for field, value in (("max_length", 64), ("pooling", "cls"), ("normalize", False), ("pad_id", 1),
                         ("prompts", {"query": "q: "}), ("family", "xlm-roberta")):
        changed = load_artifact(copied_artifact)
        setattr(changed.manifest, field, value)
        assert variant_identity(changed, "int8") != base, field
    changed = load_artifact(copied_artifact)
    changed.manifest.tokenizer.lowercase = not changed.manifest.tokenizer.lowercase
    assert variant_identity(changed, "int8") != base
    # a recorded checksum changes the identity (the file is checked against it at load)
    changed = load_artifact(copied_artifact)
    changed.manifest.variants["int8"].sha256 = "0" * 64
    assert variant_identity(changed, "int8") != base
    # a file the manifest records no checksum for (external data) is hashed by content, not mtime
    graph = copied_artifact / here.variants["int8"].file
    extra = graph.with_name(graph.name + ".data")
    extra.write_bytes(b"a" * 64)
    first = variant_identity(load_artifact(copied_artifact), "int8")
    assert first != base
    stat = extra.stat()
    extra.write_bytes(b"b" * 64)

    os.utime(extra, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert variant_identity(load_artifact(copied_artifact), "int8") != first
