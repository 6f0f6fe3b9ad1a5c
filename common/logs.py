"""Logging for every Fanout process: one line per event on standard error.

supervisord (or systemd's journal) captures standard error into one file per
process, so ``supervisorctl tail -f fanout-http`` shows that process's lines.
"""

import logging
import os
import sys
import time


def setup(level: str = "INFO") -> None:
    """Send log lines to standard error, each stamped with the pid."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Client libraries log every reconnect attempt at error; our own lines
    # say the same once per outage.
    logging.getLogger("nats").setLevel(logging.CRITICAL)
    logging.getLogger("websockets").setLevel(logging.WARNING)


class RateLimited:
    """Log at most ``burst`` lines per ``interval`` seconds, then count.

    Used for refused client messages: a flood of bad input must not flood
    the log. When a quiet interval follows a suppressed burst, one line says
    how many were left out.
    """

    def __init__(
        self,
        logger: logging.Logger,
        burst: int = 10,
        interval: float = 10.0,  # seconds
        clock=time.monotonic,
    ):
        self.logger = logger
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self._window_start = clock()
        self._count = 0
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = self.clock()
        if now - self._window_start >= self.interval:
            if self._suppressed:
                self.logger.warning(
                    "%d more refusals not logged in the last %.0f s",
                    self._suppressed,
                    now - self._window_start,
                )
            self._window_start = now
            self._count = 0
            self._suppressed = 0
        if self._count < self.burst:
            self._count += 1
            self.logger.warning(msg, *args)
        else:
            self._suppressed += 1


def process_label() -> str:
    """The supervisord program name of this process, or its pid."""
    return os.environ.get("SUPERVISOR_PROCESS_NAME") or f"pid{os.getpid()}"
