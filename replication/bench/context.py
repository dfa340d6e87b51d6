"""What every stage shares: the settings, the work directory, images, tools, timing.

Images are made on first use and kept for the whole run, so stages that need the
same pair (``scan`` and ``delta`` both use A and B1) do not write it twice. Every
timed command starts from the same state (:meth:`Context.warm`): the images it
reads are in the page cache (read once with ``cat``) and no writeback is in
flight (``sync(2)``), so neither the tool measured nor its baseline pays for the
other's dirty pages.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .images import make_vhd, mutate_image, write_image

__all__ = ["BenchConfig", "Context", "median"]

#: external baselines; a missing one is reported as missing, never replaced
TOOLS = ("rsync", "xxh128sum", "qemu-img")
#: fraction of blocks rewritten in each changed image, by image name
CHANGED = {"B1": 0.01, "B10": 0.10}


@dataclass(frozen=True)
class BenchConfig:
    """Settings of one ``replication bench`` run."""

    size: int
    rounds: int = 3
    stages: tuple[str, ...] = ()
    work_dir: Path | None = None
    seed: int = 7
    #: seconds to wait for a quiet machine before each timed command (0: do not wait)
    quiet_wait: float = 20.0


@dataclass
class Context:
    """The state shared by the stages of one run."""

    config: BenchConfig
    work: Path
    tools: dict[str, str | None] = field(default_factory=dict)
    cache: dict[str, object] = field(default_factory=dict)
    #: busy cores seen (all processes) right before each timed command
    background: list[float] = field(default_factory=list)
    say: Callable[[str], None] = lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True)

    @classmethod
    def create(cls, config: BenchConfig, work: Path, **kw) -> Context:
        """Return a context working in ``work`` (created), with the tools looked up."""
        work.mkdir(parents=True, exist_ok=True)
        return cls(config, work, {t: shutil.which(t) for t in TOOLS}, **kw)

    @property
    def size(self) -> int:
        return self.config.size

    def image(self, name: str) -> Path:
        """Return image ``name`` ("A", "B1", "B10", "A.vhd"), making it on first use."""
        path = self.work / (name if "." in name else f"{name}.raw")
        if not path.exists():
            self._make(name, path)
        return path

    def _make(self, name: str, path: Path) -> None:
        if name == "A":
            self.say(f"writing image A ({self.size >> 20} MiB, seed {self.config.seed})")
            write_image(str(path), self.size, seed=self.config.seed)
        elif name in CHANGED:
            mutate_image(str(self.image("A")), str(path), CHANGED[name])
        elif name == "A.vhd":
            make_vhd(str(self.image("A")), str(path))
        else:
            raise KeyError(name)

    def warm(self, *paths: Path) -> None:
        """Read ``paths`` into the page cache, flush dirty pages (sync), wait for quiet."""
        subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
        os.sync()
        self.wait_quiet()

    def wait_quiet(self, limit: float = 0.25) -> float:
        """Wait (bounded) until other processes use < ``limit`` cores; return that load.

        The machine may be shared: a timed command that competes with someone
        else's job measures the job. After ``config.quiet_wait`` s the command
        runs anyway, and while the machine stays busy later waits are short (a
        long wait did not help); the load each command ran beside is in the
        report (``background_cores``).
        """
        wait = self.config.quiet_wait
        if self.background and self.background[-1] > limit:
            wait = min(wait, 2.0)
        deadline = time.monotonic() + wait
        load = busy_cores(0.2)
        while load > limit and time.monotonic() < deadline:
            load = busy_cores()
        self.background.append(round(load, 2))
        return load

    def env(self) -> dict[str, str]:
        """Return the environment for ``replication`` children: a private map cache."""
        return dict(os.environ, REPLICATION_CACHE_DIR=str(self.work / "map-cache"))


def median(values: list[float]) -> float | None:
    """Return the median of ``values``, or None for an empty list."""
    return statistics.median(values) if values else None


def busy_cores(interval: float = 0.3) -> float:
    """Return how many cores were busy (all processes) over ``interval`` seconds."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    busy0, total0 = sample()
    time.sleep(interval)
    busy1, total1 = sample()
    cores = os.cpu_count() or 1
    return cores * (busy1 - busy0) / max(1, total1 - total0)
