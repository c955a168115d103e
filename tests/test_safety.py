"""No data loss, no wrong device, no blocked server: the holes a review found, each held by a test."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

from corom_runtime import Embedder, embedder as embedder_module
from corom_runtime.bulk.local import BulkOptions, embed_corpus, resume_mismatch
from corom_runtime.cli import main as corom
from corom_runtime.serving.batcher import BatcherSettings, DynamicBatcher
from corom_runtime.errors import CoromError, ProviderUnavailableError, RequestTooLargeError
from corom_runtime.serving.http_errors import from_exception
from corom_runtime.serving.app import INTERNAL_ERRORS, ServerSettings, create_app
from corom_runtime.engines.ort import device_of_provider

# -- 1. --force deletes only what corom wrote ---------------------------------------------------


def test_embed_force_refuses_a_folder_corom_did_not_write(bundled_artifact, tmp_path, monkeypatch, capsys):
    src = tmp_path / "in.txt"
    src.write_text("one\ntwo\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep me")
    args = ["embed", "--model", str(bundled_artifact), "--variant", "fp32", "--file", str(src), "--quiet"]
    assert corom([*args, "-o", str(mine), "--force"]) == 2
    assert "holds no _job.json" in capsys.readouterr().err and (mine / "precious.txt").read_text() == "keep me"
    monkeypatch.chdir(mine)  # `corom embed -o . --force` once deleted the current directory
    assert corom([*args, "-o", ".", "--force"]) == 2
    assert (mine / "precious.txt").exists()


def test_embed_force_replaces_only_its_own_files(bundled_artifact, tmp_path):
    fp32 = Embedder.load(bundled_artifact, variant="fp32", device="cpu")
    src = tmp_path / "in.txt"
    src.write_text("one\ntwo\nthree\n")
    out = tmp_path / "out"
    embed_corpus(BulkOptions(src, out, shard_size=2), lambda _: fp32, progress=False)
    (out / "notes.md").write_text("the user's notes, next to the shards")
    src.write_text("four\n")
    assert embed_corpus(BulkOptions(src, out, force=True, shard_size=2), lambda _: fp32, progress=False).rows == 1
    assert (out / "notes.md").exists()
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.parquet"]


def test_export_force_refuses_a_folder_corom_did_not_write(tmp_path, corom_checkpoint, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert corom(["export", str(corom_checkpoint), "--out", str(out), "--force", "--no-verify"]) == 2
    assert "holds no manifest.json" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


def test_export_force_replaces_an_artifact_by_a_swap(tmp_path, corom_artifact):
    from corom_export.build import check_replaceable, swap_into_place

    out = tmp_path / "art"
    shutil.copytree(corom_artifact, out)
    check_replaceable(out)  # only corom's files: may be replaced
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(CoromError, match=r"files `corom export` did not write \(precious.txt\)"):
        check_replaceable(out)
    (out / "precious.txt").unlink()
    opened = open(out / "model.opt.onnx", "rb")  # a server reading the old artifact
    new = tmp_path / ".new"
    shutil.copytree(corom_artifact, new)
    (new / "marker").write_text("new")
    swap_into_place(new, out)
    assert (out / "marker").read_text() == "new" and not new.exists()
    assert not list(tmp_path.glob(".art.replaced-*"))
    assert len(opened.read()) > 1000  # the old file stayed readable to whoever had it open
    opened.close()


# -- 2. export on first use, under a lock -------------------------------------------------------


def test_two_loaders_of_an_unexported_preset_export_it_once(corom_artifact, tmp_path, monkeypatch):
    from corom_export import hooks

    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "raced.json").write_text(json.dumps({"source": "/nowhere", "pooling": "cls", "normalize": False,
                                                    "score": "dot", "max_length": 64}))
    monkeypatch.setenv("COROM_PRESETS_DIR", str(presets))
    monkeypatch.setenv("COROM_CACHE_DIR", str(tmp_path / "cache"))
    exports: list[Path] = []
    inside = threading.Event()

    def slow_export(name, out):  # a stand-in for the registered exporter: copies a real artifact, slowly
        exports.append(out)
        inside.set()
        threading.Event().wait(0.5)
        shutil.copytree(corom_artifact, out)

    monkeypatch.setattr(hooks, "export_preset", slow_export)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(embedder_module.artifact_or_export("raced", True)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(exports) == 1 and len(results) == 2
    assert results[0].path == results[1].path == exports[0]


# -- 3. --resume knows the model by its content --------------------------------------------------


def test_resume_refuses_a_model_re_exported_at_the_same_path(bundled_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(bundled_artifact, art)
    src = tmp_path / "in.txt"
    src.write_text("\n".join(f"text number {i}" for i in range(6)) + "\n")
    out = tmp_path / "out"
    load = lambda _: Embedder.load(art, variant="fp32", device="cpu")  # noqa: E731
    embed_corpus(BulkOptions(src, out, shard_size=2), load, progress=False)
    (out / "part-00002.parquet").unlink()  # an unfinished job
    job = json.loads((out / "_job.json").read_text())
    assert len(job["model_sha256"]) == 64 and not list(out.glob("*.tmp"))
    # "re-export": same path, a consistent manifest, other bytes
    model = onnx.load(str(art / "model.fp32.onnx"))
    model.doc_string = "re-exported"
    onnx.save(model, str(art / "model.fp32.onnx"))
    manifest = json.loads((art / "manifest.json").read_text())
    from corom_runtime.artifacts.artifact import sha256_file

    manifest["variants"]["fp32"]["sha256"] = sha256_file(art / "model.fp32.onnx")
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CoromError, match="model's file changed since the job began"):
        embed_corpus(BulkOptions(src, out, shard_size=2, resume=True), load, progress=False)
    assert not (out / "part-00002.parquet").exists()


def test_resume_mismatch_names_a_changed_model_hash():
    base = {"fingerprint": "x", "model": "m", "variant": "fp32", "model_sha256": "a" * 64}
    assert "model's file changed" in resume_mismatch(base, {**base, "model_sha256": "b" * 64})


# -- 5. a provider ONNX Runtime silently replaced ------------------------------------------------


class _FellBackToCPU:
    """What onnxruntime-gpu gives on a machine whose CUDA cannot run: a CPU session."""

    def __init__(self, real) -> None:
        self.real, self.device, self.threads = real, "cpu", real.threads
        self.providers = ["CPUExecutionProvider"]

    def run(self, ids, mask):
        return self.real.run(ids, mask)


def test_a_silent_fallback_to_the_cpu_is_detected(corom_artifact, monkeypatch, caplog):
    from corom_runtime.selection import Machine

    real_open = embedder_module.open_session
    monkeypatch.setattr(embedder_module, "open_session",
                        lambda entry, path, device, *a, **kw: _FellBackToCPU(real_open(entry, path, "cpu", *a, **kw)))
    monkeypatch.setattr(embedder_module, "this_machine", lambda threads, device: Machine(
        ("cuda", "cpu"), frozenset({"onnxruntime"}), "test CPU", threads))
    with pytest.raises(ProviderUnavailableError, match="cuda was asked for, but onnxruntime runs opt on cpu"):
        Embedder.load(corom_artifact, variant="opt", device="cuda")
    with caplog.at_level(logging.WARNING, logger="corom_runtime"):
        emb = Embedder.load(corom_artifact, variant="opt", device="auto")
    assert emb.info.device == "cpu" and "running on cpu" in caplog.text
    assert Embedder.load(corom_artifact, variant="opt", device="cuda", allow_fallback=True).info.device == "cpu"


def test_device_of_provider():
    assert device_of_provider("CUDAExecutionProvider") == "cuda"
    assert device_of_provider("TensorrtExecutionProvider") == "tensorrt"
    assert device_of_provider("CPUExecutionProvider") == device_of_provider("SomethingElse") == "cpu"


# -- 6-8. the server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp32_embedder(bundled_artifact) -> Embedder:
    return Embedder.load(bundled_artifact, variant="fp32", device="cpu")


def _server(app):
    from test_server import Running

    return Running(app)


def test_a_slow_tokenizer_does_not_block_the_event_loop(fp32_embedder, monkeypatch):
    """Deterministic: the big request's tokenization waits until /health has answered. Run on the event
    loop, it would hold /health back until its wait gave up (30 s), and say so."""
    health_answered, tokenizing = threading.Event(), threading.Event()
    saw_health: list[bool] = []
    real_encode = fp32_embedder.tokenizer.encode

    def slow_encode(texts, **options):
        if len(texts) > 100:
            tokenizing.set()
            saw_health.append(health_answered.wait(30))
        return real_encode(texts, **options)

    settings = ServerSettings(max_items=256, max_body_bytes=4 << 20, batcher=BatcherSettings(max_wait_ms=1))
    running = _server(create_app(fp32_embedder, settings))
    try:
        monkeypatch.setattr(fp32_embedder.tokenizer, "encode", slow_encode)
        big = {"inputs": ["a rather long passage of text " * 8 + str(i) for i in range(256)]}
        answers: list = []
        client = threading.Thread(target=lambda: answers.append(httpx.post(running.url("/embed"), json=big, timeout=60)))
        client.start()
        assert tokenizing.wait(30)
        health = httpx.get(running.url("/health"), timeout=60)  # while the big request is being tokenized
        assert health.status_code == 200
        health_answered.set()
        client.join(60)
        assert saw_health == [True]
        assert answers[0].status_code == 200 and len(answers[0].json()) == 256
    finally:
        running.stop()


def test_a_bug_is_a_logged_500_with_a_request_id_not_a_400(fp32_embedder, monkeypatch, caplog):
    settings = ServerSettings(max_items=8, batcher=BatcherSettings(max_wait_ms=1))
    app = create_app(fp32_embedder, settings)
    running = _server(app)
    try:
        def broken_similarity(a, b):
            raise ValueError("an internal shape mismatch")

        monkeypatch.setattr(fp32_embedder, "similarity", broken_similarity)
        with caplog.at_level(logging.ERROR, logger="corom_runtime"):
            answer = httpx.post(running.url("/similarity"), json={"source_sentence": ["a"],
                                                                 "sentences_to_compare": ["b"]})
        assert answer.status_code == 500
        message = answer.json()["error"]["message"]
        assert "request id" in message and "shape mismatch" not in message
        request_id = message.split("request id ")[1].split(")")[0]
        assert request_id in caplog.text and "an internal shape mismatch" in caplog.text
        metrics = httpx.get(running.url("/metrics")).text
        assert f"{INTERNAL_ERRORS} 1.0" in metrics
        # the caller's own mistakes are still 4xx
        assert httpx.post(running.url("/embed"), json={"inputs": [1]}).status_code == 400
    finally:
        running.stop()


def test_only_corom_errors_are_client_errors():
    from corom_runtime.errors import InvalidInputError, InvalidInputTypeError

    assert from_exception(InvalidInputError("bad batch_size")).status == 400
    assert from_exception(InvalidInputTypeError("texts[3] is int")).status == 400
    assert from_exception(RequestTooLargeError("too many")).status == 413
    assert from_exception(ValueError("a bug"), "abc").status == 500
    assert from_exception(TypeError("a bug"), "abc").message == "internal error (request id abc); see the server log"


def test_the_cli_tells_a_bug_from_a_user_error(monkeypatch, capsys):
    from corom_runtime import cli

    def bug(args):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(cli, "cmd_presets", bug)  # the parser is built in main: it picks this up
    assert cli.main(["presets"]) == 1
    err = capsys.readouterr().err
    assert "internal error: TypeError: unsupported operand (run with -v for the traceback)" in err
    assert cli.main(["-v", "presets"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_request_larger_than_the_queue_is_413_not_retry_later(fp32_embedder):
    with pytest.raises(ValueError, match="--max-items 32 exceeds --max-queue 16"):
        ServerSettings(max_items=32, batcher=BatcherSettings(max_queue=16))
    batcher = DynamicBatcher(fp32_embedder, BatcherSettings(max_queue=16, max_wait_ms=1))
    try:
        with pytest.raises(RequestTooLargeError, match="32 texts in one request, more than the queue holds"):
            batcher.submit(["a text"] * 32)
        assert batcher.encode(["a text"] * 16).shape == (16, fp32_embedder.dim)
    finally:
        batcher.close()


# -- 9. the OpenVINO request pool ----------------------------------------------------------------


def test_openvino_infer_requests_are_bounded_under_many_callers(bundled_artifact):
    pytest.importorskip("openvino", reason="the OpenVINO engine is not installed")
    emb = Embedder.load(bundled_artifact, variant="ov-bf16", device="cpu", verify_here=False)
    expected = emb.encode(["a text to embed"])
    results: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: results.append(emb.encode(["a text to embed"]))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 16 and all(np.allclose(r, expected, atol=1e-5) for r in results)
    assert emb.session._created <= emb.session._limit <= 4


# -- 10. one FFN detector, one guard ---------------------------------------------------------------


def test_one_ffn_detector_finds_the_ffn_in_plain_and_fused_graphs(corom_artifact, tmp_path):
    from corom_export.int8 import ffn_matmuls_by_weight
    from corom_export.openvino_int8 import not_quantized

    manifest = json.loads((corom_artifact / "manifest.json").read_text())
    sizes = manifest["architecture"]
    for file in ("model.fp32.onnx", "model.opt.onnx"):
        model = onnx.load(str(corom_artifact / file), load_external_data=False)
        ffn_in, ffn_out = ffn_matmuls_by_weight(model, sizes["hidden"], sizes["intermediate"])
        assert len(ffn_in) == len(ffn_out) == sizes["layers"], file
    plain = onnx.load(str(corom_artifact / "model.fp32.onnx"), load_external_data=False)
    assert len(not_quantized(plain, sizes["hidden"], sizes["intermediate"])) == 5 * sizes["layers"]
    with pytest.raises(ValueError, match="will not quantize a graph it does not recognise"):
        not_quantized(plain, sizes["hidden"], sizes["intermediate"] + 1)


def test_a_tanh_gelu_checkpoint_keeps_its_ffn_out_of_int8(tmp_path):
    """GELU exported as tanh (no Erf): the weight-shape detector still finds every FFN MatMul."""
    from checkpoints import write_modelscope_checkpoint
    from corom_export import graph
    from corom_export.int8 import ffn_matmuls_by_weight
    from corom_export.openvino_int8 import not_quantized
    from corom_export.reference import build_reference
    from corom_export.sources import resolve

    folder = write_modelscope_checkpoint(tmp_path / "tanh", hidden_act="gelu_new", num_hidden_layers=2,
                                         hidden_size=64, intermediate_size=128, num_attention_heads=2)
    checkpoint = resolve(str(folder))
    plain = tmp_path / "plain.onnx"
    graph.export_plain(build_reference(checkpoint, "cls", False), plain, *graph.dummy_batch([101, 2023, 102], 0))
    model = onnx.load(str(plain))
    assert not any(n.op_type == "Erf" for n in model.graph.node) and any(n.op_type == "Tanh" for n in model.graph.node)
    ffn_in, ffn_out = ffn_matmuls_by_weight(model, 64, 128)
    assert len(ffn_in) == len(ffn_out) == 2
    assert set(ffn_in + ffn_out) <= set(not_quantized(model, 64, 128))
