"""Is the server's event loop free under large requests? `/health` latency while clients post big bodies.

`python -m benchmarks.health_probe` starts a real `corom serve` process on 127.0.0.1, runs `--clients`
threads that each post maximum-size `/embed` requests (256 long passages, ~1 MiB of JSON answered)
back to back, and probes `/health` every 20 ms from its own thread; it reports the probe's p50, p99
and maximum, and the big requests' throughput. Before the fix (parsing, tokenizing and JSON encoding
on the event loop) a probe waited up to 2.5 s. Bounded in time; loopback only.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

from corom_export.corpus import workload_corpus
from corom_runtime.artifacts.cache import build_dir

from .hardware import describe
from .run import RESULTS
from .served import start_server, write_result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.health_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=30.0, help="how long the load runs (default 30)")
    p.add_argument("--clients", type=int, default=4, help="client threads posting 256-text bodies (default 4)")
    p.add_argument("--interval-ms", type=float, default=20.0, help="time between /health probes (default 20)")
    p.add_argument("--artifact", default=str(build_dir("all-minilm-l6-v2")), help="artifact to serve")
    p.add_argument("--port", type=int, default=18933, help="loopback port (default 18933)")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    args = p.parse_args(argv)
    passages = workload_corpus("long", n_queries=0, n_passages=2000).passages
    body = {"inputs": passages[:256]}
    proc, url = start_server(["--model", args.artifact, "--max-items", "256", "--max-body-bytes", str(4 << 20)],
                             args.port)
    try:
        stop = time.time() + args.seconds
        answered = [0]

        def client() -> None:
            with httpx.Client(timeout=120) as c:
                while time.time() < stop:
                    if c.post(url + "/embed", json=body).status_code == 200:
                        answered[0] += 1

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        probes: list[float] = []
        with httpx.Client(timeout=60) as c:
            while time.time() < stop:
                start = time.perf_counter()
                c.get(url + "/health")
                probes.append((time.perf_counter() - start) * 1000)
                time.sleep(args.interval_ms / 1000)
        for t in threads:
            t.join()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    ms = np.array(probes)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "hardware": describe(2),
              "clients": args.clients, "texts_per_request": 256, "seconds": args.seconds,
              "big_requests_answered": answered[0], "probes": len(probes),
              "health_ms": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                            "max": float(ms.max())}}
    h = result["health_ms"]
    summary = (f"/health under {args.clients} clients posting 256-text bodies for {args.seconds:g} s "
               f"({result['hardware']['cpu']}): {len(probes)} probes, p50 {h['p50']:.1f} ms, p99 {h['p99']:.1f} ms, "
               f"max {h['max']:.1f} ms; {answered[0]} big requests answered\n")
    write_result(Path(args.out), "health-probe", result, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
