"""One system's cold start in a fresh process: import, load, first embedding; and its peak RSS.

Run as `python -m benchmarks.coldstart SYSTEM ARTIFACT FOLDER THREADS`; prints one JSON line.
The parent measures the wall time from spawning the process to that line.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def main() -> None:
    name, artifact, folder, threads = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    start = time.perf_counter()
    if name.startswith("corom-"):
        from corom_runtime import Embedder  # the lean path only: no benchmark helpers, no torch

        emb = Embedder.load(artifact, variant=name.split("-", 1)[1], device="cpu", threads=threads, warmup=False)
        vec = emb.encode(["how long it take to get a master degree"])
    else:
        from benchmarks.systems import all_systems

        system = next(s for s in all_systems(folder, artifact, threads, quick=False, bf16_ok=True) if s.name == name)
        vec = system.build()(["how long it take to get a master degree"], 1)
    first = time.perf_counter() - start
    assert vec.shape[-1] > 0
    print(json.dumps({"in_process_s": first, "peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """VmHWM of this process. Not ru_maxrss: Linux carries the forking parent's peak across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
