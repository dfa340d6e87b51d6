"""Stage ``rpo``: the recovery point objective of a tracked disk under a steady write load.

Three agents on loopback with mutual TLS, as in stage ``replicate``, but the source
agent runs as a daemon on a *tracked* disk (``--state-dir``, ``--nbd-listen``): a
copy of image A, replicated to an empty VMDK volume (the master target keeps its
undo journal). Once the first resync is done (``event=protected``), a load
generator, its own process like a VM (``python -m replication.bench.rpo load``),
writes through the NBD front end (:class:`~replication.nbd.NbdClient`) at a paced
20 MB/s, then at 50 MB/s, each for ``PHASE_SECONDS``. The writes are realistic
content (:func:`.images.realistic_pool`): half sequential 256 KiB appends through a
64 MiB log region, half 64-256 KiB updates at random places of a 128 MiB hot region,
like a database with its log.

The figure is the source agent's own: every epoch it ships logs ``event=
epoch_persisted ... rpo=SECONDS``, the age of the epoch's oldest write when its
PERSISTED ack arrived, i.e. how much acknowledged data a failover at that moment
would have lost. The stage reports p50 and p99 per rate against the goal p99 < 1 s,
and whether the generator kept its rate (if it fell behind, the disk was slower
than the load and the RPO describes a lighter load). After the load the volume is
compared with the source disk block by block.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..disks import create_disk
from ..errors import ReplicationError
from ..launch import Launched, agent_command, launch
from .context import Context
from .figures import Figure, Target
from .procs import cpu_seconds
from .replicate import VOLUME, prepare, start_daemons, verify_volume

__all__ = ["PHASE_SECONDS", "RATES", "Phase", "generate", "percentile", "run"]

#: the paced write rates, MB/s (10^6 bytes per second), one phase each
RATES = (20, 50)
#: seconds of load per rate (environment ``REPLICATION_BENCH_RPO_SECONDS`` overrides)
PHASE_SECONDS = 20.0
RPO_GOAL = Target("value", "<", 1.0, "product issue: p99 RPO < 1 s under a steady write load")
RATE_KEPT = Target("ratio", ">=", 0.95, "bench: the load must be what was asked for")
_EPOCH_PERSISTED = re.compile(rb"event=epoch_persisted .*?rpo=([0-9.]+)")
_EPOCH_CUT = re.compile(rb"event=epoch disk=")
_NBD_PORT = re.compile(rb"event=nbd_listening port=(\d+)")
_PROTECTED = re.compile(rb"event=protected disk=\S+ volume=\S+ mode=tracked")
#: write sizes of the generator
_LOG_WRITE = 256 << 10
_BLOCK = 64 << 10


@dataclass(frozen=True)
class Phase:
    """One rate: what the generator did and the RPO of every epoch persisted meanwhile."""

    rate: float  # MB/s asked
    achieved: float  # MB/s written
    seconds: float
    bytes_written: int
    writes: int
    max_behind: float  # seconds the generator was ever behind its schedule
    rpo: list[float]  # per epoch, seconds
    cpu: dict[str, float]  # agent -> CPU seconds during the phase


def run(ctx: Context) -> tuple[list[Figure], dict[str, object]]:
    """Run both phases on one deployment; return the figures and every epoch's RPO."""
    seconds = float(os.environ.get("REPLICATION_BENCH_RPO_SECONDS", PHASE_SECONDS))
    tls, _vhd = prepare(ctx)
    d = ctx.work / "rpo"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    source = d / "source.raw"
    subprocess.run(["cp", "--sparse=always", str(ctx.image("A")), str(source)], check=True)
    vmdk = d / "target.vmdk"
    with create_disk(str(vmdk), ctx.size, format="vmdk", subformat="monolithicSparse") as v:
        v.flush()
    daemons = start_daemons(d, tls, {VOLUME: vmdk})
    phases: list[Phase] = []
    try:
        agent = _start_source(d, tls, daemons["process_server"].port, source)
        daemons["source"] = agent
        ctx.say("rpo: first resync of the tracked disk")
        nbd_port = _wait_for(agent.log, _NBD_PORT, 60, "the NBD port")
        _wait_for(agent.log, _PROTECTED, 1800, "the first resync")
        for rate in RATES:
            ctx.say(f"rpo: {rate} MB/s for {seconds:g} s")
            ctx.wait_quiet()
            phases.append(_phase(d, daemons, int(nbd_port), rate, seconds, ctx.size))
    finally:
        for name in ("source", "process_server", "master_target"):
            if name in daemons:
                daemons[name].stop()
    verify_volume(source, vmdk)
    shutil.rmtree(d, ignore_errors=True)
    return _figures(phases), _details(phases, seconds)


def _start_source(d: Path, tls: Path, ps_port: int, disk: Path) -> Launched:
    argv = agent_command(
        "source-agent",
        *("--process-server", f"127.0.0.1:{ps_port}", "--tls-dir", str(tls)),
        *("--disk", f"{VOLUME}={disk}", "--state-dir", str(d / "state")),
        *("--nbd-listen", "127.0.0.1:0", "--control-listen", "127.0.0.1:0"),
    )
    return launch(argv, d / "source.log")


def _phase(
    d: Path, daemons: dict[str, Launched], port: int, rate: float, seconds: float, size: int
) -> Phase:
    """Run the generator at ``rate``, wait until every epoch is persisted; read the RPOs."""
    log = daemons["source"].log
    start = log.stat().st_size
    cpu0 = {k: cpu_seconds(p.pid) for k, p in daemons.items()}
    argv = [
        sys.executable,
        *("-m", "replication.bench.rpo", "load", "--port", str(port), "--export", VOLUME),
        *("--size", str(size), "--rate", str(rate), "--seconds", str(seconds)),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    if proc.returncode != 0:
        raise ReplicationError(f"bench: the load generator failed: {proc.stderr.strip()[-400:]}")
    load = json.loads(proc.stdout)
    _wait_settled(log, start)
    cpu = {k: cpu_seconds(p.pid) - cpu0[k] for k, p in daemons.items()}
    with open(log, "rb") as f:
        f.seek(start)
        rpo = [float(x) for x in _EPOCH_PERSISTED.findall(f.read())]
    return Phase(
        rate,
        load["bytes"] / load["seconds"] / 1e6,
        load["seconds"],
        load["bytes"],
        load["writes"],
        load["max_behind"],
        rpo,
        cpu,
    )


def _wait_settled(log: Path, start: int, timeout: float = 120.0, quiet: float = 1.5) -> None:
    """Wait until every epoch cut since ``start`` is persisted, and nothing new for ``quiet`` s.

    A write still dirty would make the pair cut another epoch within a fraction of
    a second (it polls for writes every 0.2 s), so a quiet interval with every cut
    epoch persisted means the last write is on the master target.
    """
    deadline = time.monotonic() + timeout
    settled_since = None
    while time.monotonic() < deadline:
        with open(log, "rb") as f:
            f.seek(start)
            text = f.read()
        if len(_EPOCH_CUT.findall(text)) == len(_EPOCH_PERSISTED.findall(text)):
            settled_since = settled_since or time.monotonic()
            if time.monotonic() - settled_since >= quiet:
                return
        else:
            settled_since = None
        time.sleep(0.1)
    raise ReplicationError(f"bench: the source agent did not persist its epochs in {timeout:g} s")


def _wait_for(log: Path, pattern: re.Pattern[bytes], timeout: float, what: str) -> bytes:
    """Return the first group (or match) of ``pattern`` once it is in ``log``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = pattern.search(log.read_bytes())
        if m:
            return m.group(1) if m.groups() else m.group(0)
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-400:]
    raise ReplicationError(f"bench: the source agent did not log {what} in {timeout:g} s: {tail}")


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _figures(phases: list[Phase]) -> list[Figure]:
    figures = []
    for p in phases:
        p50, p99 = percentile(p.rpo, 50), percentile(p.rpo, 99)
        note = f"{len(p.rpo)} epochs; p50 {p50:.3f} s" if p50 is not None else "no epoch"
        figures += [
            Figure("rpo", f"RPO p99 at {p.rate:g} MB/s", "s", p99, None, "none: absolute goal",
                   RPO_GOAL, note=note),
            Figure("rpo", f"RPO p50 at {p.rate:g} MB/s", "s", p50, None, "none: absolute goal",
                   RPO_GOAL, note=f"max {max(p.rpo):.3f} s" if p.rpo else ""),
            Figure("rpo", f"write rate kept at {p.rate:g} MB/s", "MB/s", p.achieved, p.rate,
                   "rate asked of the generator", RATE_KEPT,
                   note=f"at most {p.max_behind:.2f} s behind its schedule"),
        ]  # fmt: skip
    return figures


def _details(phases: list[Phase], seconds: float) -> dict[str, object]:
    return {
        "phase_seconds": seconds,
        "phases": [
            {
                "rate_mb_s": p.rate,
                "achieved_mb_s": round(p.achieved, 2),
                "bytes_written": p.bytes_written,
                "writes": p.writes,
                "max_behind_s": round(p.max_behind, 3),
                "epochs": len(p.rpo),
                "rpo_p50_s": percentile(p.rpo, 50),
                "rpo_p99_s": percentile(p.rpo, 99),
                "rpo_max_s": max(p.rpo) if p.rpo else None,
                "rpo_s": [round(x, 4) for x in p.rpo],
                "cpu_s": {k: round(v, 2) for k, v in p.cpu.items()},
            }
            for p in phases
        ],
    }


# --- the load generator (its own process, like a VM writing to its disk) ----------------


def generate(
    port: int, export: str, size: int, rate: float, seconds: float, seed: int = 5
) -> dict[str, float]:
    """Write realistic content at ``rate`` MB/s for ``seconds`` through NBD; return stats.

    Paced by a schedule (write k starts when the bytes before it are due), so a
    slow disk shows as ``max_behind`` rather than as a burst afterwards.
    """
    import numpy as np

    from ..nbd.client import NbdClient
    from .images import realistic_pool

    rng = np.random.default_rng(seed)
    pool = realistic_pool(32 << 20, seed)
    log_start, log_len = _region(size, 0.5, 64 << 20)
    hot_start, hot_len = _region(size, 0.125, 128 << 20)
    written = writes = 0
    behind = 0.0
    log_pos = 0
    with NbdClient("127.0.0.1", port, export) as nbd:
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            if writes % 2 == 0:  # the log: sequential appends, wrapping
                n = min(_LOG_WRITE, log_len)
                offset = log_start + log_pos
                log_pos = (log_pos + n) % max(n, log_len - log_len % n)
            else:  # the hot region: updates at random places
                n = min(_BLOCK * int(rng.integers(1, 5)), hot_len)
                offset = hot_start + int(rng.integers(0, (hot_len - n) // _BLOCK + 1)) * _BLOCK
            due = started + written / (rate * 1e6)
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            else:
                behind = max(behind, now - due)
            at = int(rng.integers(0, (len(pool) - n) // 4096 + 1)) * 4096
            nbd.write(offset, pool[at : at + n])
            written += n
            writes += 1
        elapsed = time.monotonic() - started
        nbd.flush()
    return {"bytes": written, "writes": writes, "seconds": elapsed, "max_behind": behind}


def _region(size: int, where: float, length: int) -> tuple[int, int]:
    """A region of at most ``length`` bytes starting at ``where`` x size, block aligned."""
    start = int(size * where) // _BLOCK * _BLOCK
    return start, max(_BLOCK, min(length, (size - start) // _BLOCK * _BLOCK))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replication.bench.rpo")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("load", help="write through NBD at a paced rate; print JSON stats")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--export", required=True)
    p.add_argument("--size", type=int, required=True, help="bytes of the export")
    p.add_argument("--rate", type=float, required=True, help="MB/s")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--seed", type=int, default=5)
    args = parser.parse_args(argv)
    stats = generate(args.port, args.export, args.size, args.rate, args.seconds, args.seed)
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
