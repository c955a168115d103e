"""Verified on the CPU that serves it: a variant that passed elsewhere and fails here is never served."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from corom_runtime import Embedder, embedder as embedder_module
from corom_runtime.artifacts.artifact import sha256_file
from corom_runtime.cpu_check import CheckSet, Platform, check_gate, matching_record, pick_check_texts, read_cached
from corom_runtime.machine import cpu_isa
from corom_runtime.catalog import Gate
from corom_runtime.errors import VariantRejectedError
from corom_runtime.machine import cpu_model
from corom_runtime.machine import available_cpus

ELSEWHERE = "AMD EPYC 9R14 96-Core Processor (a CPU this artifact was verified on, not this one)"


def break_variant(folder: Path, variant: str) -> None:
    """Make `variant` wrong the way a kernel that misbehaves on one CPU is: flip the sign of half the
    embedding's dimensions (its checksum is updated, so only its numbers are wrong)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["variants"][variant]
    path = folder / entry["file"]
    model = onnx.load(str(path))
    out = model.graph.output[0].name
    producer = next(n for n in model.graph.node if out in n.output)
    producer.output[list(producer.output).index(out)] = "unflipped"
    dim = manifest["embedding_dim"]
    flip = np.where(np.arange(dim) % 2 == 0, 1.0, -1.0).astype(np.float32)[None, :]
    model.graph.initializer.append(numpy_helper.from_array(flip, "flip"))
    model.graph.node.append(helper.make_node("Mul", ["unflipped", "flip"], [out], name="broken_here"))
    onnx.save(model, str(path))
    entry["sha256"] = sha256_file(path)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def edit_manifest(folder: Path, fn) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    fn(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def fastest_here(manifest: dict, first: str) -> None:
    """Speeds measured on this CPU that rank `first` before every other variant."""
    for name, entry in manifest["variants"].items():
        entry["speed"] = {"texts_per_s": 10_000.0 if name == first else 100.0, "cpu": cpu_model(),
                          "threads": available_cpus()}


def verified_elsewhere(manifest: dict) -> None:
    for entry in manifest["variants"].values():
        for record in entry["verified_on"]:
            record["cpu"] = ELSEWHERE


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("COROM_CACHE_DIR", str(folder))
    return folder


def test_verify_records_the_platform_and_writes_a_check_set(corom_artifact):
    manifest = json.loads((corom_artifact / "manifest.json").read_text())
    check = manifest["check"]
    assert sha256_file(corom_artifact / check["file"]) == check["sha256"]
    data = CheckSet.read(corom_artifact / check["file"])
    assert len(data.texts) == check["texts"] and data.n_queries == check["queries"] > 0
    assert data.vectors.shape == (check["texts"], manifest["embedding_dim"])
    here = Platform.here("onnxruntime")
    for name, entry in manifest["variants"].items():
        record = matching_record(entry["verified_on"], Platform.here(entry["engine"]))
        assert record is not None and record["passed"] == entry["passed"], name
        if entry["passed"]:  # what the load-time check holds a served variant's top-10 to
            assert 0 < entry["parity"]["check_top10"] <= 1, name
    assert here.isa == cpu_isa()


def test_verifying_some_variants_keeps_the_check_set_the_others_refer_to(corom_artifact, tmp_path):
    from corom_export.verify import verify_artifact

    art = tmp_path / "art"
    shutil.copytree(corom_artifact, art)
    before = json.loads((art / "manifest.json").read_text())
    verify_artifact(art, n_queries=20, n_passages=200, variants=["int8"], stsb=False, speed_texts=64,
                    speed_rounds=1)  # the speed pass only has to exist: no figure of it is read here
    after = json.loads((art / "manifest.json").read_text())
    assert after["check"] == before["check"] and sha256_file(art / before["check"]["file"]) == before["check"]["sha256"]
    assert after["variants"]["opt"]["parity"]["check_top10"] == before["variants"]["opt"]["parity"]["check_top10"]
    assert 0 < after["variants"]["int8"]["parity"]["check_top10"] <= 1


def test_a_variant_that_passed_elsewhere_and_fails_here_is_never_served(corom_artifact, tmp_path, cache, caplog,
                                                                         monkeypatch):
    art = tmp_path / "art"
    shutil.copytree(corom_artifact, art)
    break_variant(art, "int8")
    edit_manifest(art, lambda m: (verified_elsewhere(m), fastest_here(m, "int8")))
    # a breakage the four canned texts would miss (they catch this one: see the next test), so the
    # check-set gate is what must stop it
    monkeypatch.setattr(embedder_module, "canned_failures", lambda *args: [])

    with caplog.at_level(logging.WARNING, logger="corom_runtime"):
        emb = Embedder.load(art, device="cpu")
    assert emb.variant != "int8"
    assert emb.info.verified["passed"] and emb.info.verified["source"] == "checked"
    assert "'int8'" in caplog.text and "fails its gate on this CPU" in caplog.text and "min cosine" in caplog.text
    with pytest.raises(VariantRejectedError, match="'int8'.*fails its gate on this CPU.*choose another variant"):
        Embedder.load(art, variant="int8", device="cpu")

    # both verdicts are cached: the next load runs no check, and still never serves int8
    def no_check(*args, **kwargs):
        raise AssertionError("the check ran again")

    monkeypatch.setattr(embedder_module, "run_check", no_check)
    again = Embedder.load(art, device="cpu")
    assert again.variant == emb.variant and again.info.verified["source"] == "cache"
    cached = [read_cached(cache / "checks", p.stem) for p in (cache / "checks").glob("*.json")]
    assert {c["variant"]: c["passed"] for c in cached}["int8"] is False


def test_canned_texts_catch_a_variant_broken_on_the_platform_it_was_verified_on(corom_artifact, tmp_path, cache):
    art = tmp_path / "art"
    shutil.copytree(corom_artifact, art)
    break_variant(art, "int8")
    edit_manifest(art, lambda m: fastest_here(m, "int8"))  # verified here, so only the canned texts run
    emb = Embedder.load(art, device="cpu")
    assert emb.variant != "int8" and emb.info.verified["source"] == "manifest"
    with pytest.raises(VariantRejectedError, match="canned texts: min cosine"):
        Embedder.load(art, variant="int8", device="cpu")


def test_an_unwritable_cache_still_checks(corom_artifact, tmp_path, monkeypatch):
    art = tmp_path / "art"
    shutil.copytree(corom_artifact, art)
    edit_manifest(art, verified_elsewhere)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("COROM_CACHE_DIR", str(blocker / "cache"))
    for _ in range(2):  # nothing can be cached: checked both times, served both times
        emb = Embedder.load(art, variant="opt", device="cpu")
        assert emb.info.verified["source"] == "checked" and emb.info.verified["passed"]


def test_the_check_is_skipped_only_on_request(corom_artifact, tmp_path, cache):
    art = tmp_path / "art"
    shutil.copytree(corom_artifact, art)
    break_variant(art, "int8")
    edit_manifest(art, verified_elsewhere)
    emb = Embedder.load(art, variant="int8", device="cpu", verify_here=False)  # what `corom verify` does
    assert emb.variant == "int8" and emb.info.verified == {}


# -- pure decisions -------------------------------------------------------------------------

def test_matching_record_needs_the_same_cpu_flags_engine_and_version():
    here = Platform(cpu="X", isa=("amx_int8", "avx512f"), engine="openvino", engine_version="2026.4.1")
    record = {**here.to_dict(), "passed": True}
    assert matching_record([record], here) is record
    for change in ({"cpu": "Y"}, {"isa": ["avx512f"]}, {"engine_version": "2026.5.0"}, {"engine": "onnxruntime"}):
        assert matching_record([{**record, **change}], here) is None


def test_check_gate_keeps_min_cosine_and_relaxes_top10_to_what_was_seen_on_the_check_set():
    gate = Gate(min_cosine=0.99, top10_agreement=0.97, batch_invariance=0.9995)
    assert check_gate(gate, 0.952) == Gate(min_cosine=0.99, top10_agreement=0.922, batch_invariance=0.9995)
    assert check_gate(gate, 1.0).top10_agreement == 0.97   # never looser than the variant's gate
    assert check_gate(gate, None) == gate


def test_check_set_holds_queries_the_hardest_passages_and_a_spread():
    cosines = np.ones(20 + 400)
    hardest = [25, 100, 333]
    cosines[hardest] = [0.61, 0.7, 0.8]
    queries, passages = pick_check_texts(20, cosines, n_queries_kept=8, n_passages_kept=50, n_hardest=10)
    assert queries == list(range(8))
    assert set(hardest) <= set(passages) and len(passages) == 50 and min(passages) >= 20
    assert len(set(passages)) == 50


def test_check_set_round_trips_in_fp16(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32)
    CheckSet(texts=["a", "bé", "代码", "", "x" * 300], n_queries=2, vectors=vectors).write(tmp_path / "c.npz")
    back = CheckSet.read(tmp_path / "c.npz")
    assert back.texts == ["a", "bé", "代码", "", "x" * 300] and back.n_queries == 2
    assert np.allclose(back.vectors, vectors, rtol=1e-3, atol=1e-3)
