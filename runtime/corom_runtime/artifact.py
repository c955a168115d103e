"""The artifact folder written by `corom export`: manifest, tokenizer and ONNX variants.

The manifest is the contract between exporter and runtime. Loading checks it and the checksums
of the files actually used, and names the file and the rebuild command when something is off.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ArtifactError
from .presets import build_dir

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
VARIANTS = ("fp32", "opt", "fp16", "int8")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Variant:
    name: str
    file: str
    sha256: str
    precision: str
    providers: list[str]
    passed: bool
    parity: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Artifact:
    """A validated artifact folder. Use `load_artifact` to get one."""

    path: Path
    manifest: dict
    variants: dict[str, Variant]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def pooling(self) -> str:
        return self.manifest["pooling"]

    @property
    def normalize(self) -> bool:
        return bool(self.manifest["normalize"])

    @property
    def score(self) -> str:
        return self.manifest["score"]

    @property
    def max_length(self) -> int:
        return int(self.manifest["max_length"])

    @property
    def dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest["tokenizer"]["file"]

    @property
    def rebuild_hint(self) -> str:
        model = self.manifest.get("source_preset") or self.manifest.get("source", "MODEL")
        return f"rebuild it with `corom export {model} --out {self.path} --force`"

    def variant_path(self, name: str) -> Path:
        return self.path / self.variants[name].file

    def check_file(self, relative: str, expected_sha256: str) -> Path:
        """Raise `ArtifactError` unless the file exists and has the manifest's checksum."""
        path = self.path / relative
        if not path.is_file():
            raise ArtifactError(f"{path} is missing from the artifact; {self.rebuild_hint}")
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise ArtifactError(
                f"{path} does not match its checksum in {self.path / MANIFEST} "
                f"(sha256 {actual[:12]}... != {expected_sha256[:12]}...): the file is corrupt or was "
                f"replaced; {self.rebuild_hint}"
            )
        return path


def resolve_path(path_or_preset: str | Path) -> Path:
    """An artifact folder, or a preset name standing for `models/build/NAME`."""
    path = Path(path_or_preset)
    if path.is_dir():
        return path
    if isinstance(path_or_preset, str) and "/" not in path_or_preset and build_dir(path_or_preset).is_dir():
        return build_dir(path_or_preset)
    raise ArtifactError(
        f"no artifact at {path_or_preset!s}: export one with `corom export {path_or_preset} --out {path}` "
        "(or pass the folder that `corom export` wrote)"
    )


def load_artifact(path_or_preset: str | Path) -> Artifact:
    """Read and validate the manifest of an artifact folder (checksums are checked per file on use)."""
    folder = resolve_path(path_or_preset)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path} is missing: {folder} is not a corom export; run `corom export`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{manifest_path} is not valid JSON ({exc}); re-run `corom export --force`") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{manifest_path} has format_version {manifest.get('format_version')!r}; this runtime reads "
            f"{FORMAT_VERSION}: re-export with this version of corom-onnx"
        )
    missing = [k for k in ("name", "pooling", "normalize", "score", "max_length", "embedding_dim",
                           "tokenizer", "variants") if k not in manifest]
    if missing:
        raise ArtifactError(f"{manifest_path} lacks {missing}; re-run `corom export --force`")
    try:
        variants = {name: Variant(name=name, **spec) for name, spec in manifest["variants"].items()}
    except TypeError as exc:
        raise ArtifactError(f"{manifest_path}: malformed variant entry ({exc})") from exc
    return Artifact(path=folder, manifest=manifest, variants=variants)
