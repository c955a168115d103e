"""What the numbers were measured on: CPU, threads, versions, date; and the machine's peak throughput."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from importlib import metadata

# one spelling of the CPU and one reader of /proc/cpuinfo, shared with verify's records
from corom_runtime.machine import available_cpus, cpu_flags, cpu_model, cpuinfo_values


def cpu_mhz() -> float | None:
    try:
        values = [float(v) for v in cpuinfo_values("cpu MHz")]
    except ValueError:
        return None
    return max(values) if values else None


def peak_flops(threads: int) -> dict:
    """Peak fp32 and int8 operations per second for `threads` cores: an upper bound, assumptions stated.

    fp32: 2 FMA pipes x (vector width / 32) lanes x 2 flops per cycle per core. AVX-512 counts as
    512-bit where the CPU executes it natively; AMD Zen 4 executes it as two 256-bit halves, which is
    what "AMD" + avx512f means here. int8: VNNI does 4 multiply-adds per 32-bit lane (4x fp32).
    """
    flags = cpu_flags()
    mhz = cpu_mhz() or 2000.0
    amd = "AMD" in cpu_model()
    width = 512 if "avx512f" in flags and not amd else 256 if "avx2" in flags or "avx" in flags else 128
    fp32_per_cycle = 2 * (width // 32) * 2
    int8_factor = 4 if ("avx512_vnni" in flags or "avx_vnni" in flags) else 2
    ghz = mhz / 1000
    return {
        "clock_ghz_assumed": round(ghz, 3),
        "clock_source": "max 'cpu MHz' in /proc/cpuinfo (base clock on VMs; boost would be higher)",
        "vector_bits_assumed": width,
        "fp32_flops_per_cycle_per_core": fp32_per_cycle,
        "peak_fp32_gflops": round(threads * ghz * fp32_per_cycle, 1),
        "peak_int8_gops": round(threads * ghz * fp32_per_cycle * int8_factor, 1),
    }


def bert_flops_per_token(hidden: int, layers: int, intermediate: int, seq_len: float) -> float:
    """Multiply-adds x2 per token of a BERT encoder at sequence length `seq_len` (attention grows with it)."""
    dense = 2 * (4 * hidden * hidden + 2 * hidden * intermediate)  # QKV + attention out + FFN in/out
    attention = 2 * 2 * seq_len * hidden  # QK^T and attention x V
    return layers * (dense + attention)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("corom-onnx", "onnxruntime", "onnx", "torch", "transformers", "tokenizers", "optimum",
                 "optimum-onnx", "sentence-transformers", "openvino", "nncf", "ctranslate2", "fastembed", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def describe(threads: int) -> dict:
    return {
        "cpu": cpu_model(),
        "cpus_host": os.cpu_count(),
        "cpus_usable": available_cpus(),
        "threads": threads,
        "isa": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma"))),
        "peak": peak_flops(threads),
        "versions": versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
    }
