"""`manifest.json`, the contract between exporter and runtime, as a typed object.

The runtime owns it: `Manifest.read` validates the whole file at once and every error names the file,
the field and the fix; the exporter builds one with the constructors below and `write`s it.
Variant files must stay inside the artifact folder.

>>> m = Manifest(name="m", source="s", pooling="mean", normalize=True, score="cosine", max_length=128,
...              embedding_dim=384, tokenizer=TokenizerEntry(file="tokenizer.json", sha256="0" * 64),
...              variants={"opt": VariantEntry(name="opt", file="model.opt.onnx", sha256="0" * 64,
...                                            engine="onnxruntime", precision="fp32", devices=["cpu"])})
>>> Manifest.from_dict(m.to_dict(), Path("manifest.json")).embedding_dim
384
>>> Manifest.from_dict({**m.to_dict(), "variants": {}}, Path("a/manifest.json"))
Traceback (most recent call last):
corom_runtime.errors.ArtifactError: a/manifest.json: field 'variants' is empty; re-run `corom export MODEL --out FOLDER --force` to rebuild the artifact
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from corom_runtime.catalog import ENGINES, VARIANTS
from corom_runtime.errors import ArtifactError
from corom_runtime.catalog import (POOLINGS, SCORES)  # one list of poolings and score functions, for presets and artifacts

MANIFEST = "manifest.json"
# 2: variants name their engine, devices and recipe, and may carry weights (OpenVINO IR) and speed.
FORMAT_VERSION = 2
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass
class TokenizerEntry:
    file: str
    sha256: str
    lowercase: bool = True
    truncation: str = "longest_first"
    padding: str = "per batch"
    kind: str = "WordPiece"          # the tokenizers model: WordPiece (BERT), Unigram (XLM-R), BPE (RoBERTa)


@dataclass
class VariantEntry:
    """One runnable variant: a graph file, the engine and precision it is for, and what it proved."""

    name: str
    file: str
    sha256: str
    engine: str
    precision: str
    devices: list[str]
    recipe: str = ""
    weights_file: str | None = None      # OpenVINO IR keeps its weights in a .bin beside the .xml
    weights_sha256: str | None = None
    passed: bool = False                 # only `corom verify` sets it, after the gate held
    parity: dict = field(default_factory=dict)
    # texts/s measured by `corom verify`, with the CPU and threads it was measured on
    speed: dict = field(default_factory=dict)
    # the platforms (CPU model and flags, engine version) its gate was measured on, with the verdict
    verified_on: list[dict] = field(default_factory=list)

    @classmethod
    def for_variant(cls, name: str, sha256: str, weights_sha256: str | None = None, file: str | None = None) -> "VariantEntry":
        """An entry with the engine table's facts about `name` (file, engine, precision, devices, recipe)."""
        spec = VARIANTS[name]
        graph = file or spec.file
        weights = str(PurePosixPath(graph).with_suffix(".bin")) if graph.endswith(".xml") else None
        return cls(name=name, file=graph, sha256=sha256, engine=spec.engine, precision=spec.precision,
                   devices=list(spec.devices), recipe=spec.recipe, weights_file=weights,
                   weights_sha256=weights_sha256 if weights else None)

    def files(self) -> list[tuple[str, str]]:
        """(relative path, sha256) of every file this variant reads."""
        out = [(self.file, self.sha256)]
        if self.weights_file:
            out.append((self.weights_file, self.weights_sha256 or ""))
        return out


@dataclass
class Manifest:
    name: str
    source: str
    pooling: str
    normalize: bool
    score: str
    max_length: int
    embedding_dim: int
    tokenizer: TokenizerEntry
    variants: dict[str, VariantEntry] = field(default_factory=dict)
    source_preset: str | None = None
    created: str = ""
    inputs: list[str] = field(default_factory=lambda: ["input_ids", "attention_mask"])
    output: str = "sentence_embedding"
    family: str = "bert"
    pad_id: int = 0                  # batches are padded with it (RoBERTa/XLM-R: 1)
    prompts: dict[str, str] = field(default_factory=dict)   # name -> text put before the input
    architecture: dict = field(default_factory=dict)
    tools: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    # the load-time check set (`cpu_check`): {"file", "sha256", "texts", "queries"}; {} in older artifacts
    check: dict = field(default_factory=dict)
    # reference vectors of calibration text, for int8/uint8 vector precision (`shaping`):
    # {"file", "sha256", "texts"}; {} in older artifacts
    quantization: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    # -- reading ---------------------------------------------------------------------------

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        """Read and validate `path` (an artifact's manifest.json)."""
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: {path.parent} is not a corom export; run `corom export`")
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ArtifactError(f"{path} is not UTF-8 text ({exc}); {_REEXPORT}") from exc
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{path} is not valid JSON ({exc}); {_REEXPORT}") from exc
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: Any, path: Path) -> "Manifest":
        check = _Checker(path)
        if not isinstance(data, dict):
            check.fail("", f"the top level must be a JSON object, not {_kind(data)}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            check.fail("format_version", f"is {version!r}; this runtime reads {FORMAT_VERSION}: "
                                         "re-export with this version of corom-onnx")
        tok = check.obj(data, "tokenizer")
        variants_raw = check.obj(data, "variants")
        manifest = cls(
            name=check.text(data, "name"),
            source=check.text(data, "source"),
            pooling=check.choice(data, "pooling", POOLINGS),
            normalize=check.boolean(data, "normalize"),
            score=check.choice(data, "score", SCORES),
            max_length=check.integer(data, "max_length", 2, 8192),
            embedding_dim=check.integer(data, "embedding_dim", 1, 65536),
            tokenizer=TokenizerEntry(
                file=check.relative_file(tok, "tokenizer.file"),
                sha256=check.sha256(tok, "tokenizer.sha256"),
                lowercase=check.boolean(tok, "tokenizer.lowercase", default=True),
                truncation=str(tok.get("truncation", "longest_first")),
                padding=str(tok.get("padding", "per batch")),
                kind=str(tok.get("kind", "WordPiece")),
            ),
            source_preset=check.optional_text(data, "source_preset"),
            created=str(data.get("created", "")),
            inputs=list(data.get("inputs", ["input_ids", "attention_mask"])),
            output=str(data.get("output", "sentence_embedding")),
            family=str(data.get("family", "bert")),
            pad_id=check.integer(data, "pad_id", 0, 1 << 24) if "pad_id" in data else 0,
            prompts=check.prompts(data, "prompts"),
            architecture=check.obj(data, "architecture", required=False),
            tools=check.obj(data, "tools", required=False),
            export=check.obj(data, "export", required=False),
            quality=check.obj(data, "quality", required=False),
            check=check.obj(data, "check", required=False),
            quantization=check.obj(data, "quantization", required=False),
        )
        for name in ("check", "quantization"):
            if getattr(manifest, name):
                check.relative_file(getattr(manifest, name), f"{name}.file")
                check.sha256(getattr(manifest, name), f"{name}.sha256")
        for name, raw in variants_raw.items():
            manifest.variants[name] = _variant(check, name, raw)
        if not manifest.variants:
            check.fail("variants", "is empty")
        return manifest

    # -- writing ---------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, folder: Path) -> None:
        """Write atomically, so a crash never leaves a half-written manifest behind."""
        tmp = folder / f"{MANIFEST}.{os.getpid()}.tmp"   # per process: two writers never share one
        try:
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())  # on disk before the rename makes it the manifest
            os.replace(tmp, folder / MANIFEST)
        finally:
            tmp.unlink(missing_ok=True)


_REEXPORT = "re-run `corom export MODEL --out FOLDER --force` to rebuild the artifact"


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _variant(check: "_Checker", name: str, raw: Any) -> VariantEntry:
    where = f"variants.{name}"
    if not isinstance(raw, dict):
        check.fail(where, f"must be an object, not {_kind(raw)}")
    engine = check.choice(raw, f"{where}.engine", tuple(ENGINES))
    weights = raw.get("weights_file")
    devices = raw.get("devices")
    if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
        check.fail(f"{where}.devices", "must be a list of device names")
    return VariantEntry(
        name=name,
        file=check.relative_file(raw, f"{where}.file"),
        sha256=check.sha256(raw, f"{where}.sha256"),
        engine=engine,
        precision=check.choice(raw, f"{where}.precision", PRECISIONS),
        devices=list(devices),
        recipe=str(raw.get("recipe", "")),
        weights_file=None if weights is None else check.relative_file(raw, f"{where}.weights_file"),
        weights_sha256=None if weights is None else check.sha256(raw, f"{where}.weights_sha256"),
        passed=check.boolean(raw, f"{where}.passed", default=False),
        parity=check.obj(raw, f"{where}.parity", required=False),
        speed=check.obj(raw, f"{where}.speed", required=False),
        verified_on=check.records(raw, f"{where}.verified_on"),
    )


class _Checker:
    """Field checks that name the manifest file, the field and the fix."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, dotted: str, problem: str) -> None:
        what = f"field {dotted!r} " if dotted else ""
        raise ArtifactError(f"{self.path}: {what}{problem}; {_REEXPORT}")

    def _get(self, data: dict, dotted: str, required: bool = True) -> Any:
        key = dotted.rsplit(".", 1)[-1]
        if key not in data:
            if required:
                self.fail(dotted, "is missing")
            return None
        return data[key]

    def text(self, data: dict, dotted: str) -> str:
        value = self._get(data, dotted)
        if not isinstance(value, str) or not value:
            self.fail(dotted, f"must be a non-empty string, not {_kind(value)}")
        return value

    def optional_text(self, data: dict, dotted: str) -> str | None:
        value = self._get(data, dotted, required=False)
        if value is not None and not isinstance(value, str):
            self.fail(dotted, f"must be a string or null, not {_kind(value)}")
        return value

    def choice(self, data: dict, dotted: str, allowed: tuple[str, ...]) -> str:
        value = self._get(data, dotted)
        if value not in allowed:
            self.fail(dotted, f"is {value!r}, expected one of {list(allowed)}")
        return value

    def boolean(self, data: dict, dotted: str, default: bool | None = None) -> bool:
        value = self._get(data, dotted, required=default is None)
        if value is None and default is not None:
            return default
        if not isinstance(value, bool):
            self.fail(dotted, f"must be true or false, not {_kind(value)}")
        return value

    def integer(self, data: dict, dotted: str, low: int, high: int) -> int:
        value = self._get(data, dotted)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or int(value) != value or not low <= value <= high:
            self.fail(dotted, f"must be a whole number from {low} to {high}, not {value!r}")
        return int(value)

    def obj(self, data: dict, dotted: str, required: bool = True) -> dict:
        value = self._get(data, dotted, required=required)
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            self.fail(dotted, f"must be an object, not {_kind(value)}")
        return value

    def records(self, data: dict, dotted: str) -> list[dict]:
        value = self._get(data, dotted, required=False)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.fail(dotted, "must be a list of objects")
        return list(value)

    def prompts(self, data: dict, dotted: str) -> dict[str, str]:
        value = self.obj(data, dotted, required=False)
        if not all(isinstance(k, str) and k and isinstance(v, str) for k, v in value.items()):
            self.fail(dotted, "must map prompt names to prompt texts (strings)")
        return dict(value)

    def sha256(self, data: dict, dotted: str) -> str:
        value = self._get(data, dotted)
        if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            self.fail(dotted, "must be a sha256 hex digest (64 lower-case hex digits)")
        return value

    def relative_file(self, data: dict, dotted: str) -> str:
        """A file name that resolves inside the artifact folder (no absolute path, no `..`)."""
        value = self.text(data, dotted)
        folder = self.path.parent.resolve()
        target = (folder / value).resolve()
        if PurePosixPath(value).is_absolute() or Path(value).is_absolute() or not target.is_relative_to(folder) \
                or target == folder:
            self.fail(dotted, f"{value!r} points outside the artifact folder {folder}")
        return value
