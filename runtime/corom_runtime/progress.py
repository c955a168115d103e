"""The one progress bar: tqdm where it is installed and wanted, else log lines (tqdm is optional in
the lean runtime)."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)


class LogProgress:
    """What runs instead of a bar: a log line per update at INFO where `enabled`, else nothing."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = False) -> None:
        self.total, self.n, self.enabled = total, initial, enabled

    def update(self, n: int) -> None:
        self.n += n
        if self.enabled:
            log.info("embedded %d/%d", self.n, self.total)

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int = 0, enabled: bool | None = None):
    """A bar over `total` texts with `update(n)` and `close()`. enabled=None: only when stderr is a terminal."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return LogProgress(total, initial)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return LogProgress(total, initial, enabled=True)
    return tqdm(total=total, initial=initial, unit="text", unit_scale=True, desc="embedding", smoothing=0.05)
