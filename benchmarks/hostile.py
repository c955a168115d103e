"""What slow or oversized anonymous clients cost a keyed server: connections held, RSS, /health p99.

`python -m benchmarks.hostile` starts a real `corom serve` on 127.0.0.1 with an API key, a small
connection bound and short timeouts, then runs one phase per attack, each `--seconds` long, with
`--clients` anonymous sockets (no key):
- `oversized-trickle`: POST declaring Content-Length 2,000,000 (over the 1 MiB limit), a byte every 0.5 s;
- `trickle`: POST declaring a 29-byte body, a byte every 0.5 s;
- `pipelined-head`: GET /health, then a pipelined GET with an 8 MB header, in one write;
and, last, SIGTERM while one client trickles a body: seconds to exit past --drain-seconds, and what
that client was answered. Meanwhile a probe asks /health every 50 ms: p50/p99 and how many probes
were not answered 200. Connections held: the attack sockets the server had not closed at the
phase's end. RSS: the server process's peak during the phase. Bounded in time; loopback only.
`--pythonpath DIR` serves another checkout's runtime (the "before" run).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

KEY = "hostile-bench-key"
SERVE = ["--api-key", KEY, "--max-connections", "12", "--body-timeout", "2", "--header-timeout", "2",
         "--drain-seconds", "3"]
RESULTS = Path(__file__).resolve().parent / "results" / "hostile"


def start(artifact: str, port: int, pythonpath: str | None) -> subprocess.Popen:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-m", "corom_runtime.cli", "serve", "--model", artifact,
                             "--port", str(port), *SERVE], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not start")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def head(port: int, length: int) -> bytes:
    return (f"POST /embed HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def attack(kind: str, port: int, stop: float, socks: list[socket.socket]) -> None:
    """One anonymous client: opens its socket(s) and keeps at it until `stop` (reconnecting when cut off)."""
    while time.time() < stop:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            time.sleep(0.2)
            continue
        socks.append(sock)
        try:
            if kind == "pipelined-head":
                big = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 8_000_000 + b"\r\n\r\n"
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" + big)
                sock.settimeout(max(0.1, stop - time.time()))
                while sock.recv(65536):
                    pass
            else:
                sock.sendall(head(port, 2_000_000 if kind == "oversized-trickle" else 29))
                while time.time() < stop:
                    sock.sendall(b" ")
                    time.sleep(0.5)
        except OSError:
            pass  # cut off: reconnect, as a hostile client would


def held(socks: list[socket.socket]) -> int:
    """Attack sockets the server has not closed (no FIN or reset seen)."""
    open_ = 0
    for sock in socks:
        try:
            sock.setblocking(False)
            while True:
                data = sock.recv(65536)
                if not data:
                    break
        except BlockingIOError:
            open_ += 1
        except OSError:
            pass
    return open_


def phase(kind: str, port: int, pid: int, clients: int, seconds: float) -> dict:
    stop = time.time() + seconds
    socks: list[socket.socket] = []
    threads = [threading.Thread(target=attack, args=(kind, port, stop, socks), daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    probes, failed, rss = [], 0, [rss_mb(pid)]
    with httpx.Client(timeout=5) as c:
        time.sleep(0.5)  # the attack is in place
        while time.time() < stop - 0.3:
            t0 = time.perf_counter()
            try:
                ok = c.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            probes.append((time.perf_counter() - t0) * 1000)
            failed += not ok
            rss.append(rss_mb(pid))
            time.sleep(0.05)
    still = held(socks)
    for t in threads:
        t.join(seconds + 5)
    for s in socks:
        s.close()
    p = np.asarray(probes)
    return {"attack": kind, "clients": clients, "seconds": seconds, "connections_opened": len(socks),
            "connections_held_at_end": still, "probes": len(probes), "probes_not_200": failed,
            "health_p50_ms": round(float(np.percentile(p, 50)), 2), "health_p99_ms": round(float(np.percentile(p, 99)), 2),
            "rss_start_mb": round(rss[0], 1), "rss_peak_mb": round(max(rss), 1)}


def sigterm(proc: subprocess.Popen, port: int) -> dict:
    """One client trickles a body; SIGTERM; how long the exit takes and what the client got."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(head(port, 29).replace(b"Content-Type", f"Authorization: Bearer {KEY}\r\nContent-Type".encode()))
    answer = bytearray()

    def trickle() -> None:
        try:
            for _ in range(60):
                sock.sendall(b" ")
                time.sleep(0.5)
        except OSError:
            pass

    threading.Thread(target=trickle, daemon=True).start()
    time.sleep(0.5)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = None
    took = time.time() - t0
    sock.settimeout(1)
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except OSError:
        pass
    sock.close()
    return {"exit_seconds": round(took, 1), "drain_seconds": 3, "exit_code": code,
            "trickler_answer": bytes(answer.split(b"\r\n", 1)[0]).decode("latin-1") or "(none)",
            "trickler_answer_is_json": b"application/json" in answer}


def main(argv: list[str] | None = None) -> int:
    from corom_runtime.machine import cpu_model

    p = argparse.ArgumentParser(prog="python -m benchmarks.hostile", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", default="/work/prebuilt/all-minilm-l6-v2", help="artifact to serve")
    p.add_argument("--clients", type=int, default=8, help="anonymous attack sockets per phase (default 8)")
    p.add_argument("--seconds", type=float, default=12.0, help="length of each phase (default 12)")
    p.add_argument("--port", type=int, default=18944)
    p.add_argument("--pythonpath", default=None, help="serve the runtime found here (another checkout's runtime/)")
    p.add_argument("--label", default="after", help="name of this run in the results (before / after)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    proc = start(args.artifact, args.port, args.pythonpath)
    try:
        phases = [phase(kind, args.port, proc.pid, args.clients, args.seconds)
                  for kind in ("oversized-trickle", "trickle", "pipelined-head")]
        stopping = sigterm(proc, args.port)
    finally:
        if proc.poll() is None:
            proc.kill()
    result = {"label": args.label, "cpu": cpu_model(), "cores": os.cpu_count(), "server": " ".join(SERVE[2:]) +
              " (with --api-key; attackers send none)", "phases": phases, "sigterm_with_a_trickler": stopping}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"hostile-{args.label}.json").write_text(json.dumps(result, indent=2))
    lines = [f"### {args.label}: {result['cpu']} ({result['cores']} cores), corom serve {result['server']}", "",
             "| attack | clients | held at end | probes not 200 | /health p50 ms | p99 ms | RSS start -> peak MB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for ph in phases:
        lines.append(f"| {ph['attack']} | {ph['clients']} | {ph['connections_held_at_end']} | "
                     f"{ph['probes_not_200']}/{ph['probes']} | {ph['health_p50_ms']} | {ph['health_p99_ms']} | "
                     f"{ph['rss_start_mb']} -> {ph['rss_peak_mb']} |")
    lines += ["", f"SIGTERM with one client trickling a body (--drain-seconds 3): exit after "
                  f"{stopping['exit_seconds']} s (code {stopping['exit_code']}); the client got "
                  f"`{stopping['trickler_answer']}` (JSON: {stopping['trickler_answer_is_json']})", ""]
    (out / f"hostile-{args.label}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
