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
                                                          # inline bounded by tokens, not by the speed
                                                          # measured at start (a busy CI host: none inline)
                                                          batcher=BatcherSettings(max_queue=4096,
                                                                                  inline_max_ms=60_000.0))))
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
    while time.time() < deadline and proc.poll() is None:
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
            # 8 window-long texts a request: at the default's 256-token window, the work 16 were at 128
            request = c.build_request("POST", f"http://127.0.0.1:{port}/embed", json={"inputs": [LONG] * 8})
            sent.wait()
            try:
                statuses.append(c.send(request).status_code)
            except httpx.HTTPError as exc:
                statuses.append(type(exc).__name__)

    threads = [threading.Thread(target=client) for _ in range(40)]
    for t in threads:
        t.start()
    sent.wait()
    time.sleep(0.5)  # all 40 sent and queued (320 full-length texts: seconds of work on 2 cores)
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


# --- transport hardening against a real `corom serve` (one keyed process for the module) -------------

KEY = "hardening-key"
ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def served(bundled_artifact):
    proc, port = _start(bundled_artifact, "--api-key", KEY, "--body-timeout", "1", "--header-timeout", "2",
                        "--max-body-bytes", "200000", "--max-connections", "8", "--allowed-origin", ORIGIN)
    yield port
    proc.kill()
    proc.wait(10)


def _raw(port: int, data: bytes, wait_s: float = 5.0, then: bytes = b"", after_first: bool = False) -> bytes:
    """Send `data` on a fresh socket and read until the server closes or `wait_s` passes; `then` is sent
    once the first answer has arrived (`after_first`) or straight away."""
    sock = socket.create_connection(("127.0.0.1", port))
    answer = b""
    try:
        sock.sendall(data + (b"" if after_first else then))
        deadline = time.time() + wait_s
        while time.time() < deadline:
            sock.settimeout(max(0.05, deadline - time.time()))
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
            if after_first and then and b"\r\n\r\n" in answer:
                sock.sendall(then)
                then = b""
    finally:
        sock.close()
    return answer


def _post(path: str = "/embed", body: bytes = b"", key: bool = True, length: int | None = None,
          extra: str = "") -> bytes:
    auth = f"Authorization: Bearer {KEY}\r\n" if key else ""
    size = len(body) if length is None else length
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\n{extra}"
            f"Content-Length: {size}\r\n\r\n").encode() + body


def _statuses(answer: bytes) -> list[int]:
    import re

    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)]


def test_a_trickled_body_is_cut_off_by_its_total_time(served):
    """--body-timeout 1 bounds the whole body: a byte every 0.3 s (each gap well under 1 s) gets 408."""
    sock = socket.create_connection(("127.0.0.1", served))
    try:
        sock.sendall(_post(length=29))
        start, answer = time.time(), b""
        sock.setblocking(False)
        while time.time() - start < 4 and not answer:
            try:
                sock.send(b" ")
            except OSError:
                pass
            time.sleep(0.3)
            try:
                answer = sock.recv(4096)
            except BlockingIOError:
                pass
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert time.time() - start < 2.5
        assert b"connection: close" in answer.lower()
    finally:
        sock.close()


def test_an_oversized_body_is_refused_at_once_and_never_asked_for(served):
    """Expect: 100-continue with a declared body over the limit: 413 first, no 100, without waiting."""
    sock = socket.create_connection(("127.0.0.1", served))
    try:
        start = time.time()
        sock.sendall(_post(length=1_000_000, extra="Expect: 100-continue\r\n"))  # 5x the limit
        sock.settimeout(3)
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
        assert time.time() - start < 0.8  # the old guard waited for (and read) the body first
        assert b"connection: close" in answer.lower()
    finally:
        sock.close()


def test_an_anonymous_request_is_refused_before_its_body_and_the_connection_closed(served):
    """A 401 answered before a 40 KB body is read says Connection: close and ends the connection: the
    unread body is never parsed as a next request (it used to get an unsolicited 400)."""
    body = json.dumps({"inputs": ["x" * 40_000]}).encode()
    answer = _raw(served, _post(body=body, key=False) + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert _statuses(answer) == [401], answer[:300]
    assert b"connection: close" in answer.lower()


def test_a_pipelined_body_arriving_after_the_first_answer_is_not_a_head(served):
    body = json.dumps({"inputs": ["word " * 4000]}).encode()  # 20 KB: more than a head may be
    answer = _raw(served, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                  + _post(body=b"", length=len(body), extra="Connection: close\r\n"),
                  then=body, after_first=True, wait_s=6)
    statuses = _statuses(answer)
    assert statuses[:2] == [200, 200], answer[:300]


def test_a_huge_pipelined_head_is_refused_while_the_request_before_it_runs(served):
    """A 2 MB header pipelined behind a long request used to be buffered whole and answered 200."""
    body = json.dumps({"inputs": [LONG] * 16}).encode()
    big = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 2_000_000 + b"\r\n\r\n"
    answer = _raw(served, _post(body=body) + big, wait_s=8)
    assert _statuses(answer) == [200, 400], answer[:200]
    assert json.loads(answer.rsplit(b"\r\n\r\n", 1)[1])["error"]["code"] == 400


def test_cors_preflight_and_allowed_origin_and_refused_origin(served):
    url = f"http://127.0.0.1:{served}/embed"
    pre = httpx.options(url, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                      "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN, pre.text
    auth = {"Authorization": f"Bearer {KEY}"}
    ok = httpx.post(url, json={"inputs": ["hi"]}, headers={"Origin": ORIGIN, **auth}, timeout=30)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    evil = httpx.post(url, json={"inputs": ["hi"]}, headers={"Origin": "https://evil.example", **auth})
    assert evil.status_code == 403 and "access-control-allow-origin" not in evil.headers


def test_origin_is_checked_on_a_public_bind_too():
    """The guard's decision for `--host 0.0.0.0 --allowed-origin https://app.example` (no Host list)."""
    from corom_runtime.serving.guard import GuardSettings, check_host_and_origin
    from corom_runtime.serving.http_errors import HTTPError

    public = GuardSettings(allowed_hosts=None, allowed_origins=(ORIGIN,))
    check_host_and_origin({b"host": b"api.example", b"origin": ORIGIN.encode()}, public)
    with pytest.raises(HTTPError) as refused:
        check_host_and_origin({b"host": b"api.example", b"origin": b"https://evil.example"}, public)
    assert refused.value.status == 403


def test_health_from_loopback_passes_a_public_host_list():
    """Container health checks probe 127.0.0.1 while --allowed-host names the public name only."""
    from corom_runtime.serving.guard import GuardSettings, check_host_and_origin
    from corom_runtime.serving.http_errors import HTTPError

    public = GuardSettings(allowed_hosts=("api.example",))
    check_host_and_origin({b"host": b"127.0.0.1:8080"}, public, "/health", ("127.0.0.1", 5555))
    for path, client, host in [("/embed", ("127.0.0.1", 5555), b"127.0.0.1"),      # only /health
                               ("/health", ("10.0.0.7", 5555), b"127.0.0.1"),     # only from loopback
                               ("/health", ("127.0.0.1", 5555), b"evil.example")]:  # DNS rebinding
        with pytest.raises(HTTPError) as refused:
            check_host_and_origin({b"host": host}, public, path, client)
        assert refused.value.status == 403 and "api.example" not in refused.value.message  # no list echoed


@pytest.mark.parametrize("request_head,status", [
    (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: [localhost]evil.com\r\nConnection: close\r\n\r\n", 400),
    (b"GET /health HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n", 403),
])
def test_host_headers_are_checked_strictly(served, request_head, status):
    answer = _raw(served, request_head, wait_s=2)
    assert _statuses(answer)[:1] == [status], answer[:200]
    message = json.loads(answer.split(b"\r\n\r\n", 1)[1].split(b"\r\n")[0])["error"]["message"]
    assert "::1" not in message  # the allow-list is not echoed


def test_duplicate_content_type_trailing_slash_and_allow(served):
    dup = _post(body=b'{"inputs": ["a"]}', extra="Content-Type: text/plain\r\n")
    assert _statuses(_raw(served, dup, wait_s=2))[:1] == [400]
    slash = httpx.get(f"http://127.0.0.1:{served}/health/", follow_redirects=False)
    assert slash.status_code == 404 and "location" not in slash.headers and slash.json()["error"]["code"] == 404
    wrong = httpx.get(f"http://127.0.0.1:{served}/embed")
    assert wrong.status_code == 405 and "POST" in wrong.headers.get("allow", "")


def test_metrics_count_answers_by_route_and_status_and_texts_apart_from_windows(served):
    url = f"http://127.0.0.1:{served}"
    auth = {"Authorization": f"Bearer {KEY}"}

    def count(route: str, status: int) -> float:
        text = httpx.get(url + "/metrics", headers=auth).text
        line = f'corom_http_responses_total{{route="{route}",status="{status}"}} '
        return next((float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)), 0.0)

    def counter(name: str) -> float:
        text = httpx.get(url + "/metrics", headers=auth).text
        return float(next(x.split()[-1] for x in text.splitlines() if x.startswith(name + " ")))

    before = {k: count(*k) for k in [("/embed", 401), ("/embed", 415), ("/embed", 413), ("other", 404),
                                     ("none", 400), ("/health", 503)]}
    httpx.post(url + "/embed", json={"inputs": ["a"]})
    httpx.post(url + "/embed", content=b"x", headers={"content-type": "text/plain", **auth})
    _raw(served, _post(length=2_000_000), wait_s=1)
    httpx.get(url + "/no-such-path/" + "x" * 50)  # counted as "other": the client's path is no label
    _raw(served, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX: " + b"a" * 40_000 + b"\r\n\r\n", wait_s=2)
    held = [socket.create_connection(("127.0.0.1", served)) for _ in range(8)]  # the --max-connections bound
    try:
        time.sleep(0.2)
        assert httpx.get(url + "/health").status_code == 503
    finally:
        for sock in held:
            sock.close()
    for key, was in before.items():
        assert count(*key) == was + 1, key
    assert "x" * 50 not in httpx.get(url + "/metrics", headers=auth).text

    texts, windows = counter("corom_texts_total"), counter("corom_windows_total")
    r = httpx.post(url + "/embed", json={"inputs": [LONG * 3], "chunking": "mean"}, headers=auth, timeout=30)
    assert r.status_code == 200, r.text
    assert counter("corom_texts_total") == texts + 1
    assert counter("corom_windows_total") > windows + 1


def test_sigterm_cuts_off_a_body_still_arriving(bundled_artifact):
    """A client trickling its body no longer holds the drain: it gets a JSON 503 and the server exits
    within --drain-seconds (it used to wait out the body, then answer uvicorn's plain-text 500)."""
    proc, port = _start(bundled_artifact, "--api-key", KEY, "--drain-seconds", "1", "--body-timeout", "30")
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        sock.sendall(_post(length=60))
        stop = threading.Event()

        def trickle() -> None:
            while not stop.is_set():
                try:
                    sock.send(b" ")
                except OSError:
                    return
                time.sleep(0.3)

        threading.Thread(target=trickle, daemon=True).start()
        time.sleep(0.5)
        start = time.time()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        took = time.time() - start
        stop.set()
        sock.settimeout(2)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
        assert code == 0 and took < 4, (code, took)
        assert answer.startswith(b"HTTP/1.1 503") and b"application/json" in answer, answer[:200]
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
