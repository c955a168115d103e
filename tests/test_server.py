"""`corom serve` over real HTTP on 127.0.0.1: the openai client, ModelScope similarity, bad input, shutdown."""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn

from conftest import EXAMPLE_CANDIDATES, EXAMPLE_SOURCE
from corom_runtime import Embedder
from corom_runtime.catalog import VARIANTS
from corom_runtime.serving.batcher import BatcherSettings
from corom_runtime.serving.app import ServerSettings, authorized, create_app
from corom_runtime.serving.runner import guarded_protocol


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """The app on a real uvicorn in a thread; `head_timeout`/`max_connections` as `corom serve` sets them."""

    def __init__(self, app, head_timeout: float = 10.0, max_connections: int | None = None) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    http=guarded_protocol(head_timeout),
                                                    limit_concurrency=max_connections))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(self.url("/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not become healthy")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def embedder(bundled_artifact) -> Embedder:
    return Embedder.load(bundled_artifact, device="cpu")  # the default CPU variant, as `corom serve` runs it


@pytest.fixture(scope="module")
def server(embedder):
    settings = ServerSettings(max_items=8, max_body_bytes=4096, batcher=BatcherSettings(max_wait_ms=2))
    running = Running(create_app(embedder, settings))
    yield running
    running.stop()


def cos(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_openai_client_gets_correct_embeddings(server, embedder):
    from openai import OpenAI

    client = OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)
    texts = [EXAMPLE_SOURCE, EXAMPLE_CANDIDATES[0]]
    expected = embedder.encode(texts)
    for fmt in ("float", "base64", None):  # None: the client asks for base64 and decodes it itself
        kwargs = {"encoding_format": fmt} if fmt else {}
        resp = client.embeddings.create(model="all-minilm-l6-v2", input=texts, **kwargs)
        assert [d.index for d in resp.data] == [0, 1]
        for d, e in zip(resp.data, expected):
            vec = np.frombuffer(base64.b64decode(d.embedding), "<f4") if fmt == "base64" else d.embedding
            # the same variant as `embedder`: equal up to its batch-invariance gate, not a looser figure
            assert len(vec) == 384 and cos(vec, e) >= VARIANTS[embedder.variant].gate.batch_invariance
        assert resp.usage.prompt_tokens > 10
    single = client.embeddings.create(model="all-minilm-l6-v2", input="just one")
    assert len(single.data) == 1


def test_embed_and_similarity(server):
    r = httpx.post(server.url("/embed"), json={"inputs": ["a", "b"]})
    assert r.status_code == 200 and np.asarray(r.json()).shape == (2, 384)
    r = httpx.post(server.url("/similarity"),
                   json={"source_sentence": [EXAMPLE_SOURCE], "sentences_to_compare": EXAMPLE_CANDIDATES})
    body = r.json()
    assert r.status_code == 200 and np.asarray(body["text_embedding"]).shape == (5, 384)
    assert int(np.argmax(body["scores"])) == 0


@pytest.mark.parametrize("path,body,status,message", [
    ("/v1/embeddings", b"{not json", 400, "malformed JSON"),
    ("/v1/embeddings", json.dumps({"input": 42}).encode(), 400, "must be a string or a list"),
    ("/v1/embeddings", json.dumps({"input": ["ok", 3]}).encode(), 400, "'input'[1] is int"),
    ("/v1/embeddings", json.dumps({"input": [[101, 102]]}).encode(), 400, "token ids"),
    ("/v1/embeddings", json.dumps({"input": []}).encode(), 400, "is empty"),
    ("/v1/embeddings", json.dumps({"nope": 1}).encode(), 400, "'input'"),
    ("/v1/embeddings", json.dumps({"input": ["x"] * 9}).encode(), 413, "at most 8"),
    ("/v1/embeddings", json.dumps({"input": ["x"], "encoding_format": "hex"}).encode(), 400, "encoding_format"),
    ("/v1/embeddings", json.dumps({"input": ["x"], "dimensions": 385}).encode(), 400, "from 1 to 384"),
    ("/v1/embeddings", json.dumps({"input": ["y" * 5000]}).encode(), 413, "4096-byte limit"),
    ("/embed", json.dumps(["no", "dict"]).encode(), 400, "'inputs'"),
    ("/similarity", json.dumps({"source_sentence": ["a", "b"]}).encode(), 400, "exactly one text, got 2"),
    ("/similarity", json.dumps({"sentences_to_compare": ["a"]}).encode(), 400, "source_sentence"),
    ("/similarity", json.dumps({"source_sentence": ["a"], "sentences_to_compare": False}).encode(), 400, "got boolean"),
    ("/similarity", json.dumps({"source_sentence": ["a"], "sentences_to_compare": 0}).encode(), 400, "got int"),
    # hostile JSON: a lone surrogate echoed back, non-UTF-8 bytes (huge numbers and deep nesting: see
    # test_server_hardening, whose server takes bodies large enough to carry them)
    ("/v1/embeddings", b'{"input": "x", "model": "\\ud800"}', 400, "'model' is not valid Unicode"),
    ("/v1/embeddings", b'{"input": "x", "model": 7}', 400, "'model' must be a string"),
    ("/embed", b'{"inputs": ["\xff\xfe"]}', 400, "malformed JSON"),
    ("/v1/embeddings", json.dumps({"input": ["x"], "dimensions": True}).encode(), 400, "from 1 to 384"),
    ("/embed", json.dumps({"inputs": ["x"], "prompt_name": "query"}).encode(), 400,
     "unknown prompt_name 'query' for all-minilm-l6-v2; known: none"),
    ("/v1/embeddings", json.dumps({"input": ["x"], "prompt_name": 5}).encode(), 400, "'prompt_name' must be a string"),
])
def test_bad_input_gets_4xx_and_server_keeps_serving(server, path, body, status, message):
    r = httpx.post(server.url(path), content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    assert httpx.post(server.url("/embed"), json={"inputs": ["still alive"]}).status_code == 200


@pytest.mark.parametrize("method,path,headers,content,status,message", [
    ("GET", "/nope", {}, None, 404, "GET /nope: Not Found"),
    ("GET", "/embed", {}, None, 405, "Method Not Allowed"),
    ("POST", "/embed", {"content-type": "text/plain"}, b'{"inputs": ["x"]}', 415, "must be application/json"),
    ("POST", "/embed", {}, b'{"inputs": ["x"]}', 415, "not absent"),
    ("POST", "/embed", {"content-type": "application/json", "transfer-encoding": "chunked"},
     b'{"inputs": ["x"]}', 400, "both Content-Length and Transfer-Encoding"),
])
def test_protocol_mistakes_get_the_json_error_shape(server, method, path, headers, content, status, message):
    if "transfer-encoding" in headers:  # httpx will not send both framings: write the request by hand
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 17\r\nTransfer-Encoding: chunked\r\n\r\n11\r\n" + content + b"\r\n0\r\n\r\n")
            answer = sock.recv(65536).decode("latin-1")
        assert answer.startswith("HTTP/1.1 400") or answer.startswith(f"HTTP/1.1 {status}"), answer[:200]
        return
    r = httpx.request(method, server.url(path), headers=headers, content=content)
    assert r.status_code == status and message in r.json()["error"]["message"], r.text
    assert r.json()["error"]["code"] == status


def test_chunked_oversized_body_is_refused(server):
    def chunks():
        for _ in range(10):
            yield b" " * 1000

    r = httpx.post(server.url("/embed"), content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(server.url("/health")).json()["status"] == "ok"


def test_health_and_metrics(server, embedder):
    httpx.post(server.url("/embed"), json={"inputs": ["count me"]})
    health = httpx.get(server.url("/health")).json()
    assert health["status"] == "ok" and health["variant"] == embedder.variant
    assert health["warming"] is False  # no background bucket warm-up in this app (corom serve starts one)
    text = httpx.get(server.url("/metrics")).text
    for name in ("corom_requests_total", "corom_batch_texts_bucket", "corom_queue_seconds_sum",
                 "corom_tokenize_seconds_count", "corom_inference_seconds_bucket", "corom_queue_texts"):
        assert name in text
    total = float(next(l.split()[1] for l in text.splitlines() if l.startswith("corom_requests_total ")))
    assert total >= 1


def test_api_key_guards_everything_but_liveness(embedder):
    running = Running(create_app(embedder, ServerSettings(api_key="s3crét")))
    try:
        assert httpx.post(running.url("/embed"), json={"inputs": ["x"]}).status_code == 401
        key = "s3crét".encode("utf-8")  # the raw UTF-8 bytes, as a header carries them
        for scheme in (b"Bearer", b"bearer", b"BEARER"):
            ok = httpx.post(running.url("/embed"), json={"inputs": ["x"]}, headers={"Authorization": scheme + b" " + key})
            assert ok.status_code == 200, scheme
        assert httpx.get(running.url("/health")).json() == {"status": "ok"}  # liveness, no details
        full = httpx.get(running.url("/health"), headers={"Authorization": b"Bearer " + key}).json()
        assert full["status"] == "ok" and full["variant"] == embedder.variant
        assert httpx.get(running.url("/metrics")).status_code == 401
        assert httpx.get(running.url("/metrics"), headers={"Authorization": b"Bearer " + key}).status_code == 200
    finally:
        running.stop()


def test_authorized_compares_bytes_and_accepts_any_bearer_case():
    assert authorized(None, None) and authorized("", None)
    assert authorized("bEaReR k", "k") and not authorized("Basic k", "k") and not authorized("Bearer x", "k")
    assert not authorized("Bearer ", "k") and not authorized(None, "k")
    assert authorized("Bearer " + "é".encode().decode("latin-1"), "é")


def test_host_and_origin_are_checked_on_loopback(embedder):
    settings = ServerSettings(allowed_hosts=("127.0.0.1", "localhost"), allowed_origins=("https://app.example",))
    running = Running(create_app(embedder, settings))
    try:
        url = running.url("/embed")
        assert httpx.post(url, json={"inputs": ["x"]}).status_code == 200
        r = httpx.post(url, json={"inputs": ["x"]}, headers={"Host": "attacker.example"})
        assert r.status_code == 403 and "--allowed-host" in r.json()["error"]["message"]
        r = httpx.post(url, json={"inputs": ["x"]}, headers={"Origin": "http://attacker.example"})
        assert r.status_code == 403 and "Origin" in r.json()["error"]["message"]
        assert httpx.post(url, json={"inputs": ["x"]}, headers={"Origin": "https://app.example"}).status_code == 200
        assert httpx.post(url, json={"inputs": ["x"]}, headers={"Origin": f"http://localhost:{running.port}"}).status_code == 200
    finally:
        running.stop()


def test_cli_serve_shuts_down_gracefully_on_sigterm(bundled_artifact):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "corom_runtime.cli", "serve", "--model", str(bundled_artifact),
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert httpx.post(f"http://127.0.0.1:{port}/embed", json={"inputs": ["hi"]}).status_code == 200
        proc.send_signal(signal.SIGTERM)
        # in-flight requests finish, the batcher drains, and a completed drain is a success
        assert proc.wait(30) == 0
        log = proc.stdout.read()
        assert "Shutting down" in log and "Finished server process" in log, log
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_uvicorn_internals_we_patch_are_still_there():
    """`serving.runner` leans on uvicorn's httptools protocol (pinned <0.56 in pyproject): fail here, not in
    a production server, when an upgrade moves what it overrides or reads."""
    import inspect

    from uvicorn.protocols.http import httptools_impl

    from corom_runtime.serving import runner

    assert httptools_impl.service_unavailable is runner._over_connection_bound
    protocol = guarded_protocol(1.0)
    base_class = httptools_impl.HttpToolsProtocol
    for name in ("connection_made", "data_received", "on_response_complete", "send_400_response", "connection_lost"):
        base = getattr(base_class, name)
        assert callable(base) and getattr(protocol, name) is not base, name
        assert list(inspect.signature(base).parameters) == list(inspect.signature(getattr(protocol, name)).parameters), name
    source = inspect.getsource(base_class)
    for attribute in ("self.pipeline", "self.cycle", "self.transport", "self.loop", "self.client"):
        assert attribute in source, attribute
    # still what uvicorn calls past --limit-concurrency
    assert "app = service_unavailable" in inspect.getsource(base_class.on_headers_complete)


def queued_texts(running: Running) -> float:
    text = httpx.get(running.url("/metrics")).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("corom_queue_texts ")))


def test_a_full_queue_is_a_503_with_retry_after_and_the_server_recovers(embedder, monkeypatch):
    """The worker is held in one request and a second fills the queue: the next request is refused with
    503 and Retry-After in the one JSON shape (never a 500 or a 413: the request itself is fine), and is
    served once the queue drains."""
    from fakes import echo_embedder

    echo = echo_embedder(embedder)  # the real tokenizer and batcher, an engine that costs nothing
    entered, gate, real = threading.Event(), threading.Event(), echo.embed_tokenized

    def held(items, *args, **kwargs):
        entered.set()
        gate.wait(30)
        return real(items, *args, **kwargs)

    settings = ServerSettings(max_items=4, batcher=BatcherSettings(max_queue=4, inline_max_tokens=0, max_wait_ms=0))
    running = Running(create_app(echo, settings))  # started first: its speed pass at start runs free
    monkeypatch.setattr(echo, "embed_tokenized", held)
    busy, queued = [], []
    try:
        first = threading.Thread(target=lambda: busy.append(
            httpx.post(running.url("/embed"), json={"inputs": ["held"] * 4}, timeout=60)))
        first.start()
        assert entered.wait(20), "the first request never reached the worker"
        second = threading.Thread(target=lambda: queued.append(
            httpx.post(running.url("/embed"), json={"inputs": ["waiting"] * 4}, timeout=60)))
        second.start()
        deadline = time.time() + 20
        while queued_texts(running) < 4:  # the second request's 4 texts fill the queue
            assert time.time() < deadline, "the second request never queued"
            time.sleep(0.02)
        r = httpx.post(running.url("/embed"), json={"inputs": ["one more"]}, timeout=30)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == 503
        assert "queue" in r.json()["error"]["message"]
    finally:
        gate.set()
        first.join(30)
        second.join(30)
    assert busy[0].status_code == 200 and queued[0].status_code == 200  # accepted work is answered
    after = httpx.post(running.url("/embed"), json={"inputs": ["one more"]}, timeout=30)
    running.stop()
    assert after.status_code == 200 and len(after.json()) == 1
