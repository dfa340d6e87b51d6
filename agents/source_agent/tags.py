"""Tagged cuts on a source agent: app-consistent tags and multi-VM group cuts.

A tag is a cut of an epoch at a chosen moment, carried to the master target in the
epoch's end marker, where it becomes a recovery point. ``app`` tags run the
configured pre-hook first (e.g. ``fsfreeze --freeze``, or an application's own
quiesce command) and the post-hook after; the cut happens in between, so the point
holds what the application made durable. A group cut is two phases so that many
agents cut at one moment (control.proto): ``prepare`` holds new writes on the
disks (a timer releases them if ``commit`` never comes), ``commit`` cuts and
releases.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import threading
import time
from dataclasses import dataclass, field

from replication import wire
from replication.errors import ReplicationError, TagFailedError, UsageError

from .pairs import PairTable

log = logging.getLogger("source-agent")

#: how long a prepared cut may hold writes without its commit (default)
DEFAULT_HOLD_TIMEOUT = 30.0
#: how long a commit waits for the pair workers to make their cuts
CUT_TIMEOUT = 60.0


@dataclass
class _Prepared:
    spec: wire.TagSpec
    disks: list[str]
    since: float
    timer: threading.Timer | None = None
    released: threading.Event = field(default_factory=threading.Event)


class CutCoordinator:
    """Makes tagged cuts on the tracked disks of one source agent."""

    def __init__(
        self,
        pairs: PairTable,
        *,
        pre_hook: str | None = None,
        post_hook: str | None = None,
        hook_timeout: float = 60.0,
    ) -> None:
        self._pairs = pairs
        self._pre = shlex.split(pre_hook) if pre_hook else None
        self._post = shlex.split(post_hook) if post_hook else None
        self._hook_timeout = hook_timeout
        self._prepared: dict[str, _Prepared] = {}
        self._lock = threading.Lock()

    def tag(self, spec: wire.TagSpec) -> tuple[list[str], float]:
        """Prepare and commit at once (one agent)."""
        self.prepare(spec)
        return self.commit(spec)

    def prepare(self, spec: wire.TagSpec) -> tuple[list[str], float]:
        """Pre-hook, then hold new writes on the disks until commit (or the timeout)."""
        _check(spec)
        disks = list(spec.disks) or self._pairs.tracked_disks()
        if not disks:
            raise TagFailedError("this source agent tracks no disk (start it with --state-dir)")
        lives = [self._pairs.live(d) for d in disks]
        key = _key(spec)
        with self._lock:
            if key in self._prepared:
                raise TagFailedError(f"a cut named {key!r} is already prepared")
        if spec.kind == "app":
            self._run_hook(self._pre, "pre", spec, disks)
        for live in lives:
            live.hold_writes()
        prepared = _Prepared(spec, disks, time.monotonic())
        timeout = spec.timeout_seconds or DEFAULT_HOLD_TIMEOUT
        prepared.timer = threading.Timer(timeout, self._expire, args=(key,))
        prepared.timer.daemon = True
        with self._lock:
            self._prepared[key] = prepared
        prepared.timer.start()
        log.info("event=cut_prepared name=%s group=%s disks=%s", spec.name, spec.group, disks)
        return disks, 0.0

    def commit(self, spec: wire.TagSpec) -> tuple[list[str], float]:
        """Cut the tagged epoch on every prepared disk, release the writes, post-hook."""
        with self._lock:
            prepared = self._prepared.pop(_key(spec), None)
        if prepared is None or prepared.released.is_set():
            raise TagFailedError(
                f"no prepared cut named {_key(spec)!r} (never prepared, or its hold timed out)"
            )
        prepared.timer.cancel()
        tag = {"kind": spec.kind, "name": spec.name, "group": spec.group}
        cut = False
        try:
            events = [self._pairs.request_cut(d, tag) for d in prepared.disks]
            deadline = time.monotonic() + CUT_TIMEOUT
            for disk, done in zip(prepared.disks, events, strict=True):
                if not done.wait(max(0.0, deadline - time.monotonic())):
                    raise TagFailedError(f"disk {disk!r} did not cut within {CUT_TIMEOUT} s")
            cut = True
        finally:
            held = self._release(prepared)
            if spec.kind == "app":
                # the application was quiesced by the pre-hook: thaw it whatever happened
                self._run_hook(self._post, "post", spec, prepared.disks, quiet=not cut)
        log.info("event=cut name=%s group=%s held=%.3f", spec.name, spec.group, held)
        return prepared.disks, held

    def _release(self, prepared: _Prepared) -> float:
        if not prepared.released.is_set():
            prepared.released.set()
            for disk in prepared.disks:
                self._pairs.live(disk).release_writes()
        return time.monotonic() - prepared.since

    def _expire(self, key: str) -> None:
        with self._lock:
            prepared = self._prepared.pop(key, None)
        if prepared is not None:
            held = self._release(prepared)
            log.warning("event=cut_expired name=%s held=%.1f: writes released, no cut", key, held)
            if prepared.spec.kind == "app":
                self._run_hook(self._post, "post", prepared.spec, prepared.disks, quiet=True)

    def schedule_app_tags(self, interval: float, stop: threading.Event) -> threading.Thread:
        """Tag every tracked disk app-consistent every ``interval`` seconds (the scenario's
        policy: hourly), with the hooks; a failed tag is logged and retried next time."""

        def loop() -> None:
            n = 0
            while not stop.wait(interval):
                n += 1
                try:
                    self.tag(wire.TagSpec("app", f"scheduled-{int(time.time())}-{n}"))
                except ReplicationError as err:
                    log.warning("event=scheduled_tag_failed code=%s error=%s", err.code, err)

        thread = threading.Thread(target=loop, name="app-tags", daemon=True)
        thread.start()
        return thread

    def release_all(self) -> None:
        with self._lock:
            prepared, self._prepared = list(self._prepared.values()), {}
        for p in prepared:
            if p.timer:
                p.timer.cancel()
            self._release(p)

    def _run_hook(self, argv, which, spec, disks, *, quiet: bool = False) -> None:
        if not argv:
            return
        env = dict(os.environ, REPLICATION_TAG=spec.name, REPLICATION_DISKS=",".join(disks))
        try:
            done = subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=self._hook_timeout
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            if quiet:
                log.warning("event=hook_failed which=%s error=%s", which, err)
                return
            raise TagFailedError(f"{which}-hook {argv[0]!r} failed: {err}") from None
        if done.returncode != 0 and not quiet:
            raise TagFailedError(
                f"{which}-hook {argv[0]!r} exited {done.returncode}: {done.stderr.strip()[:200]}"
            )
        log.info("event=hook which=%s rc=%d tag=%s", which, done.returncode, spec.name)


def _key(spec: wire.TagSpec) -> str:
    return spec.group or spec.name


def _check(spec: wire.TagSpec) -> None:
    if spec.kind not in ("app", "crash"):
        raise UsageError(f"tag kind must be 'app' or 'crash', not {spec.kind!r}")
    if not spec.name or len(spec.name) > 128:
        raise UsageError("a tag needs a name of 1..128 characters")
