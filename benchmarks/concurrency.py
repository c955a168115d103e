"""Many concurrent single-sentence clients, with and without the dynamic batcher, in one run."""

from __future__ import annotations

import threading
import time

import numpy as np

from corom_runtime import Embedder
from corom_runtime.serving.batcher import BatcherSettings, DynamicBatcher


def percentiles(seconds: list[float]) -> dict:
    """p50/p95/p99 in milliseconds, the latency summary every benchmark reports."""
    arr = np.asarray(seconds) * 1000
    return {f"p{q}_ms": float(np.percentile(arr, q)) for q in (50, 95, 99)}


def _drive(call, clients: int, texts: list[str], seconds: float) -> dict:
    """`clients` threads call `call([text])` back to back for `seconds`; every latency recorded."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop = time.perf_counter() + seconds
    barrier = threading.Barrier(clients + 1)

    def client(k: int) -> None:
        i = k
        barrier.wait()
        while time.perf_counter() < stop:
            t = time.perf_counter()
            call([texts[i % len(texts)]])
            latencies[k].append(time.perf_counter() - t)
            i += clients

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    flat = [x for per in latencies for x in per]
    return {"requests": len(flat), "seconds": elapsed, "requests_per_s": len(flat) / elapsed, **percentiles(flat)}


def run(embedder: Embedder, texts: list[str], clients_list=(1, 8, 32, 128), seconds: float = 4.0,
        settings: BatcherSettings = BatcherSettings(max_batch_size=32)) -> dict:
    # one batch of 32 typical requests, to check p99 <= max_wait + 2 batch compute times
    sample = embedder.tokenizer.encode(texts[:settings.max_batch_size])
    embedder.embed_tokenized(sample, settings.max_batch_size)
    batch_times = []
    for _ in range(10):
        t = time.perf_counter()
        embedder.embed_tokenized(sample, settings.max_batch_size)
        batch_times.append(time.perf_counter() - t)
    batch_s = float(np.median(batch_times))
    rows = []
    for clients in clients_list:
        direct = _drive(embedder.encode, clients, texts, seconds)
        with DynamicBatcher(embedder, settings) as batcher:
            batched = _drive(batcher.encode, clients, texts, seconds)
            batched["mean_batch_texts"] = batcher.metrics.value("corom_texts_total") / max(1, batcher.metrics.value("corom_batches_total"))
        rows.append({"clients": clients, "no_batching": direct, "dynamic_batching": batched,
                     "speedup": batched["requests_per_s"] / direct["requests_per_s"]})
    return {"settings": vars(settings), "batch32_compute_ms": batch_s * 1000,
            "p99_bound_ms": settings.max_wait_ms + 2 * batch_s * 1000, "rows": rows}
