"""What the server benchmarks share: a real `corom serve` process on loopback, and where results go."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from .run import ROOT


def start_server(serve_args: list[str], port: int, settled: bool = False) -> tuple[subprocess.Popen, str]:
    """`corom serve ARGS --port PORT` in its own process; returns it and its URL once /health answers
    (`settled`: and its shape buckets are compiled, so what is measured next is the steady state)."""
    proc = subprocess.Popen([sys.executable, "-m", "corom_runtime.cli", "serve", *serve_args, "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # a cold model cache and 80 bucket compiles on a slow CPU
    while time.time() < deadline and proc.poll() is None:
        try:
            health = httpx.get(url + "/health")
            if health.status_code == 200 and not (settled and health.json().get("warming")):
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return proc, url


def write_result(out: Path, kind: str, result: dict, summary: str) -> Path:
    """`KIND-STAMP.json` (the whole record) and `latest-KIND.md` (the one-line summary) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"{kind}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2))
    (out / f"latest-{kind}.md").write_text(summary)
    print(summary)
    return path
