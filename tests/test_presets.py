"""Presets by name from anywhere: package data, user presets, the user cache, export on first use."""

from __future__ import annotations

import json

import numpy as np
import pytest

from corom_export.sources import SourceError, resolve
from corom_runtime import Embedder
from corom_runtime.cli import main as corom
from corom_runtime.errors import PresetError
from corom_runtime.artifacts.cache import artifact_dir
from corom_runtime.artifacts.presets import list_presets, load_preset

ISSUE_PRESETS = ("corom-english-tiny", "all-minilm-l6-v2", "bge-small-en-v1.5", "e5-small-v2",
                 "multilingual-e5-small", "paraphrase-multilingual-MiniLM-L12-v2")


def test_presets_ship_with_the_package_and_carry_their_prompts():
    for name in ISSUE_PRESETS:
        preset = load_preset(name)  # names are case-insensitive
        assert preset.pooling in ("cls", "mean") and preset.max_length <= preset.max_length_limit
    assert load_preset("e5-small-v2").prompts == {"query": "query: ", "passage": "passage: "}
    assert load_preset("bge-small-en-v1.5").prompts["query"].startswith("Represent this sentence")
    assert load_preset("corom-english-tiny").score == "dot" and not load_preset("corom-english-tiny").prompts
    with pytest.raises(PresetError, match="unknown preset 'nope'.*e5-small-v2"):
        load_preset("nope")


def test_hub_download_offline_names_the_offline_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on a machine without the hub, even where one is reachable
    with pytest.raises(SourceError, match=r"BAAI/bge-small-en-v1.5.*corom export DIR --preset NAME"):
        resolve("hf:BAAI/bge-small-en-v1.5")


def test_a_missing_preset_is_exported_into_the_cache_on_first_load(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """A user preset (COROM_PRESETS_DIR) naming a local checkpoint; the cache in a temp folder."""
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "tiny-corom.json").write_text(json.dumps({
        "source": str(tiny_checkpoint), "pooling": "cls", "normalize": False, "score": "dot", "max_length": 64,
        "prompts": {"query": "q: "}}))
    monkeypatch.setenv("COROM_PRESETS_DIR", str(presets))
    monkeypatch.setenv("COROM_CACHE_DIR", str(tmp_path / "cache"))
    assert "tiny-corom" in list_presets()
    first = Embedder.load("tiny-corom", variant="fp32", device="cpu")  # exports (progress on stderr)
    assert first.artifact.path == artifact_dir("tiny-corom") == tmp_path / "cache" / "artifacts" / "tiny-corom"
    stamp = (first.artifact.path / "manifest.json").stat().st_mtime_ns
    again = Embedder.load("tiny-corom", variant="fp32", device="cpu", export_missing=False)  # from the cache now
    assert (again.artifact.path / "manifest.json").stat().st_mtime_ns == stamp
    np.testing.assert_allclose(again.encode(["x"], prompt_name="query"), first.encode(["q: x"]), atol=1e-6)
    capsys.readouterr()  # what the export printed
    assert corom(["presets", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tiny-corom"]["exported"] and not rows["e5-small-v2"]["exported"]
