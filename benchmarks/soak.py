"""Soak: `corom serve` under steady load of random shapes for a long time; memory must stay flat,
counters exact, and a single query as quick after it as before.

`python -m benchmarks.soak --minutes 30` starts a real server process on 127.0.0.1, measures
single-query latency (one client, `--probe-calls` calls), runs N client threads (each: a request of
1..32 texts of 1..~128 tokens, wait for the answer, the next; 5% bad requests) for the given time,
samples the server's RSS every 10 s, measures single-query latency again, and writes
`benchmarks/results/soak-*.json` and a Markdown summary. Bounded in count and time; loopback only.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from corom_export.corpus import workload_corpus
from corom_runtime.artifacts.cache import build_dir

from .concurrency import percentiles
from .run import RESULTS
from .served import start_server, write_result


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def metric(text: str, name: str) -> float:
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def growth(samples: list[tuple[float, float]], from_s: float) -> float | None:
    """Relative RSS growth from the first sample at or after `from_s` to the last sample."""
    later = [rss for t, rss in samples if t >= from_s]
    return (later[-1] - later[0]) / later[0] if len(later) >= 2 else None


PROBE_WARMUP = 20


def single_query_latency(url: str, queries: list[str], calls: int) -> dict:
    """One client, one text per request, back to back: p50/p95/p99 ms."""
    times = []
    with httpx.Client(base_url=url, timeout=30) as c:
        for i in range(calls + PROBE_WARMUP):
            start = time.perf_counter()
            c.post("/embed", json={"inputs": [queries[i % len(queries)]]}).raise_for_status()
            if i >= PROBE_WARMUP:  # the first calls warm the connection up
                times.append(time.perf_counter() - start)
    return percentiles(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="how long to run (default 30)")
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads (default 8)")
    p.add_argument("--artifact", default=str(build_dir("all-minilm-l6-v2")), help="artifact to serve")
    p.add_argument("--variant", default="auto", help="variant to serve (default auto)")
    p.add_argument("--port", type=int, default=18931, help="loopback port (default 18931)")
    p.add_argument("--probe-calls", type=int, default=2000, help="single-query calls before and after (default 2000)")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    args = p.parse_args(argv)
    texts = workload_corpus("long", n_queries=200, n_passages=2000)
    pool = texts.queries + texts.passages
    queries = workload_corpus("mixed", n_queries=200, n_passages=10).queries
    proc, url = start_server(["--model", args.artifact, "--variant", args.variant], args.port)
    before = single_query_latency(url, queries, args.probe_calls)
    probes = 2 * (args.probe_calls + PROBE_WARMUP)  # answered by the server too: part of its count
    duration = args.minutes * 60
    start = time.time()
    counts = {"ok": 0, "client_error": 0, "other": 0}
    lock = threading.Lock()

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as c:
            while time.time() - start < duration:
                bad = rng.random() < 0.05
                # random shapes: 1..32 texts, each cut to 1..100 words (about 1..128 tokens)
                body = {"inputs": 42} if bad else {"inputs": [" ".join(t.split()[:rng.randint(1, 100)])
                                                              for t in rng.sample(pool, rng.randint(1, 32))]}
                try:
                    status = c.post(url + "/embed", json=body).status_code
                except httpx.HTTPError:
                    status = -1
                kind = "ok" if status == 200 else "client_error" if 400 <= status < 500 else "other"
                with lock:
                    counts[kind] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    samples: list[tuple[float, float]] = []
    while any(t.is_alive() for t in threads):
        samples.append((time.time() - start, rss_mb(proc.pid)))
        print(f"[soak {samples[-1][0]:6.0f}s] RSS {samples[-1][1]:.1f} MB, {counts}", file=sys.stderr, flush=True)
        time.sleep(10)
    for t in threads:
        t.join()
    after = single_query_latency(url, queries, args.probe_calls)
    text = httpx.get(url + "/metrics").text
    served = metric(text, "corom_requests_total")
    proc.send_signal(signal.SIGTERM)
    exit_code = proc.wait(120)
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "minutes": args.minutes,
        "clients": args.clients, "variant": args.variant, "counts": counts, "server_requests_total": served,
        "probe_requests": probes, "counters_exact": served == counts["ok"] + probes, "rss_samples": samples,
        "rss_growth_from_minute_5": growth(samples, 300.0), "exit_code": exit_code,
        "single_query_before": before, "single_query_after": after,
    }
    g = result["rss_growth_from_minute_5"]
    summary = (f"Soak {args.minutes:g} min, {args.clients} clients: {counts['ok']} answered 200, "
               f"{counts['client_error']} bad requests answered 4xx, {counts['other']} other; server counted "
               f"{served:.0f} with {probes} single-query probes (exact: {result['counters_exact']}); RSS {samples[0][1]:.0f} -> {samples[-1][1]:.0f} MB, "
               f"growth from minute 5: {'-' if g is None else f'{g:.2%}'}; exit {exit_code}. Single query through "
               f"the server, p50 / p99 ms: before {before['p50_ms']:.2f} / {before['p99_ms']:.2f}, after "
               f"{after['p50_ms']:.2f} / {after['p99_ms']:.2f}\n")
    write_result(Path(args.out), "soak", result, summary)
    return 0 if result["counters_exact"] and counts["other"] == 0 and exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
