"""`corom serve --ray`: the flags' checks (pure, no Ray), the proxy's error shape, and ONE real local Ray
Serve application with 2 replicas shared by the module: rows under concurrency, a replica killed under
load, the OpenAI SDK, and a shutdown with requests in flight (last: it stops the application)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from corom_runtime import Embedder
from corom_runtime.cli import build_parser
from corom_runtime.errors import CoromError, InvalidInputError
from corom_runtime.serving import ray_serve as rs

VARIANT = "opt"  # fp32, batch-invariant: a served row equals the in-process one up to rounding
KEY = "test-key"


def parse(*flags: str):
    return build_parser().parse_args(["serve", "--ray", *flags])


# -- pure: a bad layout is refused before anything starts --------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (("--replicas", "0"), "--replicas must be a whole number of at least 1"),
    (("--autoscale", "two:four"), "--autoscale must be MIN:MAX"),
    (("--autoscale", "4"), "--autoscale must be MIN:MAX"),
    (("--autoscale", "3:1"), "0 <= MIN <= MAX"),
    (("--autoscale", "1:2", "--replicas", "2"), "not both"),
    (("--replica-cpus", "-1"), "--replica-cpus must be a number of at least 0"),
    (("--replica-cpus", "0"), "must reserve something"),
    (("--target-ongoing", "0", "--autoscale", "1:2"), "--target-ongoing must be above 0"),
])
def test_bad_ray_flags_fail_before_anything_starts(flags, message):
    with pytest.raises(InvalidInputError, match=message):
        rs.config_from_args(parse(*flags))


def test_layout_must_fit_the_cluster():
    two_nodes = [{"CPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}]
    with pytest.raises(CoromError, match="no node of this Ray cluster has that many CPUs"):
        rs.check_fits(rs.RaySettings(replica_cpus=8), two_nodes, fixed_cluster=False)
    with pytest.raises(CoromError, match="GPUs"):
        rs.check_fits(rs.RaySettings(replica_gpus=2), two_nodes, fixed_cluster=False)
    # 2 + 4 CPUs hold 6 one-CPU replicas: a fixed (local) cluster refuses 7, one that may grow does not
    rs.check_fits(rs.RaySettings(replicas=6), two_nodes, fixed_cluster=True)
    with pytest.raises(CoromError, match="room for 6"):
        rs.check_fits(rs.RaySettings(replicas=7), two_nodes, fixed_cluster=True)
    rs.check_fits(rs.RaySettings(replicas=7), two_nodes, fixed_cluster=False)
    rs.check_fits(rs.RaySettings(replicas=4, replica_cpus=0.5), [{"CPU": 2.0}], fixed_cluster=True)


def test_flags_map_to_ray_options_and_replica_threads():
    fixed = rs.config_from_args(parse("--replicas", "3", "--replica-cpus", "2.5", "--max-connections", "100"))
    options = rs.deployment_options(fixed)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 2.5}
    assert options["max_queued_requests"] == 100  # over the connection bound: 503, as corom serve
    scaled = rs.deployment_options(rs.config_from_args(parse("--autoscale", "0:4", "--target-ongoing", "8",
                                                             "--replica-gpus", "0.25")))
    assert scaled["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 8.0}
    assert scaled["ray_actor_options"]["num_gpus"] == 0.25 and "num_replicas" not in scaled
    assert [rs.replica_threads(c) for c in (0.5, 1.0, 2.5, 4.0)] == [1, 1, 2, 4]
    assert rs.replica_threads(4.0, threads=1) == 1
    # every corom serve flag keeps its meaning: the same ServerSettings as the plain server builds
    server = rs.config_from_args(parse("--max-items", "7", "--api-key", "k", "--host", "0.0.0.0")).server
    assert (server.max_items, server.api_key, server.allowed_hosts) == (7, "k", None)
    # --fidelity reaches every replica's load, as it reaches corom serve's
    assert rs.config_from_args(parse("--fidelity", "fast")).model.fidelity == "fast"
    assert rs.config_from_args(parse()).model.fidelity is None


def test_kuberay_example_builds_the_application():
    """examples/rayservice.yaml's args go through `corom serve`'s parser into a Ray Serve application."""
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with the [ray] extra")
    pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")
    from pathlib import Path

    spec = yaml.safe_load((Path(__file__).parents[1] / "examples" / "rayservice.yaml").read_text())["spec"]
    app = yaml.safe_load(spec["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "corom_runtime.serving.ray_serve:app_builder"
    built = rs.app_builder(app["args"])
    config = built._bound_deployment.init_args[0]
    assert config.model.model == app["args"]["model"] and config.ray.autoscale == (1, 8)
    assert config.ray.replica_cpus == 2 and config.server.allowed_hosts == ("*",)
    with pytest.raises(InvalidInputError, match="--autoscale"):
        rs.app_builder({**app["args"], "autoscale": "lots"})


def test_unknown_model_refuses_with_the_reason():
    with pytest.raises(CoromError, match="no-such-model"):
        rs.precheck_model(rs.ModelSpec("no-such-model"))


def test_proxy_errors_leave_in_the_one_json_shape():
    """What Ray's proxy writes itself (plain text) is rewritten; the app's JSON answers pass untouched."""

    def app_answering(status: int, content_type: bytes, body: bytes):
        async def app(scope, receive, send):
            await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]})
            await send({"type": "http.response.body", "body": body, "more_body": False})
        return app

    def run(app) -> tuple[int, dict, bytes]:
        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        asyncio.run(rs.ProxyErrors(app)({"type": "http"}, None, send))
        return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])

    status, headers, body = run(app_answering(500, b"text/plain", b"Internal Server Error"))
    assert status == 503 and headers[b"retry-after"] == b"1"
    assert json.loads(body)["error"]["code"] == 503 and "replica" in json.loads(body)["error"]["message"]
    async def silent(scope, receive, send):  # how Ray's proxy "answers" a request whose replica died
        return None

    status, headers, body = run(silent)
    assert status == 503 and json.loads(body)["error"]["type"] == "server_error"
    own = b'{"error":{"message":"x","type":"invalid_request_error","code":400}}'
    assert run(app_answering(400, b"application/json", own))[2] == own
    assert run(app_answering(200, b"text/plain", b"ok"))[:1] == (200,)


# -- one real Ray Serve application, 2 replicas ----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def embedder(bundled_artifact) -> Embedder:
    return Embedder.load(bundled_artifact, variant=VARIANT, threads=1)


@pytest.fixture(scope="module")
def served(bundled_artifact):
    pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")
    port = free_port()
    args = parse("-m", str(bundled_artifact), "--variant", VARIANT, "--threads", "1", "--replicas", "2",
                 "--replica-cpus", "0.5", "--port", str(port), "--api-key", KEY, "--drain-seconds", "10")
    config = rs.config_from_args(args)
    # the suite's budget: no background compile of every shape bucket (it would take both cores)
    config = rs.RayServeConfig(config.model, config.server, config.ray, warm_buckets=False, drain_s=10.0)
    started = time.perf_counter()
    rs.start(config, "127.0.0.1", port, ray_init={"num_cpus": 2})
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
        first = client.post("/embed", json={"inputs": ["first"]})
        assert first.status_code == 200, first.text
        print(f"ray serve: first answer {time.perf_counter() - started:.1f}s after start")
        yield client
    rs.stop()


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def check_rows(texts: list[str], rows: np.ndarray, embedder: Embedder) -> None:
    """Each row is its own text's vector, and nearer to it than to any other text's (no mixed rows)."""
    expected = embedder.encode(texts)
    assert rows.shape == expected.shape
    assert cos(rows, expected).min() >= 0.9999
    nearest = (rows / np.linalg.norm(rows, axis=1, keepdims=True)) @ \
              (expected / np.linalg.norm(expected, axis=1, keepdims=True)).T
    assert (nearest.argmax(1) == np.arange(len(texts))).all()


def test_concurrent_requests_get_their_own_rows_from_both_replicas(served, embedder):
    requests = [[f"request {i} text {j}: {'alpha beta gamma ' * (i % 5)}{i * 31 + j}" for j in range(1 + i % 3)]
                for i in range(48)]

    def one(texts):
        r = served.post("/v1/embeddings", json={"input": texts})
        assert r.status_code == 200, r.text
        return r.headers["x-corom-replica"], np.array([d["embedding"] for d in r.json()["data"]], np.float32)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, requests))
    for texts, (_, rows) in zip(requests, answers):
        check_rows(texts, rows, embedder)
    assert len({replica for replica, _ in answers}) == 2  # both replicas served


def test_same_errors_as_corom_serve(served):
    unauthorized = httpx.post(str(served.base_url.join("/embed")), json={"inputs": ["x"]})
    assert unauthorized.status_code == 401 and unauthorized.json()["error"]["type"] == "authentication_error"
    bad = served.post("/embed", json={"inputs": 5})
    assert bad.status_code == 400 and "'inputs' must be a string" in bad.json()["error"]["message"]
    big = served.post("/embed", content=b"[" + b"1," * (1 << 20) + b"1]", headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == 413
    assert served.get("/nowhere").json()["error"]["code"] == 404
    assert served.post("/embed", content=b"{}", headers={"content-type": "text/plain"}).status_code == 415
    # the proxy's uvicorn runs corom serve's protocol: a request head over 16 KiB is a JSON 400
    with socket.create_connection((served.base_url.host, served.base_url.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        head, _, body = sock.recv(65536).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and json.loads(body)["error"]["code"] == 400, head
    health = served.get("/health")
    assert health.status_code == 200 and health.json()["variant"] == VARIANT
    assert "corom_" in served.get("/metrics").text


def test_openai_sdk_round_trip(served, embedder):
    from openai import OpenAI

    client = OpenAI(base_url=str(served.base_url.join("/v1")), api_key=KEY, max_retries=0)
    texts = ["The quick brown fox.", "Ray Serve replicas each hold a batcher."]
    answer = client.embeddings.create(model=embedder.info.model, input=texts)  # the SDK asks for base64: decoded as float32
    check_rows(texts, np.array([d.embedding for d in answer.data], np.float32), embedder)


def test_killed_replica_costs_only_its_requests_and_is_replaced(served, embedder):
    """SIGKILL one replica's process under load: every answer is its own correct rows or a 5xx in the
    JSON error shape, the other replica keeps serving, and a replacement replica comes up and serves."""
    seen: dict[str, int] = {}
    while len(seen) < 2:
        r = served.post("/embed", json={"inputs": ["who"]})
        replica, pid = r.headers["x-corom-replica"].rsplit("/", 1)
        seen[replica] = int(pid)
    victim, survivor = list(seen)
    stop, results, lock = threading.Event(), [], threading.Lock()

    def load(worker: int) -> None:
        i = 0
        while not stop.is_set():
            texts = [f"worker {worker} request {i} item {j} " + "words " * (i % 7) for j in range(3)]
            try:
                r = served.post("/embed", json={"inputs": texts})
                outcome = (texts, r.status_code, r.headers.get("x-corom-replica", ""), r.content)
            except httpx.HTTPError as exc:  # a lost answer: the test fails on it below
                outcome = (texts, -1, "", repr(exc).encode())
            with lock:
                results.append(outcome)
            i += 1

    threads = [threading.Thread(target=load, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    os.kill(seen[victim], signal.SIGKILL)
    replaced = None
    deadline = time.monotonic() + 60
    while replaced is None and time.monotonic() < deadline:
        time.sleep(0.3)
        with lock:
            tags = {tag.rsplit("/", 1)[0] for _, status, tag, _ in results[-30:] if status == 200}
        replaced = next((t for t in tags if t not in seen), None)
    stop.set()
    for t in threads:
        t.join()
    assert replaced is not None, "no replacement replica answered within 60 s"
    statuses = [status for _, status, _, _ in results]
    assert -1 not in statuses, "a request got no HTTP answer at all"
    failed = [(s, b) for _, s, _, b in results if s != 200]
    for status, body in failed:
        assert status >= 500 and json.loads(body)["error"]["code"] == status, (status, body)
    assert len(failed) <= 12, f"{len(failed)} requests failed: more than the killed replica can have held"
    ok = [(texts, body) for texts, s, _, body in results if s == 200]
    assert sum(1 for _, s, tag, _ in results if s == 200 and tag.startswith(survivor + "/")) > 0
    texts = [t for texts, _ in ok for t in texts]
    rows = np.concatenate([np.array(json.loads(body), np.float32) for _, body in ok])
    check_rows(texts, rows, embedder)


def test_shutdown_with_requests_in_flight_answers_them_or_503(served, embedder):
    """Last in the module: stopping the application drains. Every request gets its own rows or a 503 (or,
    once the proxy is gone, no connection at all: nothing sent); at least one was in flight at the stop.
    A client answered 503 stops, as one honouring Retry-After would (Ray kills its proxy outright: a
    request sent in that instant would be cut, as one racing any server's exit can be)."""
    records, lock = [], threading.Lock()
    stopping_at: list[float] = []

    def client(k: int) -> None:
        i = 0
        while True:
            batch = [f"draining {k} {i} {j} " + "long text " * 40 for j in range(4)]
            sent = time.monotonic()
            try:
                r = served.post("/embed", json={"inputs": batch})
                outcome = (batch, sent, time.monotonic(), r.status_code, r.content)
            except httpx.ConnectError:  # the proxy is gone: nothing was sent
                return
            except httpx.HTTPError as exc:
                outcome = (batch, sent, time.monotonic(), -1, repr(exc).encode())
            with lock:
                records.append(outcome)
            if outcome[3] != 200:
                return  # a client told 503 (Retry-After) goes elsewhere
            i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    stopping_at.append(time.monotonic())
    rs.stop()
    stopped_at = [time.monotonic()]
    for t in threads:
        t.join(30)
    assert any(sent < stopping_at[0] < done for _, sent, done, _, _ in records), "no request was in flight"
    for batch, sent, _, status, body in records:
        if status == 200:  # sent before the stop, or just after it, before the replicas heard of it
            check_rows(batch, np.array(json.loads(body), np.float32), embedder)
        else:
            assert status == 503 and json.loads(body)["error"]["code"] == 503, \
                (status, body[:300], sent - stopping_at[0], stopped_at[0] - stopping_at[0])
