"""Structured logs: one line per event, ``key=value`` pairs, never a secret."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys

__all__ = ["setup_logging"]


def setup_logging(component: str, level: str | None = None) -> logging.Logger:
    """Send ``component=<name> level=... msg=...`` lines to stderr; return its logger.

    The level comes from ``level``, else ``$REPLICATION_LOG_LEVEL``, else INFO.
    """
    level = level or os.environ.get("REPLICATION_LOG_LEVEL", "INFO")
    # `kill -USR1 PID` dumps every thread's stack to stderr: how to see a stuck agent
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"ts=%(asctime)s component={component} level=%(levelname)s logger=%(name)s "
            "msg=%(message)s"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return logging.getLogger(component)
