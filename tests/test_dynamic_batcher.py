"""The dynamic batcher under load: nothing lost or swapped, errors isolated, backpressure, drain."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from corom_runtime import Embedder
from corom_runtime.serving.batcher import BatcherSettings, DynamicBatcher
from corom_runtime.catalog import VARIANTS, engine_installed
from corom_runtime.errors import BatcherClosedError, OverloadedError

CLIENTS = 64
REQUESTS = int(os.environ.get("COROM_LOAD_REQUESTS", "100"))  # per client (6,400 in all; raise it for a soak)
POOL = [f"request {i}: " + " ".join(["alpha", "beta", "gamma", "delta", "omega"][: 1 + i % 5]) + f" item {i * 7}"
        for i in range(400)]


@pytest.fixture(scope="module")
def embedder(bundled_artifact) -> Embedder:
    """The default CPU variant (what `variant="auto"` picks here): what a server runs."""
    return Embedder.load(bundled_artifact, device="cpu")


def tolerance(embedder: Embedder) -> float:
    """How close a batched answer must be to the same text embedded alone: the variant's batch-invariance
    gate where its recipe promises invariance; ONNX Runtime's dynamic int8 only its parity gate."""
    gate = VARIANTS[embedder.variant].gate
    return gate.batch_invariance or gate.min_cosine


@pytest.fixture(scope="module")
def alone(embedder) -> np.ndarray:
    """Each pool sentence embedded on its own: what every batched response must equal."""
    return np.stack([embedder.encode([t])[0] for t in POOL])


def _check(rows: np.ndarray, indices: list[int], alone: np.ndarray, min_cos: float = 0.9999) -> None:
    expected = alone[indices]
    cos = (rows * expected).sum(1) / np.linalg.norm(rows, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() >= min_cos, cos.min()
    # and it is *this* request's sentence, not a neighbour's: its nearest pool sentence is itself
    nearest = np.argmax(rows @ alone.T, axis=1)
    assert (nearest == np.asarray(indices)).all()


def test_64_threads_thousands_of_requests(embedder, alone):
    settings = BatcherSettings(max_batch_size=32, max_wait_ms=2, max_queue=100_000)
    with DynamicBatcher(embedder, settings) as batcher:
        def client(seed: int) -> tuple[list[int], np.ndarray]:
            rng = np.random.default_rng(seed)
            idx = rng.integers(0, len(POOL), REQUESTS).tolist()
            futures = []
            for j, i in enumerate(idx):
                futures.append(batcher.submit([POOL[i]]))
                if j % 8 == 7:  # a client waits now and then, like a real one
                    futures[-1].result()
            return idx, np.concatenate([f.result(60) for f in futures])

        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(client, range(CLIENTS)))
        for idx, rows in results:
            assert rows.shape == (REQUESTS, embedder.dim)
            _check(rows, idx, alone, tolerance(embedder))
        assert batcher.queued == 0
        m = batcher.metrics
        assert m.value("corom_requests_total") == CLIENTS * REQUESTS
        assert m.value("corom_texts_total") == CLIENTS * REQUESTS
        # batching really happened: far fewer inferences than requests
        assert m.value("corom_batches_total") < CLIENTS * REQUESTS / 4


@pytest.mark.skipif(not engine_installed("openvino"), reason="the lossless CPU mode needs openvino (not installed)")
def test_lossless_mode_concurrent_answers_equal_single_calls(bundled_artifact):
    lossless = Embedder.load(bundled_artifact, variant="ov-bf16", device="cpu")
    alone = np.stack([lossless.encode([t])[0] for t in POOL[:100]])
    with DynamicBatcher(lossless, BatcherSettings(max_batch_size=32, max_wait_ms=2)) as batcher:
        def client(seed: int) -> tuple[list[int], np.ndarray]:
            idx = np.random.default_rng(seed).integers(0, 100, 40).tolist()
            futures = [batcher.submit([POOL[i]]) for i in idx]
            return idx, np.concatenate([f.result(60) for f in futures])

        with ThreadPoolExecutor(32) as pool:
            for idx, rows in pool.map(client, range(32)):
                _check(rows, idx, alone, 0.99999)
        assert batcher.metrics.value("corom_batches_total") < 32 * 40 / 2  # answers really were batched


def test_64_asyncio_tasks(embedder, alone):
    settings = BatcherSettings(max_batch_size=32, max_wait_ms=2, max_queue=100_000)
    n = max(1, REQUESTS // 4)

    async def main(batcher):
        async def client(seed: int):
            rng = np.random.default_rng(1000 + seed)
            idx = rng.integers(0, len(POOL), n).tolist()
            rows = [await batcher.aencode([POOL[i]]) for i in idx]
            return idx, np.concatenate(rows)

        return await asyncio.gather(*(client(s) for s in range(CLIENTS)))

    with DynamicBatcher(embedder, settings) as batcher:
        for idx, rows in asyncio.run(main(batcher)):
            _check(rows, idx, alone, tolerance(embedder))
        assert batcher.queued == 0


def test_multi_text_requests_get_exactly_their_rows(embedder, alone):
    with DynamicBatcher(embedder, BatcherSettings(max_batch_size=16, max_wait_ms=5)) as batcher:
        requests = [list(range(k, k + 1 + k % 9)) for k in range(0, 300, 3)]
        futures = [batcher.submit([POOL[i] for i in r]) for r in requests]
        for r, f in zip(requests, futures):
            _check(f.result(30), r, alone, tolerance(embedder))
            assert f.timings.batch_texts >= len(r) and f.timings.inference_s > 0


def test_bad_request_fails_alone_and_batcher_keeps_serving(embedder, alone):
    with DynamicBatcher(embedder) as batcher:
        good = batcher.submit([POOL[1]])
        with pytest.raises(TypeError, match=r"texts\[1\] is int"):
            batcher.submit(["fine", 42])
        assert batcher.submit([]).result().shape == (0, embedder.dim)
        _check(good.result(10), [1], alone, tolerance(embedder))
        _check(batcher.encode([POOL[2]]), [2], alone, tolerance(embedder))


def poison_inference(embedder, monkeypatch) -> None:
    """Make any inference whose batch holds the word "poison" raise."""
    real = embedder.embed_tokenized
    poison = embedder.tokenizer.encode(["poison"])[0].ids[1]

    def flaky(items, *args):
        if any(poison in i.ids for i in items):
            raise RuntimeError("boom")
        return real(items, *args)

    monkeypatch.setattr(embedder, "embed_tokenized", flaky)


def test_inference_error_fails_only_the_bad_request(embedder, monkeypatch):
    with DynamicBatcher(embedder, BatcherSettings(max_wait_ms=50)) as batcher:
        poison_inference(embedder, monkeypatch)
        futures = [batcher.submit(["poison pill here now"]), batcher.submit(["healthy one"]), batcher.submit(["another"])]
        with pytest.raises(RuntimeError, match="inference failed for this request"):
            futures[0].result(10)
        assert futures[1].result(10).shape == (1, embedder.dim)
        assert futures[2].result(10).shape == (1, embedder.dim)
        assert batcher.metrics.value("corom_requests_failed_total") == 1


def test_backpressure_refuses_instead_of_growing(embedder, monkeypatch):
    gate = threading.Event()
    real = embedder.embed_tokenized

    def slow(items, *args):
        gate.wait(10)
        return real(items, *args)

    monkeypatch.setattr(embedder, "embed_tokenized", slow)
    batcher = DynamicBatcher(embedder, BatcherSettings(max_batch_size=4, max_wait_ms=0, max_queue=8))
    try:
        first = batcher.submit(["a"] * 4)  # taken by the worker, which then blocks
        time.sleep(0.2)
        queued = [batcher.submit(["b"] * 4), batcher.submit(["c"] * 4)]
        with pytest.raises(OverloadedError, match="overloaded.*retry"):
            batcher.submit(["d"])
        assert batcher.metrics.value("corom_requests_rejected_total") == 1
    finally:
        gate.set()
    assert first.result(10).shape == (4, embedder.dim)
    assert all(f.result(10).shape == (4, embedder.dim) for f in queued)
    batcher.close()


def test_cancelled_requests_are_dropped(embedder, monkeypatch):
    gate = threading.Event()
    real = embedder.embed_tokenized
    seen = []

    def slow(items, *args):
        gate.wait(10)
        seen.append(len(items))
        return real(items, *args)

    monkeypatch.setattr(embedder, "embed_tokenized", slow)
    batcher = DynamicBatcher(embedder, BatcherSettings(max_batch_size=2, max_wait_ms=0))
    first = batcher.submit(["x", "y"])
    time.sleep(0.2)
    doomed = batcher.submit(["never computed"])
    assert doomed.cancel()
    kept = batcher.submit(["kept"])
    gate.set()
    assert kept.result(10).shape == (1, embedder.dim) and first.result(10).shape == (2, embedder.dim)
    batcher.close()
    assert seen == [2, 1] and batcher.queued == 0
    assert batcher.metrics.value("corom_requests_cancelled_total") == 1


def test_close_drains_accepted_then_refuses(embedder):
    batcher = DynamicBatcher(embedder, BatcherSettings(max_wait_ms=200))
    futures = [batcher.submit([f"drain {i}"]) for i in range(50)]
    batcher.close()
    assert all(f.done() and f.result().shape == (1, embedder.dim) for f in futures)
    with pytest.raises(BatcherClosedError):
        batcher.submit(["late"])


def test_deadline_closes_a_partial_batch(embedder):
    with DynamicBatcher(embedder, BatcherSettings(max_batch_size=1000, max_batch_tokens=10**6, max_wait_ms=20)) as b:
        start = time.perf_counter()
        b.encode(["lonely request"], timeout=5)
        assert time.perf_counter() - start < 5  # served by the deadline, not by filling a 1000-text batch


def test_invalid_settings():
    with pytest.raises(ValueError):
        BatcherSettings(max_batch_size=0)


def _entry(texts: int, longest: int, enqueued: float):
    from corom_runtime.serving.batcher import Ticket, _Entry
    from concurrent.futures import Future
    from corom_runtime.tokenization import TokenizedText

    return _Entry([TokenizedText([1] * longest, False)] * texts, Ticket(Future()), enqueued, longest)


def test_decide_is_a_pure_function_of_queue_settings_and_time():
    from corom_runtime.serving.batcher import Decision, decide

    s = BatcherSettings(max_batch_size=8, max_batch_tokens=100, max_wait_ms=10)
    assert decide([], s, 0.0, closing=False) == Decision(0, None)
    queue = [_entry(2, 5, 1.0), _entry(3, 5, 1.001)]
    assert decide(queue, s, 1.005, closing=False) == Decision(0, 1.010)    # wait for the oldest's deadline
    assert decide(queue, s, 1.010, closing=False) == Decision(2)             # deadline reached: take both
    assert decide(queue, s, 1.0, closing=True) == Decision(2)                # closing: no waiting
    full = [_entry(4, 5, 1.0), _entry(4, 5, 1.0), _entry(4, 5, 1.0)]
    assert decide(full, s, 1.0, closing=False) == Decision(2)                # size bound: 8 texts
    wide = [_entry(2, 30, 1.0), _entry(2, 30, 1.0)]
    assert decide(wide, s, 1.0, closing=False) == Decision(1)                # token bound: 4 x 30 > 100
    assert decide([_entry(50, 128, 1.0)], s, 1.0, closing=False) == Decision(1)  # always at least one


@pytest.mark.parametrize("kwargs,field", [
    ({"max_wait_ms": float("inf")}, "max_wait_ms"), ({"max_wait_ms": float("nan")}, "max_wait_ms"),
    ({"max_wait_ms": -1}, "max_wait_ms"), ({"max_batch_tokens": 0}, "max_batch_tokens"),
    ({"max_batch_size": 2.5}, "max_batch_size"), ({"max_queue": True}, "max_queue"),
    ({"inline_max_tokens": -1}, "inline_max_tokens"), ({"inline_max_tokens": True}, "inline_max_tokens"),
])
def test_settings_that_would_kill_the_worker_are_refused(kwargs, field, capsys):
    from corom_runtime.cli import main as corom

    with pytest.raises(ValueError, match=field):
        BatcherSettings(**kwargs)
    if field == "max_wait_ms":
        assert corom(["serve", "--max-wait-ms", str(kwargs["max_wait_ms"])]) == 2
        assert "max_wait_ms must be a finite number" in capsys.readouterr().err


def test_a_worker_bug_fails_one_round_and_the_worker_goes_on(embedder, monkeypatch):
    from corom_runtime.serving import batcher as batcher_module

    real = batcher_module.decide
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("a bug in the batching decision")
        return real(*args, **kwargs)

    monkeypatch.setattr(batcher_module, "decide", flaky)
    with DynamicBatcher(embedder, BatcherSettings(inline_max_tokens=0)) as batcher:  # every request via the worker
        assert batcher.encode(["survives"], timeout=10).shape == (1, embedder.dim)
        assert batcher.encode(["still served"], timeout=10).shape == (1, embedder.dim)
        assert batcher.healthy and batcher.metrics.value("corom_worker_errors_total") == 1


def test_public_api_and_bad_containers(embedder):
    import corom_runtime

    assert corom_runtime.DynamicBatcher is DynamicBatcher and corom_runtime.BatcherSettings is BatcherSettings
    for bad, name in (({"a": 1}, "dict"), (None, "NoneType"), ({"x"}, "set"), (3, "int")):
        with pytest.raises(TypeError, match=f"texts must be a string or a list of strings, got {name}"):
            embedder.encode(bad)
    ticket = DynamicBatcher(embedder).submit(["typed ticket"])
    assert ticket.result(10).shape == (1, embedder.dim) and ticket.token_count > 2 and ticket.timings.inference_s > 0


def test_runs_inline_is_a_pure_function_of_size_settings_and_idleness():
    from corom_runtime.serving.batcher import runs_inline

    s = BatcherSettings(max_batch_size=8, inline_max_tokens=64)
    assert runs_inline(1, 20, s, idle=True)
    assert runs_inline(2, 32, s, idle=True)                  # 64 padded tokens: the bound itself
    assert not runs_inline(3, 32, s, idle=True)              # 96 > 64: the worker takes it
    assert not runs_inline(1, 20, s, idle=False)             # something queued or running: queue behind it
    assert not runs_inline(9, 2, s, idle=True)               # more texts than a batch
    assert not runs_inline(1, 20, BatcherSettings(max_wait_ms=5, inline_max_tokens=64), idle=True)  # lingering
    assert not runs_inline(1, 1, BatcherSettings(inline_max_tokens=0), idle=True)                    # switched off


def _recording(embedder, monkeypatch, gate: threading.Event | None = None) -> list:
    """Wrap the embedder's inference: record each call's thread, its size and how many ran at once."""
    real, calls, running, lock = embedder.embed_tokenized, [], [0], threading.Lock()

    def recorded(items, *args):
        with lock:
            running[0] += 1
            calls.append((threading.current_thread().name, len(items), running[0]))
        try:
            if gate is not None:
                gate.wait(10)
            return real(items, *args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(embedder, "embed_tokenized", recorded)
    return calls


def test_a_lone_blocking_request_runs_in_the_callers_thread(embedder, alone, monkeypatch):
    calls = _recording(embedder, monkeypatch)
    with DynamicBatcher(embedder) as batcher:
        _check(batcher.encode([POOL[3]], timeout=10), [3], alone, tolerance(embedder))     # inline
        _check(batcher.submit([POOL[4]]).result(10), [4], alone, tolerance(embedder))      # not asked: the worker
        long = " ".join(["word"] * embedder.max_seq_length)  # 8 texts x the window: over the inline bound, so the worker
        assert batcher.encode([long] * 8, timeout=10).shape == (8, embedder.dim)
        assert batcher.metrics.value("corom_inline_total") == 1
    assert [c[0] for c in calls] == [threading.current_thread().name, "corom-batcher", "corom-batcher"]


def test_requests_during_an_inline_one_queue_for_the_worker(embedder, alone, monkeypatch):
    gate = threading.Event()
    calls = _recording(embedder, monkeypatch, gate)
    with DynamicBatcher(embedder) as batcher:
        first = {}
        caller = threading.Thread(target=lambda: first.setdefault("rows", batcher.encode([POOL[5]], timeout=10)),
                                  name="inline-caller")
        caller.start()
        while not calls:  # the inline inference has begun (and waits on the gate)
            time.sleep(0.001)
        queued = [batcher.submit([POOL[6]]), batcher.submit([POOL[7]], inline=True)]  # busy: both queue
        time.sleep(0.1)
        assert not any(t.done() for t in queued) and len(calls) == 1  # the worker waits for the inline one
        gate.set()
        caller.join(10)
        _check(first["rows"], [5], alone, tolerance(embedder))
        _check(np.concatenate([t.result(10) for t in queued]), [6, 7], alone, tolerance(embedder))
    assert calls[0][0] == "inline-caller" and {c[0] for c in calls[1:]} == {"corom-batcher"}
    assert max(c[2] for c in calls) == 1  # never two inferences at once


def test_an_inline_failure_fails_that_request_and_frees_the_batcher(embedder, alone, monkeypatch):
    poison_inference(embedder, monkeypatch)
    with DynamicBatcher(embedder) as batcher:
        with pytest.raises(RuntimeError, match="inference failed for this request"):
            batcher.encode(["poison pill"], timeout=10)
        _check(batcher.encode([POOL[8]], timeout=10), [8], alone, tolerance(embedder))  # inline again: not stuck
        _check(batcher.submit([POOL[9]]).result(10), [9], alone, tolerance(embedder))  # and the worker too
        assert batcher.metrics.value("corom_inline_total") == 2 and batcher.healthy
