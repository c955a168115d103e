"""`corom serve` against hostile and careless clients: fuzzed JSON, vanished and stalled clients, SIGTERM."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corom_runtime import Embedder
from corom_runtime.serving.batcher import BatcherSettings
from corom_runtime.serving.app import ServerSettings, create_app
from test_bulk import cosines
from test_server import Running, free_port

ROUTES = ("/v1/embeddings", "/embed", "/similarity")
LONG = " ".join(["a long passage that fills the whole window of the model"] * 20)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(
        st.sampled_from(["input", "inputs", "model", "source_sentence", "sentences_to_compare",
                         "encoding_format", "dimensions", "user"]) | st.text(max_size=8), children, max_size=6),
    max_leaves=30)


@pytest.fixture(scope="module")
def embedder(bundled_artifact) -> Embedder:
    return Embedder.load(bundled_artifact, device="cpu")


@pytest.fixture(scope="module")
def server(embedder):
    running = Running(create_app(embedder, ServerSettings(max_items=16, max_body_bytes=64 * 1024,
                                                          batcher=BatcherSettings(max_queue=4096))))
    yield running
    running.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), body=json_values)
def test_fuzzed_json_never_gets_a_5xx(server, route, body):
    r = httpx.post(server.url(route), content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, (route, body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "code"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), raw=st.binary(max_size=200))
def test_fuzzed_bytes_never_get_a_5xx(server, route, raw):
    r = httpx.post(server.url(route), content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500, (route, raw, r.text)


@pytest.mark.parametrize("body,message", [
    (b'{"input": ' + b"9" * 4400 + b"}", "malformed JSON"),            # int() of over 4,300 digits
    (b"[" * 30_000 + b"]" * 30_000, "nested too deeply"),              # RecursionError in the parser
    (b'{"inputs": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", "nested too deeply"),
])
def test_hostile_json_gets_a_400(server, body, message):
    r = httpx.post(server.url("/embed"), content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text


def test_server_is_healthy_after_the_fuzzing(server):
    assert httpx.get(server.url("/health")).json()["status"] == "ok"
    assert httpx.post(server.url("/embed"), json={"inputs": ["still here"]}).status_code == 200


def metric(server, name: str) -> float:
    text = httpx.get(server.url("/metrics")).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def test_concurrent_clients_share_inferences_and_get_their_own_rows(server, embedder):
    """A request alone on an idle server runs inline on the event loop; under 8 concurrent clients
    requests still meet in the queue and share inferences (an event loop that ran each inline would
    serialize them), and every answer is its own texts' vectors (none lost, swapped or cut)."""
    import numpy as np

    from corom_runtime.catalog import VARIANTS

    pool = [f"client {c} asks question {i} about {'topic ' * (i % 4)}" for c in range(8) for i in range(12)]
    requests = [pool[i:i + 1 + i % 3] for i in range(0, len(pool), 2)]
    expected = dict(zip(pool, embedder.encode(pool)))
    gate = VARIANTS[embedder.variant].gate.min_cosine
    inline_before = metric(server, "corom_inline_total")
    alone = np.asarray(httpx.post(server.url("/embed"), json={"inputs": pool[:1]}).json(), dtype=np.float32)
    assert metric(server, "corom_inline_total") == inline_before + 1
    assert cosines(alone, expected[pool[0]][None, :]).min() >= gate

    batches_before, errors = metric(server, "corom_batches_total"), []

    def client(mine: list[list[str]]) -> None:
        with httpx.Client(timeout=60) as c:
            for texts in mine:
                rows = np.asarray(c.post(server.url("/embed"), json={"inputs": texts}).json(), dtype=np.float32)
                want = np.stack([expected[t] for t in texts])
                if rows.shape != want.shape or cosines(rows, want).min() < gate:
                    errors.append(texts)

    threads = [threading.Thread(target=client, args=(requests[k::8],)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:2]
    inferences = metric(server, "corom_batches_total") - batches_before
    assert inferences < len(requests), inferences  # some requests shared an inference


def test_a_client_that_leaves_has_its_work_dropped(server, embedder, monkeypatch):
    """Hold the worker in a long request, queue one behind it and hang up: it is dropped before inference."""
    gate, real = threading.Event(), embedder.embed_tokenized

    def held(items, *args):  # the worker's inference waits until the gone client has been noticed
        gate.wait(30)
        return real(items, *args)

    monkeypatch.setattr(embedder, "embed_tokenized", held)
    cancelled_before = metric(server, "corom_requests_cancelled_total")
    texts_before, requests_before = metric(server, "corom_texts_total"), metric(server, "corom_requests_total")
    busy = threading.Thread(target=httpx.post, args=(server.url("/embed"),),
                            kwargs={"json": {"inputs": [LONG] * 16}, "timeout": 60})
    busy.start()
    body = json.dumps({"inputs": ["nobody will read this"] * 16}).encode()
    try:
        deadline = time.time() + 10
        while metric(server, "corom_queue_texts") > 0 or metric(server, "corom_requests_total") == requests_before:
            assert time.time() < deadline, "the long request never reached the worker"
            time.sleep(0.02)
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            while metric(server, "corom_queue_texts") < 16:  # parsed and queued behind the long work
                assert time.time() < deadline, "the request never queued"
                time.sleep(0.02)
        time.sleep(0.3)  # the server notices the hang-up (it watches a request after 50 ms)
    finally:
        gate.set()
    busy.join(60)
    deadline = time.time() + 10
    while metric(server, "corom_queue_texts") > 0 and time.time() < deadline:
        time.sleep(0.05)
    assert metric(server, "corom_requests_cancelled_total") == cancelled_before + 1
    assert metric(server, "corom_texts_total") == texts_before + 16  # the gone client's 16 never ran


def test_stalled_clients_do_not_lock_out_a_healthy_one(embedder):
    running = Running(create_app(embedder, ServerSettings(body_timeout_s=1.0)), head_timeout=1.0, max_connections=20)
    stalled = []
    try:
        for _ in range(40):  # twice the connection bound, each stuck in its request head
            sock = socket.create_connection(("127.0.0.1", running.port))
            sock.sendall(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            stalled.append(sock)
        start = time.time()
        served = None
        while time.time() - start < 10:
            r = httpx.post(running.url("/embed"), json={"inputs": ["healthy"]})
            if r.status_code == 200:
                served = time.time() - start
                break
            assert r.status_code == 503 and "too many connections" in r.json()["error"]["message"]
            time.sleep(0.2)
        assert served is not None and served < 5, "stalled heads were not cut off"
        for sock in stalled:  # the server closed every stalled connection
            sock.settimeout(2)
            assert sock.recv(100) == b""
        # a client that stalls mid-body gets 408, not a connection held forever
        with socket.create_connection(("127.0.0.1", running.port)) as sock:
            sock.sendall(b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"inputs\":")
            sock.settimeout(5)
            assert sock.recv(4096).startswith(b"HTTP/1.1 408")
    finally:
        for sock in stalled:
            sock.close()
        running.stop()


@pytest.mark.parametrize("head", [
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    b"GET /health?" + b"q" * 100_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"".join(b"X-H%d: v\r\n" % i for i in range(5000)).join([b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"\r\n"]),
])
def test_oversized_heads_get_a_json_400(server, head):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        try:
            sock.sendall(head)
        except OSError:
            pass  # the server may close as soon as the limit is passed: read what it answered
        sock.settimeout(5)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == 400
    assert httpx.get(server.url("/health")).status_code == 200


def _start(artifact, *extra) -> tuple[subprocess.Popen, int]:
    """A real `corom serve` process; its log goes to a file (a pipe nobody reads could fill and block it)."""
    import tempfile

    port = free_port()
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-m", "corom_runtime.cli", "serve", "--model", str(artifact),
                             "--port", str(port), *extra], stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log  # type: ignore[attr-defined]
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc, port
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    log.seek(0)
    raise RuntimeError(log.read())


@pytest.mark.parametrize("drain", ["60", "0.5"])
def test_sigterm_with_a_deep_queue_answers_every_accepted_request(bundled_artifact, drain):
    """Long drain: every accepted request is answered 200. Short drain: the rest get 503. Exit 0 either way."""
    proc, port = _start(bundled_artifact, "--drain-seconds", drain, "--max-queue", "100000")
    statuses: list = []
    sent = threading.Barrier(41)

    def client() -> None:
        with httpx.Client(timeout=120) as c:
            request = c.build_request("POST", f"http://127.0.0.1:{port}/embed", json={"inputs": [LONG] * 16})
            sent.wait()
            try:
                statuses.append(c.send(request).status_code)
            except httpx.HTTPError as exc:
                statuses.append(type(exc).__name__)

    threads = [threading.Thread(target=client) for _ in range(40)]
    for t in threads:
        t.start()
    sent.wait()
    time.sleep(0.5)  # all 40 sent and queued (640 full-length texts: seconds of work on 2 cores)
    proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    code = proc.wait(60)
    proc.log.seek(0)
    assert code == 0, proc.log.read()[-3000:]
    assert len(statuses) == 40 and set(statuses) <= {200, 503}, statuses
    if drain == "60":
        assert statuses.count(200) == 40
    else:
        assert statuses.count(503) > 0 and statuses.count(200) > 0


def test_second_signal_exits_at_once(bundled_artifact):
    proc, port = _start(bundled_artifact, "--drain-seconds", "120", "--max-queue", "100000")
    threads = [threading.Thread(target=lambda: httpx.post(f"http://127.0.0.1:{port}/embed",
                                                          json={"inputs": [LONG] * 16}, timeout=120))
               for _ in range(30)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    start = time.time()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)
    assert time.time() - start < 10 and code != 0  # forced: it says so in its status
    for t in threads:
        t.join(5)
