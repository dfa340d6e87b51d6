"""Stage ``delta``: ``replication sync`` against rsync and a full copy, 1 % and 10 % changed.

For each changed image B (B1: 1 % of the 64 KiB blocks rewritten with random
bytes, B10: 10 %), a target holding A is brought level with B by:

* ``replication sync --verify --json B T``, the CLI as users run it (a subprocess:
  interpreter start-up included). ``--verify`` hashes both images, as rsync reads
  both; bytes are the report's ``bytes_wire`` (frames plus the target's hash map);
* ``rsync --inplace --no-whole-file -I --stats B rsync://127.0.0.1:PORT/m/T2``
  through an rsync daemon on loopback, plain and with ``--compress``; bytes are
  rsync's "Total bytes sent" plus "received" (its block checksums come back);
* ``qemu-img convert -n`` of B over T: a full copy, every byte of B.

Before each timed command the target is put back to A (an untimed in-process
sync that writes the changed blocks only) and the images are warmed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import ReplicationError
from ..launch import agent_command
from ..sync import SyncOptions, sync_paths
from .context import Context, median
from .figures import Figure, Target

__all__ = ["run"]

TIME_VS_RSYNC = Target("ratio", "<=", 0.5, "perf-limits.md goal 6: resync <= 0.5 x rsync")
TIME_VS_COPY = Target("ratio", "<=", 1.0, "a delta sync must not be slower than a full copy")
BYTES_VS_RSYNC = Target("ratio", "<=", 1.05, "perf-limits.md goal 6: bytes <= 1.05 x rsync")
RSYNC = ["rsync", "--inplace", "--no-whole-file", "-I", "--stats"]
CASES = ("sync", "rsync", "rsync-z", "qemu-img")


def run(ctx: Context) -> tuple[list[Figure], dict[str, object]]:
    """Measure every case on B1 and B10; return the figures and the raw rounds."""
    figures: list[Figure] = []
    details: dict[str, object] = {}
    with _rsync_daemon(ctx) as url:
        for image, label in (("B1", "1%"), ("B10", "10%")):
            rounds = _measure(ctx, ctx.image(image), url)
            figures += _figures(ctx, label, rounds)
            details[label] = rounds
    return figures, details


def _measure(ctx: Context, b: Path, url: str | None) -> dict[str, dict[str, list]]:
    """Run every available case ``rounds`` times; return seconds and bytes per case."""
    a = ctx.image("A")
    t = ctx.work / "T.raw"
    t2 = ctx.work / "rsync" / "T2.raw"
    for target in (t, t2):
        if not target.exists():
            subprocess.run(["cp", "--sparse=always", str(a), str(target)], check=True)
    commands = {
        "sync": agent_command("sync", "--verify", "--json", str(b), str(t)),
        "rsync": [*RSYNC, str(b), f"{url}/T2.raw"],
        "rsync-z": [*RSYNC, "--compress", str(b), f"{url}/T2.raw"],
        "qemu-img": ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(b), str(t)],
    }
    out: dict[str, dict[str, list]] = {k: {"seconds": [], "bytes": []} for k in CASES}
    for r in range(ctx.config.rounds):
        ctx.say(f"delta {b.stem} round {r + 1}/{ctx.config.rounds}")
        for case, cmd in commands.items():
            if (url is None and case.startswith("rsync")) or not _have(ctx, cmd[0]):
                continue
            target = t2 if case.startswith("rsync") else t
            sync_paths(str(a), str(target), SyncOptions(use_map_cache=False))
            ctx.warm(b, target)
            seconds, text = _timed(cmd, ctx.env())
            out[case]["seconds"].append(seconds)
            out[case]["bytes"].append(_bytes_moved(case, text, b))
    return out


def _have(ctx: Context, program: str) -> bool:
    return program not in ctx.tools or ctx.tools[program] is not None


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise ReplicationError(
            f"bench: {' '.join(cmd[:4])} ... failed ({proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()[-300:]}"
        )
    return seconds, proc.stdout


def _bytes_moved(case: str, text: str, b: Path) -> int:
    if case == "sync":
        return int(json.loads(text)["bytes_wire"])
    if case == "qemu-img":
        return b.stat().st_size  # a full copy moves every byte
    return _rsync_stat(text, "Total bytes sent:") + _rsync_stat(text, "Total bytes received:")


def _rsync_stat(stats: str, label: str) -> int:
    for line in stats.splitlines():
        if line.startswith(label):
            return int(line.split(":")[1].strip().replace(",", ""))
    raise ReplicationError(f"bench: rsync --stats printed no {label!r}")


def _figures(ctx: Context, label: str, rounds: dict[str, dict[str, list]]) -> list[Figure]:
    sec = {k: median(v["seconds"]) for k, v in rounds.items()}
    nbytes = {k: median(v["bytes"]) for k, v in rounds.items()}
    miss = {k: None if sec[k] is not None else _tool_of(k) for k in CASES}
    name = f"sync {label} changed"
    return [
        Figure("delta", f"{name}: time", "s", sec["sync"], sec["rsync"], "rsync daemon",
               TIME_VS_RSYNC, miss["rsync"]),
        Figure("delta", f"{name}: time", "s", sec["sync"], sec["rsync-z"],
               "rsync daemon --compress", TIME_VS_RSYNC, miss["rsync-z"]),
        Figure("delta", f"{name}: time", "s", sec["sync"], sec["qemu-img"],
               "qemu-img convert -n (full copy)", TIME_VS_COPY, miss["qemu-img"]),
        Figure("delta", f"{name}: bytes", "B", nbytes["sync"], nbytes["rsync"],
               "rsync daemon (both ways)", BYTES_VS_RSYNC, miss["rsync"]),
        Figure("delta", f"{name}: bytes", "B", nbytes["sync"], nbytes["rsync-z"],
               "rsync --compress (both ways)", BYTES_VS_RSYNC, miss["rsync-z"]),
    ]  # fmt: skip


def _tool_of(case: str) -> str:
    return "qemu-img" if case == "qemu-img" else "rsync"


@contextlib.contextmanager
def _rsync_daemon(ctx: Context) -> Iterator[str | None]:
    """Run ``rsync --daemon`` on 127.0.0.1 with a module ``m``; yield its URL (None: no rsync)."""
    if ctx.tools["rsync"] is None:
        yield None
        return
    root = ctx.work / "rsync"
    root.mkdir(exist_ok=True)
    conf = ctx.work / "rsyncd.conf"
    ids = "uid = root\ngid = root\n" if os.getuid() == 0 else ""
    conf.write_text(f"use chroot = no\n[m]\npath = {root}\nread only = no\n{ids}")
    port = _free_port()
    argv = ["rsync", "--daemon", "--no-detach", f"--port={port}", f"--config={conf}"]
    log = ctx.work / "rsyncd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*argv, "--address=127.0.0.1"], stdout=out, stderr=out)
    try:
        _wait_port(proc, port, log)
        yield f"rsync://127.0.0.1:{port}/m"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(proc: subprocess.Popen, port: int, log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = log.read_text(errors="replace").strip()[-300:]
            raise ReplicationError(f"bench: rsync --daemon exited: {err}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise ReplicationError(f"bench: rsync --daemon did not listen on port {port}")
