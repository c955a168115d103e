"""The benchmark harness itself must not rot: its --quick mode runs end to end here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_runs_and_writes_results(bundled_artifact, tmp_path):
    # the harness's path end to end, on as little text as proves it (the figures are the benchmark's job):
    # 40 passages still hold 10 neighbours for top-10, and long passages stay over twice the mix's tokens
    from corom_runtime import Embedder

    default = "corom-" + Embedder.load(bundled_artifact, device="cpu", warmup=False).variant
    # the reference, a peer and the default (and corom-opt, fp32, whose batch invariance is exact)
    wanted = {"pytorch-fp32", "openvino-bf16", default}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--artifact", str(bundled_artifact),
                           "--passages", "40", "--queries", "10", "--latency-n", "10", "--out", str(tmp_path),
                           "--systems", *sorted(wanted)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "latest-quick.json").read_text())
    systems = result["systems"]
    assert result["config"]["workloads"] == ["mixed", "long"]
    assert result["config"]["long"]["mean_tokens"] > 2 * result["config"]["mixed"]["mean_tokens"]
    assert result["config"]["default_system"] == default and set(systems) == wanted
    for name in systems:
        s = systems[name]
        assert not s.get("error"), s
        assert s["latency"]["p50_ms"] > 0 and 0.9 < s["batch_invariance"] <= 1.0 + 1e-6
        for w in ("mixed", "long"):
            assert s["workloads"][w]["sorted_sent_per_s"] > 0
            assert 0.9 < s["workloads"][w]["quality"]["min_cosine"] <= 1.0 + 1e-6
    assert systems["pytorch-fp32"]["workloads"]["long"]["quality"]["top10_agreement"] == 1.0
    assert systems["pytorch-fp32"]["batch_invariance"] > 0.99999  # fp32: the batch does not change a vector
    assert systems[default]["cold_start"]["peak_rss_mb"] > 0
    assert result["hardware"]["threads"] >= 1 and result["hardware"]["versions"]["onnxruntime"]
    assert any(t.startswith("default / fastest peer") for t in result["targets"])
    assert result["concurrency"]["rows"][0]["clients"] == 1
    md = (tmp_path / "latest-quick.md").read_text()
    assert f"| {default} |" in md and "long passages" in md
    assert (tmp_path / "latest-quick.png").stat().st_size > 10_000


def test_gpu_check_fails_clearly_without_a_gpu(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    assert "no NVIDIA GPU" in proc.stderr


def test_flops_model():
    from benchmarks.hardware import bert_flops_per_token, peak_flops

    # all-MiniLM-L6-v2 at 32 tokens: 6 x (2 x (4 x 384^2 + 2 x 384 x 1536) + 4 x 32 x 384) flops
    assert bert_flops_per_token(384, 6, 1536, 32) == 6 * (2 * (4 * 384 * 384 + 2 * 384 * 1536) + 4 * 32 * 384)
    peak = peak_flops(2)
    assert peak["peak_int8_gops"] >= 2 * peak["peak_fp32_gflops"] > 0
