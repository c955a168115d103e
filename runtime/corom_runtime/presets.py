"""Model presets: one small JSON file per model in the repository's `models/` folder.

A preset says where the checkpoint comes from and how to turn token states into a sentence
embedding (pooling, normalisation), the default max length and the score function.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import PresetError

POOLINGS = ("cls", "mean")
SCORES = ("dot", "cosine")


@dataclass(frozen=True)
class Preset:
    name: str
    source: str
    pooling: str
    normalize: bool
    score: str
    max_length: int
    max_length_limit: int = 512
    description: str = ""

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise PresetError(f"preset {self.name!r}: pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.score not in SCORES:
            raise PresetError(f"preset {self.name!r}: score must be one of {SCORES}, got {self.score!r}")
        if not 2 <= self.max_length <= self.max_length_limit:
            raise PresetError(
                f"preset {self.name!r}: max_length {self.max_length} must be within 2..{self.max_length_limit}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def models_dir() -> Path:
    """The folder holding the presets (`COROM_MODELS_DIR`, else the repository's `models/`)."""
    env = os.environ.get("COROM_MODELS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "models"


def build_dir(name: str) -> Path:
    """Where `corom export NAME` writes its artifact by default."""
    return models_dir() / "build" / name


def list_presets() -> list[str]:
    folder = models_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def load_preset(name: str) -> Preset:
    """Read the preset `name` from `models/NAME.json`.

    >>> load_preset("all-minilm-l6-v2").pooling
    'mean'
    """
    path = models_dir() / f"{name}.json"
    if not path.is_file():
        raise PresetError(
            f"unknown preset {name!r}; known presets: {', '.join(list_presets()) or 'none'} "
            f"(in {models_dir()}). Pass one of them, or a checkpoint folder."
        )
    try:
        data = json.loads(path.read_text())
        return Preset(**data)
    except (json.JSONDecodeError, TypeError) as exc:
        raise PresetError(f"preset file {path} is malformed: {exc}") from exc
