"""Bulk embedding: streaming memory, and the single-process corpus job against Ray Data on this machine.

`python -m benchmarks.bulk` measures, each in a fresh process:
1. `Embedder.encode_iter` over 100k and 1M short texts from a generator (results discarded): peak RSS
   must not grow with N;
2. `corom embed FILE --output DIR` on a corpus (both workloads: the short mix and long passages) with
   the local engine (2 threads), Ray with 1 actor x 2 threads, Ray with 2 actors x 1 thread (same total
   threads), interleaved over rounds: end-to-end texts/s (start-up included: it is what a job costs)
   and peak RSS of the whole process tree (driver, Ray's daemons and actors).
Writes `benchmarks/results/bulk-*.json` and `latest-bulk.md`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

from corom_export.corpus import workload_corpus
from corom_runtime.artifacts.cache import build_dir

from .run import RESULTS, ROOT, progress

STREAM_CODE = """
import itertools, resource, sys, time
from corom_runtime import Embedder
n = int(sys.argv[1])
emb = Embedder.load(sys.argv[2], variant=sys.argv[3])
words = "how long does it take to get a master degree in computer science at a public university".split()
texts = (" ".join(words[i % 7: i % 7 + 3 + i % 5]) + f" {i}" for i in range(n))
start = time.perf_counter(); rows = 0
for window in emb.encode_iter(texts):
    rows += len(window)
print(rows, time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""

CONFIGS = {
    "local (2 threads)": ["--engine", "local", "--threads", "2"],
    "ray 1 actor x 2 threads": ["--engine", "ray", "--actors", "1", "--threads-per-actor", "2"],
    "ray 2 actors x 1 thread": ["--engine", "ray", "--actors", "2", "--threads-per-actor", "1"],
}


def tree_rss_mb(proc: psutil.Process) -> float:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def run_job(cmd: list[str]) -> dict:
    """Run one job, sampling the RSS of its whole process tree every 0.2 s."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    handle = psutil.Process(proc.pid)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_rss_mb(handle))
        time.sleep(0.2)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {out}")
    summary = json.loads(out.strip().splitlines()[-1])
    return {"seconds": time.perf_counter() - start, "rows": summary["rows"], "peak_rss_mb": peak,
            "texts_per_s": summary["rows"] / (time.perf_counter() - start)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bulk", description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", default=str(build_dir("all-minilm-l6-v2")))
    p.add_argument("--variant", default="ov-int8", help="variant every configuration runs (default ov-int8)")
    p.add_argument("--passages", type=int, default=6000, help="corpus rows per workload (default and most: 6,000, the fixed corpus files)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    p.add_argument("--stream", type=int, nargs="*", default=[100_000, 1_000_000],
                   help="texts for the streaming-memory check (default 100k and 1M)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    result: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "variant": args.variant,
                    "cpus": psutil.cpu_count(), "stream": {}, "jobs": {}}
    for n in args.stream:
        progress(f"encode_iter over {n} short texts")
        out = subprocess.run([sys.executable, "-c", STREAM_CODE, str(n), args.artifact, args.variant],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        rows, seconds, peak = out.stdout.split()
        result["stream"][str(n)] = {"rows": int(rows), "seconds": float(seconds), "peak_rss_mb": float(peak),
                                    "texts_per_s": int(rows) / float(seconds)}
    with tempfile.TemporaryDirectory() as tmp:
        for workload in ("mixed", "long"):
            corpus = workload_corpus(workload, n_queries=0, n_passages=args.passages)
            src = Path(tmp) / f"{workload}.txt"
            src.write_text("".join(t.replace("\n", " ") + "\n" for t in corpus.passages), encoding="utf-8")
            runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
            for round_ in range(args.rounds):
                for name, extra in CONFIGS.items():
                    progress(f"{workload} round {round_ + 1}: {name}")
                    cmd = [sys.executable, "-m", "corom_runtime.cli", "embed", "--model", args.artifact, "--variant",
                           args.variant, "--file", str(src), "--output", str(Path(tmp) / "out"), "--force", "--json",
                           "--quiet", *extra]
                    runs[name].append(run_job(cmd))
            result["jobs"][workload] = {
                name: {"texts_per_s": statistics.median(r["texts_per_s"] for r in rs),
                       "seconds": statistics.median(r["seconds"] for r in rs),
                       "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs), "runs": rs}
                for name, rs in runs.items()}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    (out_dir / f"bulk-{stamp}.json").write_text(json.dumps(result, indent=2))
    (out_dir / "latest-bulk.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = [f"Bulk embedding, {result['variant']}, {result['cpus']} CPUs, {result['date']}", "",
             "| encode_iter over | texts/s | peak RSS MB |", "|---|---|---|"]
    for n, s in result["stream"].items():
        lines.append(f"| {int(n):,} short texts | {s['texts_per_s']:.0f} | {s['peak_rss_mb']:.0f} |")
    for workload, jobs in result["jobs"].items():
        base = jobs["local (2 threads)"]["texts_per_s"]
        lines += ["", f"`corom embed` corpus job, {workload} workload (end to end, medians of rounds):", "",
                  "| engine | texts/s | vs local | seconds | peak RSS MB (process tree) |", "|---|---|---|---|---|"]
        for name, j in jobs.items():
            lines.append(f"| {name} | {j['texts_per_s']:.0f} | {j['texts_per_s'] / base:.2f}x | {j['seconds']:.1f} "
                         f"| {j['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
