"""The typed manifest: a damaged manifest.json is refused as a whole, naming the file, the field and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from corom_runtime import Embedder
from corom_runtime.cli import main as corom
from corom_runtime.errors import ArtifactError
from corom_runtime.artifacts.manifest import FORMAT_VERSION, Manifest, TokenizerEntry, VariantEntry


def good() -> dict:
    m = Manifest(name="m", source="bundled:x", pooling="mean", normalize=True, score="cosine", max_length=128,
                 embedding_dim=384, tokenizer=TokenizerEntry(file="tokenizer.json", sha256="a" * 64))
    m.variants["int8"] = VariantEntry.for_variant("int8", sha256="b" * 64)
    m.variants["ov-int8"] = VariantEntry.for_variant("ov-int8", sha256="c" * 64, weights_sha256="d" * 64)
    return m.to_dict()


def damage(data: dict, path: str, value) -> dict:
    keys = path.split(".")
    target = data
    for key in keys[:-1]:
        target = target[key]
    if value is KeyError:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return data


CASES = [
    ("tokenizer.sha256 missing", lambda d: damage(d, "tokenizer.sha256", KeyError), "'tokenizer.sha256' is missing"),
    ("tokenizer.file missing", lambda d: damage(d, "tokenizer.file", KeyError), "'tokenizer.file' is missing"),
    ("variants as a list", lambda d: damage(d, "variants", [1, 2]), "'variants' must be an object, not a list"),
    ("top level a list", lambda d: [d], "the top level must be a JSON object, not a list"),
    ("max_length not a number", lambda d: damage(d, "max_length", "long"), "'max_length' must be a whole number"),
    ("max_length infinite", lambda d: damage(d, "max_length", 1e309), "'max_length' must be a whole number"),
    ("embedding_dim a bool", lambda d: damage(d, "embedding_dim", True), "'embedding_dim' must be a whole number"),
    ("pooling unknown", lambda d: damage(d, "pooling", "median"), "'pooling' is 'median', expected one of"),
    ("variant file escapes", lambda d: damage(d, "variants.int8.file", "../../../etc/passwd"), "points outside the artifact"),
    ("variant file absolute", lambda d: damage(d, "variants.int8.file", "/etc/passwd"), "points outside the artifact"),
    ("variant file is the folder", lambda d: damage(d, "variants.int8.file", "."), "points outside the artifact"),
    ("weights escape", lambda d: damage(d, "variants.ov-int8.weights_file", "../x.bin"), "points outside the artifact"),
    ("engine unknown", lambda d: damage(d, "variants.int8.engine", "tvm"), "'variants.int8.engine' is 'tvm'"),
    ("sha256 not hex", lambda d: damage(d, "variants.int8.sha256", "zz"), "'variants.int8.sha256' must be a sha256"),
    ("variant not an object", lambda d: damage(d, "variants.int8", "x"), "'variants.int8' must be an object"),
    ("devices not a list", lambda d: damage(d, "variants.int8.devices", "cpu"), "'variants.int8.devices' must be a list"),
    ("old format", lambda d: damage(d, "format_version", 1), f"is 1; this runtime reads {FORMAT_VERSION}"),
    ("no variants", lambda d: damage(d, "variants", {}), "'variants' is empty"),
]


def write(folder: Path, data) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


def test_good_manifest_round_trips(tmp_path):
    folder = write(tmp_path / "a", good())
    m = Manifest.read(folder / "manifest.json")
    assert m.variants["ov-int8"].weights_file == "model.ov-int8.bin" and m.variants["int8"].engine == "onnxruntime"
    assert Manifest.from_dict(m.to_dict(), folder / "manifest.json") == m


@pytest.mark.parametrize("case,mutate,message", CASES, ids=[c[0] for c in CASES])
def test_damaged_manifest_names_file_field_and_fix(tmp_path, capsys, case, mutate, message):
    folder = write(tmp_path / "a", mutate(good()))
    with pytest.raises(ArtifactError) as exc:
        Embedder.load(folder)
    text = str(exc.value)
    assert message in text and str(folder / "manifest.json") in text and "corom export" in text
    for command in (["info"], ["serve", "--port", "1"]):  # serve refuses before it binds
        assert corom([*command, "--model", str(folder)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_non_utf8_and_non_json_manifests(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "manifest.json").write_bytes(b'{"name": "\xff\xfe"}')
    with pytest.raises(ArtifactError, match=r"manifest.json is not UTF-8 text.*corom export"):
        Embedder.load(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"manifest.json is not valid JSON.*corom export"):
        Embedder.load(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"manifest.json is missing.*not a corom export"):
        Embedder.load(folder)
