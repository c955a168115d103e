"""`corom serve` against `corom serve --ray` (1 and 2 replicas), one run, side by side.

Per system, each a real process tree on loopback: start-up time to the first answer, single-client
latency p50/p99 of one short query (the proxy's own cost per request is the p50 difference to `corom
serve`), throughput and p50/p99 under concurrent clients, and resident memory (the server process; per
replica, the proxy and the rest of Ray). Each system is measured once its shape buckets are compiled.

    .venv/bin/python -m benchmarks.ray_serve [--model PATH] [--seconds 6] [--clients 16]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from corom_runtime.machine import available_cpus

from .concurrency import percentiles
from .hardware import describe
from .run import ROOT
from .served import write_result

OUT = ROOT / "benchmarks" / "results" / "ray-serve"
QUERIES = [f"how do replicas share load number {i} in a small embedding service" for i in range(4000)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def processes(root: int, *needles: str) -> dict[int, str]:
    """pid -> command line of `root`'s descendants whose command line holds one of `needles` (others on
    this machine run their own Ray: theirs must not be counted)."""
    parent, cmds = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmds[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue

    def below(pid: int) -> bool:
        seen = 0
        while pid > 1 and seen < 64:
            pid, seen = parent.get(pid, 0), seen + 1
            if pid == root:
                return True
        return False

    return {p: c for p, c in cmds.items() if any(n in c for n in needles) and below(p)}


def start(args: list[str], ray: bool) -> tuple[subprocess.Popen, httpx.Client, float]:
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "corom_runtime.cli", "serve", *args, "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    first = None
    while time.perf_counter() - started < 300 and proc.poll() is None:
        try:
            if client.post("/embed", json={"inputs": ["first"]}).status_code == 200:
                first = time.perf_counter() - started
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    if first is None:
        raise RuntimeError(f"{args} did not answer (exit {proc.poll()})")
    settled = 0  # every replica's buckets compiled: several /health answers in a row say so
    while settled < 6 and time.perf_counter() - started < 600:
        warming = client.get("/health").json().get("warming")
        settled = 0 if warming else settled + 1
        time.sleep(0.2)
    return proc, client, first


def stop(proc: subprocess.Popen) -> float:
    started = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return time.perf_counter() - started


def sequential(client: httpx.Client, n: int) -> dict:
    seconds = []
    for i in range(n):
        t = time.perf_counter()
        r = client.post("/embed", json={"inputs": [QUERIES[i % len(QUERIES)]]})
        seconds.append(time.perf_counter() - t)
        assert r.status_code == 200, r.text
    return percentiles(seconds)


def concurrent(url: str, clients: int, seconds: float) -> dict:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    stop_at = time.perf_counter() + seconds

    def run(k: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            i = k
            while time.perf_counter() < stop_at:
                t = time.perf_counter()
                r = c.post("/embed", json={"inputs": [QUERIES[i % len(QUERIES)]]})
                latencies[k].append(time.perf_counter() - t)
                errors[k] += r.status_code != 200
                i += clients

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    flat = [x for per in latencies for x in per]
    return {"clients": clients, "requests": len(flat), "errors": sum(errors), "requests_per_s": len(flat) / elapsed,
            **percentiles(flat)}


def cpu_seconds(pids) -> float:
    """User + system CPU seconds the processes have used so far (/proc/PID/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return total


def memory(client: httpx.Client, proc: subprocess.Popen, ray: bool) -> dict:
    if not ray:
        return {"server_mb": rss_mb(proc.pid)}
    replicas = {int(p): rss_mb(int(p)) for p in
                {client.post("/embed", json={"inputs": ["m"]}).headers["x-corom-replica"].rsplit("/", 1)[1]
                 for _ in range(20)}}
    ray_rest = processes(proc.pid, "raylet", "gcs_server", "ServeController", "ProxyActor", "dashboard", "log_monitor",
                         "ray::IDLE", "default_worker")
    return {"driver_mb": rss_mb(proc.pid), "replica_mb": sorted(replicas.values()),
            "proxy_mb": sum(rss_mb(p) for p, c in ray_rest.items() if "ProxyActor" in c),
            "ray_other_mb": sum(rss_mb(p) for p, c in ray_rest.items() if "ProxyActor" not in c and p not in replicas)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("COROM_TEST_ARTIFACT", "all-minilm-l6-v2"))
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--queries", type=int, default=300, help="sequential single-query requests")
    parser.add_argument("--rounds", type=int, default=2,
                        help="the systems are measured in turn, this many times over (a busy CPU drifts)")
    parser.add_argument("--paired-only", action="store_true",
                        help="only the paired proxy-cost run (e.g. under RAY_SERVE_ENABLE_HA_PROXY=1, Ray's "
                             "experimental HAProxy ingress, set in this environment)")
    args = parser.parse_args(argv)
    cpus = available_cpus()
    systems = {
        "corom serve": ["-m", args.model],
        "--ray, 1 replica": ["-m", args.model, "--ray", "--replicas", "1", "--replica-cpus", str(cpus)],
        f"--ray, 2 replicas": ["-m", args.model, "--ray", "--replicas", "2", "--replica-cpus", str(cpus / 2)],
    }
    if args.paired_only:
        ingress = "haproxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "ray-proxy"
        record = {"machine": describe(cpus), "model": args.model, "ray_ingress": ingress,
                  "paired": paired(systems["corom serve"], systems["--ray, 1 replica"], args.queries * 2)}
        p = record["paired"]
        write_result(OUT, f"paired-{ingress}", record,
                     f"Paired ({ingress}, {record['machine']['cpu']}, {record['machine']['date']}, {p['requests']} pairs): "
                     f"corom serve p50 {p['corom_serve']['p50_ms']:.2f} ms, --ray 1 replica p50 "
                     f"{p['ray_1_replica']['p50_ms']:.2f} ms, median difference {p['median_difference_ms']:+.2f} ms\n")
        return
    result: dict = {"machine": describe(cpus), "model": args.model, "clients": args.clients, "seconds": args.seconds,
                    "note": "other engineers were using the same 2 CPUs during this run: absolute figures are "
                            "noisy; compare rows of this run only", "systems": {}}
    for round_, (name, flags) in ((r, item) for r in range(1, args.rounds + 1) for item in systems.items()):
        ray = "--ray" in flags
        proc, client, first = start(flags, ray)
        try:
            row = {"flags": flags, "first_answer_s": first}
            row["single"] = sequential(client, args.queries)
            # the proxy's own CPU per request (what bounds one proxy): its CPU time over the concurrent phase
            proxy = list(processes(proc.pid, "ProxyActor")) if ray else []
            before = cpu_seconds(proxy)
            row["concurrent"] = concurrent(str(client.base_url), args.clients, args.seconds)
            if ray:
                row["proxy_cpu_ms_per_request"] = 1000 * (cpu_seconds(proxy) - before) / row["concurrent"]["requests"]
            row["memory"] = memory(client, proc, ray)
        finally:
            client.close()
            row["stop_s"] = stop(proc)
        row["round"] = round_
        result["systems"][f"{name} (round {round_})"] = row
        print(name, round_, row, flush=True)
    for row in result["systems"].values():  # against corom serve of the same round
        base = result["systems"][f"corom serve (round {row['round']})"]["single"]["p50_ms"]
        row["proxy_cost_p50_ms"] = row["single"]["p50_ms"] - base
    result["paired"] = paired(systems["corom serve"], systems["--ray, 1 replica"], args.queries * 2)
    print("paired", result["paired"], flush=True)
    write_result(OUT, "ray-serve", result, markdown(result))


def paired(plain: list[str], ray: list[str], n: int) -> dict:
    """The proxy's cost with the load of a shared CPU taken out: both servers up at once, one query to
    each in turn, so each pair of samples sees the same moment's load; the median of the differences."""
    a, ca, _ = start(plain, False)
    b, cb, _ = start(ray, True)
    try:
        diffs, plain_s, ray_s = [], [], []
        for i in range(n):
            body = {"inputs": [QUERIES[i % len(QUERIES)]]}
            t = time.perf_counter()
            assert ca.post("/embed", json=body).status_code == 200
            t1 = time.perf_counter()
            assert cb.post("/embed", json=body).status_code == 200
            t2 = time.perf_counter()
            plain_s.append(t1 - t)
            ray_s.append(t2 - t1)
            diffs.append((t2 - t1) - (t1 - t))
    finally:
        ca.close()
        cb.close()
        stop(b)
        stop(a)
    return {"requests": n, "corom_serve": percentiles(plain_s), "ray_1_replica": percentiles(ray_s),
            "median_difference_ms": float(np.median(diffs) * 1000)}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# corom serve vs --ray ({m['cpu']}, {m['cpus_usable']} CPUs, {m['date']})", "",
             f"Model {Path(result['model']).name}; one short query per request; {result['clients']} concurrent "
             f"clients for {result['seconds']:g} s. {result['note']}.", "",
             "| system | first answer s | 1 client p50 ms | p99 ms | +p50 vs corom serve ms | "
             f"{result['clients']} clients req/s | p50 ms | p99 ms | errors | proxy CPU ms/request | memory MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in result["systems"].items():
        mem = r["memory"]
        mem_text = f"{mem['server_mb']:.0f}" if "server_mb" in mem else \
            (f"replicas {'+'.join(f'{x:.0f}' for x in mem['replica_mb'])}, proxy {mem['proxy_mb']:.0f}, "
             f"driver {mem['driver_mb']:.0f}, rest of Ray {mem['ray_other_mb']:.0f}")
        s, c = r["single"], r["concurrent"]
        proxy_cpu = f"{r['proxy_cpu_ms_per_request']:.2f}" if "proxy_cpu_ms_per_request" in r else "-"
        lines.append(f"| {name} | {r['first_answer_s']:.1f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
                     f"{r['proxy_cost_p50_ms']:+.2f} | {c['requests_per_s']:.0f} | {c['p50_ms']:.1f} | "
                     f"{c['p99_ms']:.1f} | {c['errors']} | {proxy_cpu} | {mem_text} |")
    p = result.get("paired")
    if p:
        lines += ["", f"Paired (both servers up, one query to each in turn, {p['requests']} pairs): corom serve "
                      f"p50 {p['corom_serve']['p50_ms']:.2f} ms, --ray 1 replica p50 {p['ray_1_replica']['p50_ms']:.2f} ms; "
                      f"median difference (the proxy's cost per request) {p['median_difference_ms']:+.2f} ms."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
