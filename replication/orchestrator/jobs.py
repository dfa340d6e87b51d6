"""Jobs: each step the orchestrator runs is a row in the store, with progress.

A job is created ``running`` with the pid (and the kernel's start time of that pid,
so a recycled pid is not mistaken for it) of the process that runs it. It ends
``succeeded`` or ``failed`` (with the error's stable code). If the process dies
(kill -9, power cut) the row stays ``running``; the next orchestrator that opens
the store marks it ``interrupted`` (:func:`mark_interrupted`): re-running the step
continues it, because every agent call a step makes is idempotent.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..errors import ReplicationError
from .model import Job
from .store import Store

__all__ = ["JobRun", "is_alive", "mark_interrupted", "process_start", "run_job"]

#: shortest time between two progress writes to the store
PROGRESS_EVERY = 0.5

ProgressFn = Callable[[Job], None]


def process_start(pid: int) -> str:
    """The start time of ``pid`` in clock ticks since boot (``/proc/PID/stat``), or ""."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return ""
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    rest = stat.rsplit(b")", 1)[-1].split()
    return rest[19].decode() if len(rest) > 19 else ""


def is_alive(pid: int, start: str) -> bool:
    """Whether the process that ran a job is still that process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return not start or process_start(pid) == start


def mark_interrupted(store: Store) -> list[Job]:
    """Mark every job whose process is gone ``interrupted``; return them."""
    marked = []
    for job, start in store.running_jobs():
        if not is_alive(job.pid, start):
            marked.append(
                store.update_job(
                    job.id,
                    state="interrupted",
                    message=f"the orchestrator process {job.pid} ended while the job ran; "
                    f"run {job.kind} again to continue",
                )
            )
    return marked


class JobRun:
    """The running side of one job: progress, messages, and its end."""

    def __init__(self, store: Store, job: Job, on_progress: ProgressFn | None) -> None:
        self.store = store
        self.job = job
        self._on_progress = on_progress
        self._written = 0.0

    @property
    def id(self) -> str:
        return self.job.id

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Record progress (0..1); written to the store at most every PROGRESS_EVERY s."""
        fraction = min(1.0, max(0.0, fraction))
        changed = message is not None and message != self.job.message
        now = time.monotonic()
        if changed or now - self._written >= PROGRESS_EVERY:
            changes: dict[str, Any] = {"progress": fraction}
            if message is not None:
                changes["message"] = message
            self.job = self.store.update_job(self.id, **changes)
            self._written = now
        if self._on_progress is not None:
            self._on_progress(self.job)

    def note(self, message: str) -> None:
        self.progress(self.job.progress, message)

    def result(self, **values: Any) -> None:
        """Merge ``values`` into the job's result (kept even if the job then fails)."""
        self.job = self.store.update_job(self.id, result={**self.job.result, **values})

    def succeed(self, message: str) -> Job:
        self.job = self.store.update_job(self.id, state="succeeded", progress=1.0, message=message)
        return self.job

    def fail(self, err: BaseException) -> Job:
        code = err.code if isinstance(err, ReplicationError) else "replication.error"
        text = err.message if isinstance(err, ReplicationError) else f"{type(err).__name__}: {err}"
        self.job = self.store.update_job(
            self.id, state="failed", error_code=code, error_message=text, message="failed"
        )
        return self.job


@contextlib.contextmanager
def run_job(
    store: Store, kind: str, target: str, vms: Iterable[str], on_progress: ProgressFn | None
) -> Iterator[JobRun]:
    """Record a job around a block: failed with the error's code if the block raises.

    A KeyboardInterrupt or SystemExit leaves the job ``interrupted`` (re-run the
    step); a kill -9 leaves it ``running`` until :func:`mark_interrupted` sees it.
    """
    pid = os.getpid()
    job = store.create_job(kind, target, vms, pid, process_start(pid), is_alive)
    run = JobRun(store, job, on_progress)
    try:
        yield run
    except (KeyboardInterrupt, SystemExit):
        store.update_job(run.id, state="interrupted", message="interrupted; run it again")
        raise
    except BaseException as err:
        run.fail(err)
        if isinstance(err, ReplicationError):
            err.job_id = run.id  # type: ignore[attr-defined]
        raise
    if run.job.state == "running":
        run.succeed("done")
