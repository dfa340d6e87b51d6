"""The stage registry and the run of a whole benchmark.

A stage is a function ``run(ctx) -> (figures, details)``. A stage that a later
issue will provide is registered without a function: the report lists it as "not
yet available" rather than leaving it out or inventing numbers. Adding one is one
line here plus its module.

A stage that raises a :class:`ReplicationError` (a result that fails its check, an
agent that did not start), an ``OSError`` or a failed subprocess is reported as
``failed`` with the error, and the other stages still run: a failure is never
turned into a number, and one broken stage does not hide the others' figures.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ReplicationError
from . import delta, failback, fanin, memory, replicate, rpo, scan
from .context import BenchConfig, Context
from .figures import Figure

__all__ = ["STAGES", "BenchResult", "Stage", "StageResult", "run_bench", "select_stages"]

StageFn = Callable[[Context], tuple[list[Figure], dict[str, object]]]


@dataclass(frozen=True)
class Stage:
    """A named part of the benchmark; ``run`` is None until it exists."""

    name: str
    title: str
    run: StageFn | None


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("scan", "hash maps of two images vs xxh128sum", scan.run),
        Stage("delta", "delta sync (1 % / 10 % changed) vs rsync and a full copy", delta.run),
        Stage("replicate", "e2e source -> PS -> MT vs a bare gRPC TLS relay", replicate.run),
        Stage("memory", "peak RSS of each agent during the resync", memory.run),
        Stage("rpo", "recovery point objective under a live write load", rpo.run),
        Stage(
            "failback",
            "reprotect of a disk changed 1 % since failover vs a full copy",
            failback.run,
        ),
        Stage("fan-in", "many sources into one process server", fanin.run),
    )
}


@dataclass
class StageResult:
    """What one stage produced (or why it did not run)."""

    name: str
    title: str
    status: str  # "ran" | "failed" | "not yet available" | "not selected"
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, object] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class BenchResult:
    """A whole run: settings, machine, tools, and every stage."""

    config: BenchConfig
    date: str
    machine: dict[str, object]
    tools: dict[str, str | None]
    stages: list[StageResult]
    background_cores: list[float]
    kept: Path | None = None  # the work directory, when it was kept

    @property
    def figures(self) -> list[Figure]:
        return [f for s in self.stages for f in s.figures]

    @property
    def failed(self) -> list[StageResult]:
        return [s for s in self.stages if s.status == "failed"]


def select_stages(only: str | None) -> tuple[str, ...]:
    """Return the stage names ``--only`` asks for (all by default); raise on unknown names."""
    from ..errors import UsageError

    if not only:
        return tuple(n for n, s in STAGES.items() if s.run is not None)
    names = tuple(dict.fromkeys(n.strip() for n in only.split(",") if n.strip()))
    unknown = [n for n in names if n not in STAGES]
    if unknown or not names:
        raise UsageError(
            f"unknown stage {', '.join(unknown) or repr(only)}: choose from {', '.join(STAGES)}"
        )
    return names


def run_bench(config: BenchConfig, *, keep: bool = False, say=None) -> BenchResult:
    """Run the selected stages in registry order in a work directory; return everything."""
    if config.work_dir is not None:
        config.work_dir.mkdir(parents=True, exist_ok=True)
    # a directory of our own, even inside --work-dir: removing it removes only our files
    work = Path(tempfile.mkdtemp(prefix="replication-bench-", dir=config.work_dir))
    extra = {"say": say} if say else {}
    ctx = Context.create(config, work, **extra)
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    try:
        results = [_run_stage(ctx, stage) for stage in STAGES.values()]
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return BenchResult(
        config,
        date,
        machine_info(),
        tool_versions(ctx.tools),
        results,
        ctx.background,
        work if keep else None,
    )


def _run_stage(ctx: Context, stage: Stage) -> StageResult:
    if stage.run is None:
        return StageResult(stage.name, stage.title, "not yet available")
    if stage.name not in ctx.config.stages:
        return StageResult(stage.name, stage.title, "not selected")
    started = time.monotonic()
    try:
        figures, details = stage.run(ctx)
    except (ReplicationError, OSError, subprocess.SubprocessError) as err:
        ctx.say(f"{stage.name} failed: {err}")
        error = {"error": str(err), "code": getattr(err, "code", type(err).__name__)}
        return StageResult(stage.name, stage.title, "failed", [], error, time.monotonic() - started)
    return StageResult(stage.name, stage.title, "ran", figures, details, time.monotonic() - started)


def machine_info() -> dict[str, object]:
    """Return what the figures depend on: CPU model, cores, memory, kernel, Python."""
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def tool_versions(tools: dict[str, str | None]) -> dict[str, str | None]:
    """Return each baseline tool's first ``--version`` line, or None when it is missing."""
    out: dict[str, str | None] = {}
    for name, path in tools.items():
        if path is None:
            out[name] = None
            continue
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
        text = (proc.stdout or proc.stderr).strip()
        out[name] = text.splitlines()[0] if text else "unknown version"
    return out
