"""This machine's CPU: its model name, the instruction sets kernels care about, and how many CPUs
this process may really use: affinity mask and cgroup CPU quota, not the host's count.

In a container limited to 2 CPUs on a 64-core host, `os.cpu_count()` says 64; running 64 intra-op
threads on 2 CPUs thrashes. ONNX Runtime's own default has the same problem.
"""

from __future__ import annotations

import math
import os
import platform
from functools import lru_cache
from pathlib import Path


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1_quota, v1_period = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if v1_quota.is_file() and v1_period.is_file():
            quota_us = int(v1_quota.read_text())
            return None if quota_us <= 0 else quota_us / int(v1_period.read_text())
    except (OSError, ValueError):
        return None
    return None


def available_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs usable by this process: min(affinity mask, ceil(cgroup quota)), at least 1.

    >>> available_cpus() >= 1
    True
    """
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def cpuinfo_values(*keys: str) -> list[str]:
    """The values of /proc/cpuinfo lines whose key starts with one of `keys`, in file order
    ([] where there is no /proc/cpuinfo). The one reader of that file."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    return [line.split(":", 1)[1].strip() for line in lines if line.startswith(keys) and ":" in line]


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (as benchmark records and verify's speed entries spell it)."""
    names = cpuinfo_values("model name")
    return names[0] if names else platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """Every instruction-set flag the CPU reports (x86 "flags", Arm "Features")."""
    flags = cpuinfo_values("flags", "Features")
    return frozenset(flags[0].split()) if flags else frozenset()


# instruction-set flags that change which kernels an engine runs (and so its numerics)
_ISA_PREFIXES = ("avx", "amx", "fma", "f16c", "sse4", "vnni", "neon", "asimd", "sve", "bf16", "i8mm", "fp16")


def cpu_isa() -> tuple[str, ...]:
    """This CPU's instruction-set flags that matter to kernels (sorted; empty where unknown)."""
    return tuple(sorted(f for f in cpu_flags() if f.startswith(_ISA_PREFIXES)))
