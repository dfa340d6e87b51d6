"""Progress bars on a terminal (tqdm), nothing when output is piped."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

__all__ = ["TerminalProgress"]


class TerminalProgress:
    """A progress factory: ``progress(stage, total)`` returns a thread-safe ``tick(n)``.

    Bars go to stderr and only when stderr is a terminal, so ``--json`` output and
    logs stay clean. Use as a context manager to close the bars.
    """

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bars: list[object] = []
        self._lock = threading.Lock()

    def __call__(self, stage: str, total: int) -> Callable[[int], None]:
        if not self.enabled:
            return _ignore
        from tqdm import tqdm

        bar = tqdm(
            total=total,
            desc=stage,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            leave=False,
        )
        self._bars.append(bar)

        def tick(n: int) -> None:
            with self._lock:
                bar.update(n)

        return tick

    def __enter__(self) -> TerminalProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for bar in self._bars:
            bar.close()  # type: ignore[attr-defined]


def _ignore(n: int) -> None:
    return None
