"""Progress of long loops as log lines."""

from __future__ import annotations

import logging
import math
import time


class ProgressLog:
    """Progress of a long loop as log lines: "<what> done/total (percent), rate/s, ETA", at most one line per
    ``every`` seconds and always one at the end. Log lines, not a terminal bar: the workflow keeps stderr in
    each job's log file, where a long job is otherwise silent."""

    def __init__(self, logger: logging.Logger, what: str, total: int, every: float = 30.0):
        self.logger, self.what, self.total, self.every = logger, what, total, every
        self.done = 0
        self.started = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more items done; log a line when ``every`` seconds have passed or all are done."""
        self.done += n
        now = time.monotonic()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.started, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        self.logger.info("%s %d/%d (%.0f%%), %.1f/s, ETA %s", self.what, self.done, self.total,
                         100 * self.done / max(self.total, 1), rate, format_duration(eta))


def format_duration(seconds: float) -> str:
    """``seconds`` as H:MM:SS (``?`` when not finite)."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
