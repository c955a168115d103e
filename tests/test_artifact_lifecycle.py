"""The artifact lifecycle: content identity, atomic export/verify, caches keyed by content."""

from __future__ import annotations

import json
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


# -- export and verify: build and verify beside, then swap --------------------------------------

TINY_SIZES = dict(n_queries=20, n_passages=100)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny checkpoint exported (ONNX Runtime variants) and verified on a small parity set."""
    from conftest import shared
    from corom_export.build import ExportOptions, export_artifact
    from corom_export.verify import verify_artifact

    def build(out: Path) -> None:
        export_artifact(str(tiny_checkpoint), out, ExportOptions(openvino=False, max_length=64))
        verify_artifact(out, **TINY_SIZES, stsb=False, speed_texts=32, speed_rounds=1)
    return shared(tmp_path_factory, "tiny-artifact", build, "tiny")


@pytest.fixture()
def tiny_copy(tmp_path, tiny_artifact) -> Path:
    out = tmp_path / "tiny"
    shutil.copytree(tiny_artifact, out)
    return out


def manifest_bytes(folder: Path) -> bytes:
    return (folder / "manifest.json").read_bytes()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def test_an_exported_artifact_has_the_umasks_mode(tiny_artifact):
    umask = os.umask(0)
    os.umask(umask)
    assert tiny_artifact.stat().st_mode & 0o777 == 0o777 & ~umask


def test_cli_export_force_keeps_the_old_artifact_serving_while_the_new_one_is_verified(
        tiny_copy, tiny_checkpoint, monkeypatch):
    from corom_export import hooks
    from corom_runtime import Embedder
    from corom_runtime.cli import main as corom

    old = manifest_bytes(tiny_copy)
    seen: list[Path] = []

    def verify_then_sigterm(work, **kwargs):  # the new artifact is being verified...
        seen.append(Path(work))
        assert Path(work) != tiny_copy and manifest_bytes(tiny_copy) == old
        emb = Embedder.load(tiny_copy, variant="opt", device="cpu", warmup=False)   # ...the old one serves
        assert emb.encode(["still serving"]).shape == (1, 64)
        raise SystemExit(143)  # what SIGTERM raises during `corom export` (hooks._terminate_cleanly)

    monkeypatch.setattr(hooks, "verify_artifact", verify_then_sigterm)
    with pytest.raises(SystemExit):
        corom(["export", str(tiny_checkpoint), "--out", str(tiny_copy), "--force", "--no-openvino",
               "--max-length", "64", "--queries", "5", "--passages", "40"])
    assert seen and manifest_bytes(tiny_copy) == old and leftovers(tiny_copy) == []
    assert Embedder.load(tiny_copy, variant="opt", device="cpu", warmup=False).variant == "opt"


# `corom export` in a child process whose ONNX export step is a slow stand-in: it names the work
# folder (the tokenizer is already written there) and waits, and the test SIGTERMs the child, never
# its own process (that would kill a test worker). The verify phase's exit is covered above.
_SLOW_EXPORT = """
import sys, time
from pathlib import Path
from corom_export import graph
from corom_runtime.cli import main

def slow_export(encoder, path, *args, **kwargs):
    ready = Path(sys.argv[1] + ".part")
    ready.write_text(str(Path(path).parent))
    ready.rename(sys.argv[1])  # whole, or not there
    time.sleep(300)

graph.export_plain = slow_export
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_while_exporting_raises_system_exit_so_the_work_folder_is_removed(
        tiny_copy, tiny_checkpoint, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    old = manifest_bytes(tiny_copy)
    marker = tmp_path / "verifying"
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOW_EXPORT, str(marker), "export", str(tiny_checkpoint), "--out", str(tiny_copy),
         "--force", "--no-openvino", "--max-length", "64", "--queries", "5", "--passages", "40"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if not marker.exists():
            child.kill()
            pytest.fail(f"the export never reached its ONNX step:\n{child.communicate(timeout=30)[0]}")
        work = Path(marker.read_text())
        assert (work / "tokenizer.json").is_file() and work.parent == tiny_copy.parent
        child.send_signal(signal.SIGTERM)
        output, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 128 + signal.SIGTERM, output  # SystemExit(143), not the default kill (-15)
    assert not work.exists() and leftovers(tiny_copy) == []
    assert manifest_bytes(tiny_copy) == old  # the old artifact is as it was, and still loads
    from corom_runtime import Embedder
    assert Embedder.load(tiny_copy, variant="opt", device="cpu", warmup=False).variant == "opt"


def new_beside(out: Path, source: Path) -> Path:
    from corom_export.build import new_work_folder

    work = new_work_folder(out)
    shutil.copytree(source, work, dirs_exist_ok=True)
    return work


def test_install_keeps_the_old_artifact_when_the_new_one_fails_or_is_interrupted(tiny_copy, tiny_artifact):
    from corom_export.build import install

    old = manifest_bytes(tiny_copy)
    work = new_beside(tiny_copy, tiny_artifact)
    assert install(work, tiny_copy, force=True, verify=lambda w: False) is None   # no variant passed
    assert manifest_bytes(tiny_copy) == old and not work.exists()

    def interrupted(w):
        raise KeyboardInterrupt
    work = new_beside(tiny_copy, tiny_artifact)
    with pytest.raises(KeyboardInterrupt):
        install(work, tiny_copy, force=True, verify=interrupted)
    assert manifest_bytes(tiny_copy) == old and leftovers(tiny_copy) == []


def test_install_swaps_a_verified_artifact_in_and_removes_the_old(tiny_copy, tiny_artifact):
    from corom_export.build import install

    work = new_beside(tiny_copy, tiny_artifact)
    (work / "manifest.json").write_text((work / "manifest.json").read_text().replace('"created": "',
                                                                                      '"created": "new '))
    assert install(work, tiny_copy, force=True, verify=lambda w: True) == tiny_copy
    assert b'"created": "new ' in manifest_bytes(tiny_copy) and leftovers(tiny_copy) == []


def test_install_through_a_symlinked_out_keeps_the_link_and_verifies(tiny_copy, tiny_artifact, tmp_path):
    from corom_export.build import install

    link = tmp_path / "current"
    link.symlink_to(tiny_copy)
    verified: list[Path] = []
    work = new_beside(tiny_copy, tiny_artifact)
    assert install(work, link, force=True, verify=lambda w: verified.append(w) or True) == tiny_copy
    assert link.is_symlink() and link.resolve() == tiny_copy and verified == [work]
    assert leftovers(tiny_copy) == []


def test_install_refuses_an_out_that_appeared_while_exporting(tiny_copy, tiny_artifact, tmp_path):
    from corom_export.build import install
    from corom_runtime.errors import CoromError

    old = manifest_bytes(tiny_copy)
    work = new_beside(tiny_copy, tiny_artifact)
    with pytest.raises(CoromError, match="appeared while exporting"):
        install(work, tiny_copy, force=False, verify=lambda w: True)   # checked absent at the start
    assert manifest_bytes(tiny_copy) == old and not work.exists()


def test_a_lock_wait_that_times_out_is_an_error_not_a_lockless_run(tmp_path, monkeypatch):
    from filelock import FileLock

    from corom_runtime.artifacts.cache import cache_lock
    from corom_runtime.errors import CoromError

    monkeypatch.setenv("COROM_CACHE_DIR", str(tmp_path))
    (tmp_path / "locks").mkdir()
    held = FileLock(str(tmp_path / "locks" / "busy.lock"))
    held.acquire()
    ran = []
    try:
        with pytest.raises(CoromError, match="waited"):
            with cache_lock("busy", timeout=0.2):
                ran.append(True)
    finally:
        held.release()
    assert ran == []


def test_a_folder_named_like_a_preset_does_not_take_its_slot(tmp_path, monkeypatch):
    from corom_export.hooks import default_out
    from corom_runtime.artifacts.cache import artifact_dir
    from corom_runtime.errors import CoromError

    monkeypatch.setenv("COROM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "e5-small-v2").mkdir()
    with pytest.raises(CoromError, match="named like the preset"):
        default_out("./e5-small-v2", None)
    assert default_out("e5-small-v2", None) == artifact_dir("e5-small-v2")          # the preset's own export
    (tmp_path / "my-model").mkdir()
    assert default_out("./my-model", None) == artifact_dir("my-model")
    assert default_out("./e5-small-v2", "e5-small-v2") == artifact_dir("e5-small-v2")  # said so: --preset


@pytest.mark.parametrize("flags", [["--queries", "0", "--passages", "30"], ["--passages", "5"],
                                   ["--passages", "-5"], ["--passages", "0"], ["--threads", "0"],
                                   ["--queries", "201"]])
def test_verify_refuses_sizes_that_cannot_measure_the_gate_before_writing(tiny_copy, flags, capsys):
    from corom_runtime.cli import main as corom

    before = manifest_bytes(tiny_copy)
    assert corom(["verify", str(tiny_copy), "--no-stsb", *flags]) == 2
    assert "error" in capsys.readouterr().err
    assert manifest_bytes(tiny_copy) == before


def test_a_smaller_verify_keeps_the_full_runs_figures(tiny_copy):
    from corom_export.verify import verify_artifact

    before = json.loads(manifest_bytes(tiny_copy))
    verify_artifact(tiny_copy, n_queries=5, n_passages=40, variants=["opt"], stsb=False, speed_texts=16,
                    speed_rounds=1)
    after = json.loads(manifest_bytes(tiny_copy))
    assert after["variants"]["opt"] == before["variants"]["opt"]
    # nor the others' speeds: every speed `auto` ranks stays from the one full run
    assert {n: v["speed"] for n, v in after["variants"].items()} == {n: v["speed"] for n, v in before["variants"].items()}


def test_a_verify_of_some_variants_times_every_variant_that_passed(tiny_copy):
    """`auto` ranks speeds against each other: a verify of one variant re-times the others that passed
    too, so no ranking compares a figure from a busy hour with one from a quiet one."""
    from corom_export.verify import verify_artifact

    before = json.loads(manifest_bytes(tiny_copy))
    passed = sorted(n for n, v in before["variants"].items() if v["passed"])
    assert len(passed) > 1 and all(before["variants"][n]["speed"]["texts"] == 32 for n in passed)
    verify_artifact(tiny_copy, **TINY_SIZES, variants=["opt"], stsb=False, speed_texts=16, speed_rounds=1)
    after = json.loads(manifest_bytes(tiny_copy))
    assert {n: after["variants"][n]["speed"]["texts"] for n in passed} == {n: 16 for n in passed}
    assert len({after["variants"][n]["speed"]["measured"][:16] for n in passed}) == 1  # one run, to the minute
    assert {n: after["variants"][n]["parity"] for n in passed if n != "opt"} == \
        {n: before["variants"][n]["parity"] for n in passed if n != "opt"}  # only opt was judged again


def test_an_interrupted_verify_leaves_a_loadable_artifact(tiny_copy, monkeypatch):
    """The check and calibration files are written under new names; the manifest last; the files it
    named before are removed only after it moved on."""
    from corom_export.verify import verify_artifact
    from corom_runtime.artifacts.manifest import Manifest

    before = json.loads(manifest_bytes(tiny_copy))

    def killed(self, folder):
        raise KeyboardInterrupt
    monkeypatch.setattr(Manifest, "write", killed)
    with pytest.raises(KeyboardInterrupt):   # more texts than the fixture's: a different check set
        verify_artifact(tiny_copy, n_queries=25, n_passages=120, stsb=False, speed_texts=16, speed_rounds=1)
    monkeypatch.undo()
    art = load_artifact(tiny_copy)
    assert art.check_set() is not None and art.quantization_vectors() is not None  # checksums still hold
    # the new files lie beside the old, content-addressed, named by no manifest yet
    new = sorted(p.name for p in tiny_copy.glob("check.*.npz") if p.name != before["check"]["file"])
    assert len(new) == 1 and (tiny_copy / before["check"]["file"]).is_file()
    # once the manifest names the new one, the file only the old manifest named goes
    from corom_export.verify import _remove_replaced
    _remove_replaced(tiny_copy, before, {**before, "check": {"file": new[0]}})
    assert not (tiny_copy / before["check"]["file"]).exists() and (tiny_copy / new[0]).is_file()


# -- caches keyed by content; the load-time check on every device ---------------------------------

def test_the_verdict_cache_key_holds_the_variant_identity_and_the_engine_version():
    from corom_runtime.cpu_check import Platform, cache_key

    here = Platform(cpu="CPU", isa=("avx2",), engine="onnxruntime", engine_version="1.32.0")
    key = cache_key("a" * 64, "c" * 64, "int8", here)
    assert key != cache_key("b" * 64, "c" * 64, "int8", here)                         # identity
    assert key != cache_key("a" * 64, "c" * 64, "int8", Platform(**{**here.__dict__, "engine_version": "1.33.0"}))
    assert key != cache_key("a" * 64, "c" * 64, "int8", Platform(**{**here.__dict__, "device": "cuda:H100"}))
    assert key != cache_key("a" * 64, "d" * 64, "int8", here)


def test_an_unknown_platform_matches_no_record_and_no_cached_verdict(tmp_path):
    from corom_runtime.cpu_check import CheckResult, Platform, cache_key, matching_record, read_cached, write_cached

    unknown = Platform(cpu="x86_64", isa=(), engine="onnxruntime", engine_version="1.32.0", known=False)
    assert matching_record([{**unknown.to_dict(), "passed": True}], unknown) is None
    key = cache_key("a" * 64, "c" * 64, "int8", unknown)
    write_cached(tmp_path, key, CheckResult("int8", unknown.to_dict(), True, []))
    assert read_cached(tmp_path, key) is None and list(tmp_path.iterdir()) == []


def test_load_caches_its_verdict_under_the_variant_identity(tiny_copy, tmp_path, monkeypatch):
    from corom_runtime import Embedder
    from corom_runtime.artifacts.identity import variant_identity
    from corom_runtime.cpu_check import Platform, cache_key

    monkeypatch.setenv("COROM_CACHE_DIR", str(tmp_path / "cache"))
    m = json.loads(manifest_bytes(tiny_copy))
    for entry in m["variants"].values():   # verified elsewhere: checked here, once, and cached
        entry["verified_on"] = [{**r, "cpu": "another CPU"} for r in entry["verified_on"]]
    (tiny_copy / "manifest.json").write_text(json.dumps(m))
    emb = Embedder.load(tiny_copy, variant="opt", device="cpu", warmup=False)
    assert emb.info.verified["source"] == "checked"
    art = load_artifact(tiny_copy)
    key = cache_key(variant_identity(art, "opt"), art.manifest.check["sha256"], "opt", Platform.here("onnxruntime"))
    assert (tmp_path / "cache" / "checks" / f"{key}.json").is_file()
    # a setting that changes vectors without changing a file is another variant: checked again
    m["prompts"] = {"query": "q: "}
    (tiny_copy / "manifest.json").write_text(json.dumps(m))
    assert Embedder.load(tiny_copy, variant="opt", device="cpu", warmup=False).info.verified["source"] == "checked"


def test_a_variant_that_falls_back_from_cuda_to_the_cpu_is_checked_as_a_cpu_one(tiny_copy, tmp_path, monkeypatch):
    from corom_runtime import Embedder, embedder as embedder_module

    monkeypatch.setenv("COROM_CACHE_DIR", str(tmp_path / "cache"))
    m = json.loads(manifest_bytes(tiny_copy))
    m["variants"]["opt"]["verified_on"] = [{**r, "cpu": "another CPU"} for r in m["variants"]["opt"]["verified_on"]]
    (tiny_copy / "manifest.json").write_text(json.dumps(m))
    # onnxruntime-gpu that lists CUDA but cannot run it: the session runs on the CPU provider
    monkeypatch.setattr(embedder_module, "present_devices", lambda engines, want: ("cuda", "cpu"))
    emb = Embedder.load(tiny_copy, variant="opt", device="cuda", allow_fallback=True, warmup=False)
    assert emb.session.device == "cpu"
    assert emb.info.verified and emb.info.verified["source"] == "checked"
    assert emb.info.verified["platform"]["device"] == "cpu"


def test_what_runs_on_tensorrt_is_recorded_and_gated_as_fp16():
    from corom_runtime.catalog import gate_of
    from corom_runtime.cpu_check import gate_run
    from corom_runtime.engines.ort import precision_run

    assert precision_run("fp32", "TensorrtExecutionProvider") == "fp16"
    assert precision_run("fp32", "CUDAExecutionProvider") == "fp32"
    assert gate_run("fp32", "fp16") == gate_of("fp16") and gate_run("int8", "int8") == gate_of("int8")


def test_a_tensorrt_batch_above_the_profile_runs_in_slices():
    import numpy as np

    from corom_runtime.engines.ort import ORTSession

    session = ORTSession.__new__(ORTSession)
    seen: list[int] = []

    def run(ids, mask):
        seen.append(len(ids))
        return ids[:, :1].astype(np.float32)
    session._run, session._max_rows = run, 64
    ids = np.arange(150)[:, None].repeat(3, axis=1)
    out = session.run(ids, np.ones_like(ids))
    assert seen == [64, 64, 22] and out[:, 0].tolist() == list(range(150))


def test_roberta_max_length_is_refused_past_its_position_table(tmp_path):
    from checkpoints import write_xlmr_checkpoint
    from corom_export.build import ExportOptions, position_limit, settings_for
    from corom_export.families import FAMILIES
    from corom_runtime.errors import CoromError

    assert position_limit({"max_position_embeddings": 514, "pad_token_id": 1}, FAMILIES["xlm-roberta"]) == 512
    assert position_limit({"max_position_embeddings": 512, "pad_token_id": 0}, FAMILIES["bert"]) == 512
    folder = write_xlmr_checkpoint(tmp_path / "xlmr")          # max_position_embeddings 130, pad id 1
    assert settings_for(str(folder), ExportOptions(max_length=128))[0].max_length == 128
    with pytest.raises(CoromError, match="at most 128 tokens"):
        settings_for(str(folder), ExportOptions(max_length=129))


def test_a_checkpoint_whose_position_table_is_under_128_exports_within_it(tmp_path):
    """The default 128 was checked against the table before --max-length applied: a 64-position BERT
    could not be exported at all ("max_length 128 must be within 2..64", --max-length 64 or not)."""
    from checkpoints import write_modelscope_checkpoint
    from corom_export.build import ExportOptions, settings_for
    from corom_runtime.errors import CoromError

    folder = write_modelscope_checkpoint(tmp_path / "short", num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                                         num_attention_heads=2, max_position_embeddings=64)
    assert settings_for(str(folder), ExportOptions())[0].max_length == 64
    assert settings_for(str(folder), ExportOptions(max_length=32))[0].max_length == 32
    # a window past the table names the table (it said "preset 'short': max_length 100 must be within 2..64")
    with pytest.raises(CoromError, match="at most 64 tokens"):
        settings_for(str(folder), ExportOptions(max_length=100))


def test_a_roberta_default_window_stays_within_its_position_table(tmp_path):
    """The default window was min(128, max_position_embeddings), past what a RoBERTa-family table holds
    (it starts after the pad id): a 66-position XLM-R was refused "--max-length 66" with no --max-length."""
    import json

    from checkpoints import write_xlmr_checkpoint
    from corom_export.build import ExportOptions, settings_for

    folder = write_xlmr_checkpoint(tmp_path / "xlmr")          # pad id 1
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 66}))
    assert settings_for(str(folder), ExportOptions())[0].max_length == 64


def perturbed(folder: Path, variant: str, scale: float) -> None:
    """Noise of `scale` x each weight matrix's spread on a variant's graph (a realistically broken
    variant: min cos 0.96 at 0.05, 0.69 at 0.15 on the bundled model's check set), manifest updated."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from corom_runtime.artifacts.artifact import sha256_file

    path = folder / load_artifact(folder).variants[variant].file
    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        weights = numpy_helper.to_array(init)
        if weights.dtype == np.float32 and weights.ndim == 2 and weights.size > 10000:
            noisy = weights + rng.normal(0, scale * weights.std(), weights.shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    onnx.save(model, str(path))
    m = json.loads(manifest_bytes(folder))
    m["variants"][variant]["sha256"] = sha256_file(path)
    for entry in m["variants"].values():   # verified elsewhere: the load-time check decides here
        entry["verified_on"] = [{**r, "cpu": "another CPU"} for r in entry["verified_on"]]
    (folder / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("scale", [0.05, 0.15])
def test_the_load_time_check_rejects_a_realistically_broken_variant(bundled_artifact, tmp_path, monkeypatch, scale):
    from corom_runtime import Embedder
    from corom_runtime.errors import VariantRejectedError

    monkeypatch.setenv("COROM_CACHE_DIR", str(tmp_path / "cache"))
    art = tmp_path / "art"
    art.mkdir()
    m = json.loads(manifest_bytes(bundled_artifact))
    m["variants"] = {"opt": m["variants"]["opt"]}     # the files of one variant, not the whole artifact
    for name in ("tokenizer.json", m["check"]["file"], m["variants"]["opt"]["file"]):
        shutil.copy(bundled_artifact / name, art / name)
    (art / "manifest.json").write_text(json.dumps(m))
    perturbed(art, "opt", scale)
    with pytest.raises(VariantRejectedError, match="min cosine"):
        Embedder.load(art, variant="opt", device="cpu", warmup=False)
