"""The exporter, as the runtime sees it: found through an entry point, never imported by name.

The lean runtime must stay free of torch and of the exporter, yet `Embedder.load("preset")` exports a
preset on first use and `corom export` / `corom verify` run it, where it is installed. So the exporter
registers itself (`[project.entry-points."corom_onnx.exporter"]` in pyproject) with a module that
offers `export_preset(name, out)`, `cli_export(args) -> int` and `cli_verify(args) -> int`; the runtime
asks for it here. Another exporter can register the same hooks.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from importlib.metadata import entry_points
from types import ModuleType

from corom_runtime.errors import CoromError

log = logging.getLogger(__name__)

GROUP = "corom_onnx.exporter"
EXPORT_HINT = ("the exporter is not installed: install the CPU torch first, then "
               "`pip install 'corom-onnx[export]'` (see README)")


@lru_cache(maxsize=1)
def find_exporter() -> ModuleType | None:
    """The registered exporter's hook module, or None where none is installed (or it cannot import:
    the exporter needs torch, transformers and onnx)."""
    for entry in entry_points(group=GROUP):
        try:
            return entry.load()
        except ImportError as exc:
            log.info("exporter %s is registered but cannot be imported (%s)", entry.value, exc)
    return None


def require_exporter() -> ModuleType:
    exporter = find_exporter()
    if exporter is None:
        raise CoromError(EXPORT_HINT)
    return exporter
