"""Model presets.

Presets are package data (`presets.json`, one table): where a model's checkpoint comes from and how to
turn token states into a sentence embedding (pooling, normalisation), the default max length, the
score function and the model's prompts (e5's "query: ", bge's query instruction). More presets can be
added as `NAME.json` files in `$COROM_PRESETS_DIR`.

Exported presets live in the user cache, found by name from anywhere (`corom_runtime.artifacts.cache`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from corom_runtime.catalog import POOLINGS, SCORES
from corom_runtime.errors import PresetError

log = logging.getLogger(__name__)

TABLE = Path(__file__).with_name("presets.json")
# what `Embedder.load()` and the CLI load when no model is named: the model bundled for tests and demos
DEFAULT_PRESET = "all-minilm-l6-v2"


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
    prompts: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise PresetError(f"preset {self.name!r}: pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.score not in SCORES:
            raise PresetError(f"preset {self.name!r}: score must be one of {SCORES}, got {self.score!r}")
        if not 2 <= self.max_length <= self.max_length_limit:
            raise PresetError(
                f"preset {self.name!r}: max_length {self.max_length} must be within 2..{self.max_length_limit}"
            )
        if not isinstance(self.prompts, dict) or not all(
                isinstance(k, str) and k and isinstance(v, str) for k, v in self.prompts.items()):
            raise PresetError(f"preset {self.name!r}: prompts must map names to texts, got {self.prompts!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _user_presets() -> dict[str, dict]:
    folder = os.environ.get("COROM_PRESETS_DIR")
    if not folder or not Path(folder).is_dir():
        return {}
    out = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise PresetError(f"preset file {path} is malformed: {exc}") from exc
    return out


def _table() -> dict[str, dict]:
    return {**json.loads(TABLE.read_text(encoding="utf-8")), **_user_presets()}


def list_presets() -> list[str]:
    return sorted(_table())


def find_preset(name: str) -> str | None:
    """The preset's exact name for `name` (case-insensitive), or None."""
    return next((known for known in _table() if known.lower() == str(name).lower()), None)


def load_preset(name: str) -> Preset:
    """The preset `name` (case-insensitive).

    >>> load_preset("e5-small-v2").prompts["query"]
    'query: '
    """
    known = find_preset(name)
    if known is None:
        raise PresetError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}. "
                          "Pass one of them, or a checkpoint folder.")
    try:
        return Preset(name=known, **_table()[known])
    except TypeError as exc:
        raise PresetError(f"preset {known!r} is malformed: {exc}") from exc
