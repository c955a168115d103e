"""The artifact folder written by `corom export`: manifest, tokenizer and variant graphs.

Loading validates the manifest as a whole (see `manifest.Manifest`); the checksums of the files
actually used are checked when a variant is opened, and errors name the file and the rebuild command.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from corom_runtime.errors import ArtifactError, MissingArtifactError
from corom_runtime.artifacts.manifest import MANIFEST, Manifest, VariantEntry
from corom_runtime.artifacts.cache import artifact_dir, build_dir
from corom_runtime.artifacts.presets import find_preset, list_presets

if TYPE_CHECKING:
    import numpy as np
    from corom_runtime.cpu_check import CheckSet


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Artifact:
    """A validated artifact folder. Use `load_artifact` to get one."""

    path: Path
    manifest: Manifest

    @property
    def variants(self) -> dict[str, VariantEntry]:
        return self.manifest.variants

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def pooling(self) -> str:
        return self.manifest.pooling

    @property
    def normalize(self) -> bool:
        return self.manifest.normalize

    @property
    def score(self) -> str:
        return self.manifest.score

    @property
    def max_length(self) -> int:
        return self.manifest.max_length

    @property
    def pad_id(self) -> int:
        return self.manifest.pad_id

    @property
    def prompts(self) -> dict[str, str]:
        return self.manifest.prompts

    @property
    def dim(self) -> int:
        return self.manifest.embedding_dim

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest.tokenizer.file

    @property
    def rebuild_hint(self) -> str:
        model = self.manifest.source_preset or self.manifest.source or "MODEL"
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

    def check_variant(self, name: str) -> Path:
        """Check every file of variant `name`; return the path of its graph."""
        entry = self.variants[name]
        for relative, sha in entry.files():
            self.check_file(relative, sha)
        return self.path / entry.file

    def check_tokenizer(self) -> Path:
        return self.check_file(self.manifest.tokenizer.file, self.manifest.tokenizer.sha256)

    def check_set(self) -> "CheckSet | None":
        """The load-time check set (`cpu_check`), checksum-verified; None for an artifact without one."""
        from corom_runtime.cpu_check import CheckSet

        if not self.manifest.check:
            return None
        path = self.check_file(self.manifest.check["file"], self.manifest.check["sha256"])
        try:
            return CheckSet.read(path)
        except (OSError, ValueError, KeyError) as exc:
            raise ArtifactError(f"{path} is not a valid check set ({exc}); {self.rebuild_hint}") from exc

    def quantization_vectors(self) -> "np.ndarray | None":
        """The reference vectors of calibration text that int8/uint8 precision scales by (float32
        [n, dim]), checksum-verified; None for an artifact exported before vector quantization."""
        import numpy as np

        if not self.manifest.quantization:
            return None
        path = self.check_file(self.manifest.quantization["file"], self.manifest.quantization["sha256"])
        try:
            with np.load(path, allow_pickle=False) as data:
                vectors = data["vectors"].astype(np.float32)
        except (OSError, ValueError, KeyError) as exc:
            raise ArtifactError(f"{path} is not a valid calibration file ({exc}); {self.rebuild_hint}") from exc
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ArtifactError(f"{path} holds vectors of shape {list(vectors.shape)}, not [n, {self.dim}]; "
                                f"{self.rebuild_hint}")
        return vectors


def resolve_path(path_or_preset: str | Path) -> Path:
    """An artifact folder; or a preset name, found in the user cache (`presets.artifact_dir`), else in a
    clone's `models/build/NAME`."""
    path = Path(path_or_preset).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_preset)
    if "/" not in name and "\\" not in name:
        found = find_exported(name)
        if found is not None:
            return found
        known = find_preset(name)
        if known:
            raise MissingArtifactError(
                f"preset {known!r} has not been exported on this machine (looked in {artifact_dir(known)}): "
                f"run `corom export {known}` (needs the exporter: the CPU torch, then pip install "
                "'corom-onnx[export]'; see README)", preset=known)
    raise ArtifactError(
        f"no artifact at {path_or_preset!s}: pass the folder that `corom export` wrote, or a preset name "
        f"({', '.join(list_presets())})")


def find_exported(name: str) -> Path | None:
    """Where the artifact of the name `name` is, by the one lookup rule (`Embedder.load(NAME)`, `-m NAME`,
    `corom presets`): the user cache, else a clone's `models/build/NAME`; None where neither has it."""
    return next((c for c in (artifact_dir(name), build_dir(name)) if c.is_dir()), None)


def load_artifact(path_or_preset: str | Path) -> Artifact:
    """Read and validate the manifest of an artifact folder (checksums are checked per file on use)."""
    folder = resolve_path(path_or_preset)
    return Artifact(path=folder, manifest=Manifest.read(folder / MANIFEST))
