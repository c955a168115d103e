"""Where artifacts and engine caches live: `$COROM_CACHE_DIR` (or `corom --cache-dir`), else
`~/.cache/corom-onnx`; artifacts under `artifacts/NAME`. And the inter-process lock around work
done into the cache (export on first use, the load-time CPU check)."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from corom_runtime.errors import CoromError

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """The user cache: `$COROM_CACHE_DIR`, else `~/.cache/corom-onnx` (OpenVINO/TensorRT caches live here too)."""
    env = os.environ.get("COROM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "corom-onnx"


@contextmanager
def cache_lock(name: str, timeout: float = 3600.0) -> Iterator[None]:
    """An inter-process lock in the user cache (export on first use, the load-time CPU check), so two
    processes never do the same work into the same place. A cache we cannot write to has no lock:
    the work is then done without one (and not cached). A lock held by another process past `timeout`
    is an error, never a licence to go on without it."""
    from filelock import FileLock, Timeout

    folder = cache_root() / "locks"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder / f"{name}.lock"), timeout=timeout)
        lock.acquire()
    except Timeout as exc:  # an OSError too: caught first, it means another process holds the lock
        raise CoromError(f"waited {timeout:.0f}s for the lock {exc.lock_file} (another corom process is "
                         f"working on {name}): try again when it is done, or remove the lock file if no "
                         "corom process is running") from exc
    except OSError as exc:
        log.info("no lock for %s in %s (%s): going on without one", name, folder, exc)
        yield
        return
    try:
        yield
    finally:
        lock.release()


def artifact_dir(name: str) -> Path:
    """Where `corom export NAME` writes, and where `Embedder.load(NAME)` looks."""
    return cache_root() / "artifacts" / name


def build_dir(name: str) -> Path:
    """A clone's `models/build/NAME` (where `make demo` and the benchmarks export)."""
    return Path(__file__).resolve().parents[3] / "models" / "build" / name
