"""Stage ``fan-in``: one process server and one master target serving 100 sources at once.

A hundred agent processes do not fit a 2-core machine, so one load generator
process (``python -m replication.bench.fanin gen``) plays all of them: per source a
thread with its own mutual-TLS channel to the process server, its own small disk
(4 MiB, a raw file) and its own volume on the master target (a 4 MiB
monolithicSparse VMDK in its own directory, registered with ``--volume``). Each
source speaks the real protocol (Handshake, then ``Replicate`` streams: Open, frames
sealed by :class:`~replication.source.SourceSession` with zstd and AES-GCM, Close,
acks) and behaves like a tracked disk: its disk is written at a steady rate (64 KiB
blocks at random places, realistic content, ``FANIN_MB_S`` for all sources
together), and it ships the blocks dirtied since its last session as the next
session, back to back, for ``FANIN_SECONDS`` after every source has connected and
shipped a first (unmeasured) session. The offered load is above what two shared
cores absorb, so sessions grow until the agents are saturated: the throughput is
the capacity of one process server and master target.

Reported: the process server's peak of concurrent ``Replicate`` streams (its
``event=streams_peak`` log line), the aggregate throughput (source bytes of the
sessions PERSISTED within the window) and the day's capacity it implies, and the
fairness between sources (Jain's index of their bytes). Afterwards every volume is
compared with its source disk.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..certs import init_tls_dir
from ..disks import create_disk
from ..errors import ReplicationError
from .context import Context
from .figures import Figure, Target
from .procs import cpu_seconds
from .replicate import start_daemons, verify_volume
from .rpo import RATES, percentile

__all__ = ["FANIN_MB_S", "FANIN_SECONDS", "SOURCES", "generate", "jain", "run"]

SOURCES = 100
VOLUME_BYTES = 4 << 20
#: seconds of churn once every source is connected (``REPLICATION_BENCH_FANIN_SECONDS``)
FANIN_SECONDS = 30.0
#: MB/s written to all the sources' disks together (``REPLICATION_BENCH_FANIN_MB_S``)
FANIN_MB_S = 100.0
#: blocks written before the warm-up session
CHURN_BLOCKS = 8
BLOCK = 64 << 10
STREAMS = Target("value", ">=", SOURCES, "product issue: one process server takes 100 sources")
FAIRNESS = Target("value", ">=", 0.9, "product issue: Jain's index of the sources' bytes")
#: the steady load of stage rpo, now spread over 100 sources: what the agents must absorb
THROUGHPUT = Target(
    "value", ">=", float(RATES[0]), f"bench: at least the {RATES[0]} MB/s of stage rpo"
)
CAPACITY = Target(
    "value",
    ">=",
    RATES[0] * 86400 / 1e6,
    f"bench: {RATES[0]} MB/s all day (stage rpo's steady load)",
)
_PEAK = re.compile(rb"event=streams_peak streams=(\d+)")


def run(ctx: Context) -> tuple[list[Figure], dict[str, object]]:
    """Serve ``SOURCES`` sources from one generator; return the figures and raw counts."""
    seconds = float(os.environ.get("REPLICATION_BENCH_FANIN_SECONDS", FANIN_SECONDS))
    offered = float(os.environ.get("REPLICATION_BENCH_FANIN_MB_S", FANIN_MB_S))
    tls = ctx.work / "tls"
    if not tls.exists():
        init_tls_dir(tls, ["localhost"])
    d = ctx.work / "fan-in"
    shutil.rmtree(d, ignore_errors=True)
    names = [f"fan{i:03d}" for i in range(SOURCES)]
    volumes = _make_disks(d, names)
    ctx.say(f"fan-in: {SOURCES} sources, {offered:g} MB/s of writes, for {seconds:g} s")
    daemons = start_daemons(d, tls, volumes)
    try:
        ctx.wait_quiet()
        cpu0 = {k: cpu_seconds(p.pid) for k, p in daemons.items()}
        rate = offered * 1e6 / SOURCES
        result = _run_generator(d, tls, daemons["process_server"].port, names, seconds, rate)
        cpu = {k: cpu_seconds(p.pid) - cpu0[k] for k, p in daemons.items()}
        peak = max((int(x) for x in _PEAK.findall(daemons["process_server"].log.read_bytes())),
                   default=0)  # fmt: skip
    finally:
        for name in ("process_server", "master_target"):
            daemons[name].stop()
    for name, vmdk in volumes.items():
        verify_volume(d / "src" / f"{name}.raw", vmdk)
    shutil.rmtree(d, ignore_errors=True)
    result.update(
        cpu_s={k: round(v, 2) for k, v in cpu.items()}, peak_streams=peak, offered_mb_s=offered
    )
    return _figures(result), result


def _make_disks(d: Path, names: list[str]) -> dict[str, Path]:
    """Empty source disks (raw, sparse) and volumes (VMDK): equal before any churn.

    Each volume gets its own directory, as each VM has on a datastore: opening a
    VMDK looks for snapshot children among the descriptors beside it (design D3).
    """
    (d / "src").mkdir(parents=True)
    volumes = {}
    for name in names:
        with open(d / "src" / f"{name}.raw", "wb") as f:
            f.truncate(VOLUME_BYTES)
        (d / "vols" / name).mkdir(parents=True)
        vmdk = volumes[name] = d / "vols" / name / f"{name}.vmdk"
        with create_disk(str(vmdk), VOLUME_BYTES, format="vmdk") as v:
            v.flush()
    return volumes


def _run_generator(
    d: Path, tls: Path, port: int, names: list[str], seconds: float, rate: float
) -> dict[str, object]:
    argv = [
        sys.executable,
        *("-m", "replication.bench.fanin", "gen", "--port", str(port), "--tls-dir", str(tls)),
        *("--dir", str(d / "src"), "--seconds", str(seconds), "--rate", str(rate), *names),
    ]
    with open(d / "generator.log", "wb") as err:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=err, timeout=seconds + 600)
    if proc.returncode != 0:
        tail = (d / "generator.log").read_text(errors="replace")[-400:]
        raise ReplicationError(f"bench: the fan-in generator failed: {tail}")
    return json.loads(proc.stdout)


def jain(values: list[float]) -> float | None:
    """Jain's fairness index: 1 when every value is equal, 1/n when one has everything."""
    total, squares = sum(values), sum(x * x for x in values)
    return total * total / (len(values) * squares) if squares else None


def _figures(res: dict) -> list[Figure]:
    per_source = [s["bytes"] for s in res["sources"].values()]
    window = res["window_s"]
    mb_s = sum(per_source) / window / 1e6
    latency = [x for s in res["sources"].values() for x in s["latencies"]]
    written = sum(s["written"] for s in res["sources"].values()) / window / 1e6
    note = (
        f"{written:.1f} MB/s written; {res['sessions']} sessions, "
        f"{sum(per_source) / max(1, res['sessions']) / 1e6:.2f} MB each; session p50 "
        f"{percentile(latency, 50) or 0:.2f} s, p99 {percentile(latency, 99) or 0:.2f} s"
    )
    none = "none: absolute goal"
    return [
        Figure("fan-in", "concurrent source streams at the process server (peak)", "streams",
               float(res["peak_streams"]), None, none, STREAMS),
        Figure("fan-in", f"aggregate throughput, {len(per_source)} sources", "MB/s", mb_s,
               None, none, THROUGHPUT, note=note),
        Figure("fan-in", "day's capacity at that rate", "TB/day", mb_s * 86400 / 1e6, None,
               none, CAPACITY, note="source data changed per day one PS + MT pair absorbs"),
        Figure("fan-in", "fairness between sources (Jain's index)", "index", jain(per_source),
               None, none, FAIRNESS,
               note=f"bytes per source: min {min(per_source) / 1e6:.1f} MB, "
               f"max {max(per_source) / 1e6:.1f} MB"),
    ]  # fmt: skip


# --- the generator: one process, one thread and one channel per source ---------------------


def generate(
    port: int,
    tls_dir: Path,
    src_dir: Path,
    names: list[str],
    seconds: float,
    rate: float,
    seed: int = 3,
) -> dict[str, object]:
    """Run every source (``rate`` B/s of writes each) for ``seconds``; return its counts."""
    from ..certs import load_identity
    from ..config import load_passphrase
    from .images import realistic_pool

    identity = load_identity(tls_dir, "source", "localhost")
    secret = load_passphrase(tls_dir / "passphrase")
    pool = realistic_pool(16 << 20, seed)
    ready = threading.Barrier(len(names) + 1)
    window = {"start": float("inf"), "end": float("inf")}
    stats: dict[str, dict] = {}
    threads = [
        threading.Thread(
            target=_source,
            args=(port, identity, secret, src_dir / f"{name}.raw", name, pool, seed + i),
            kwargs={"rate": rate, "ready": ready, "window": window, "stats": stats},
            daemon=True,
            name=f"source-{name}",
        )
        for i, name in enumerate(names)
    ]
    started = time.monotonic()
    for t in threads:
        t.start()
    try:
        ready.wait(timeout=600)  # every source connected and warmed up
        window["start"] = time.monotonic()  # the sources read it as they go
        window["end"] = window["start"] + seconds
    except threading.BrokenBarrierError:
        window["end"] = 0.0  # a source failed: the others stop at once
    connect_s = time.monotonic() - started
    for t in threads:
        t.join(timeout=seconds + 300)
    failed = {n: s["error"] for n, s in stats.items() if s.get("error")}
    if failed or len(stats) < len(names):
        raise ReplicationError(f"fan-in: {len(failed)} sources failed: {list(failed.items())[:3]}")
    return {
        "window_s": seconds,
        "connect_s": round(connect_s, 2),
        "sessions": sum(s["sessions"] for s in stats.values()),
        "sources": stats,
    }


def _source(port, identity, secret, path, name, pool, seed, *, rate, ready, window, stats):
    """One source: its disk is written at ``rate`` B/s; it ships what is dirty, again and again.

    Like a tracked disk: the writes due since the last session (64 KiB blocks at
    random places, realistic content) dirty their blocks, and the next session
    ships the dirty set (a block written twice meanwhile goes once). So a session
    carries more when the agents are slower, as epochs do.
    """
    import numpy as np

    from ..disks import open_disk
    from ..source import SourceSession
    from ..tls import secure_channel
    from ..v1 import data_pb2_grpc

    me = stats[name] = {"bytes": 0, "written": 0, "sessions": 0, "latencies": [], "error": None}
    rng = np.random.default_rng(seed)
    fd = os.open(path, os.O_WRONLY)
    channel = secure_channel(f"127.0.0.1:{port}", identity, server_host="localhost")
    nblocks = VOLUME_BYTES // BLOCK
    dirty: set[int] = set()
    writes = {"due_from": time.monotonic(), "done": 0}

    def write(count: int) -> None:
        for b in rng.integers(0, nblocks, size=count).tolist():
            at = int(rng.integers(0, (len(pool) - BLOCK) // 4096)) * 4096
            os.pwrite(fd, pool[at : at + BLOCK], b * BLOCK)
            dirty.add(b)

    def catch_up() -> None:
        """Make the writes due by now (at ``rate``), at least one."""
        elapsed = time.monotonic() - writes["due_from"]
        due = int(elapsed * rate / BLOCK)
        if due <= writes["done"]:  # nothing due yet: wait for the next write
            time.sleep(max(0.0, (writes["done"] + 1) * BLOCK / rate - elapsed))
            due = writes["done"] + 1
        write(due - writes["done"])
        if window["start"] <= time.monotonic() <= window["end"]:
            me["written"] += (due - writes["done"]) * BLOCK
        writes["done"] = due

    def ship(disk) -> SourceSession:
        session = SourceSession(disk, name, secret, block_size=BLOCK)
        session.plan_blocks(np.array(sorted(dirty), dtype=np.int64), nblocks)
        dirty.clear()
        _ship(stub, session)
        return session

    try:
        stub = data_pb2_grpc.ProcessServerStub(channel)
        _handshake(stub)
        with open_disk(str(path)) as disk:
            # warm-up, not measured: the master target opens the volume and its history
            write(CHURN_BLOCKS)
            ship(disk)
            ready.wait(timeout=600)
            writes["due_from"] = time.monotonic()
            while time.monotonic() < window["end"]:
                catch_up()
                began = time.monotonic()
                session = ship(disk)
                done = time.monotonic()
                me["latencies"].append(round(done - began, 4))
                if window["start"] <= done <= window["end"]:
                    me["bytes"] += session.stats.bytes_plain
                    me["sessions"] += 1
    except Exception as err:  # reported by generate(): a failed source fails the stage
        me["error"] = f"{type(err).__name__}: {err}"
        ready.abort()
    finally:
        os.close(fd)
        channel.close()


def _handshake(stub) -> None:
    from .. import wire
    from ..protocol import Hello, negotiate

    reply = stub.Handshake(wire.hello_to_pb(Hello(role="source")), timeout=60)
    negotiate(Hello(role="source"), wire.hello_from_pb(reply))


def _ship(stub, session) -> None:
    """One session on one ``Replicate`` stream: Open, every frame, Close; until PERSISTED.

    The frames are sealed before the call (a session is a few blocks), so the
    request iterator (gRPC's thread) and the ack loop (ours) never share the session.
    The request stream stays open until the last PERSISTED ack: the process server
    ends the call when its source stops sending.
    """
    from .. import wire

    frames = []
    while not session.done_sealing():
        frames += session.next_frames(limit=64)
    done = threading.Event()
    size = session.disk.virtual_size

    def requests():
        yield wire.source_message_to_pb(
            wire.OpenMsg(session.volume, session.session, BLOCK, size, 1)
        )
        for seq, frame in frames:
            yield wire.source_message_to_pb(wire.FrameMsg(seq, frame))
        yield wire.source_message_to_pb(wire.CloseMsg(session.last_seq))
        done.wait(600)

    call = stub.Replicate(requests(), timeout=600)
    try:
        for pb in call:
            ack = wire.ack_from_pb(pb)
            session.on_ack(ack.seq, ack.level)
            if session.complete():
                return
        raise ReplicationError(f"{session.volume}: the stream ended before PERSISTED")
    finally:
        done.set()
        call.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replication.bench.fanin")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("gen", help="play many sources over real TLS; print JSON stats")
    p.add_argument("--port", type=int, required=True, help="the process server's port")
    p.add_argument("--tls-dir", type=Path, required=True)
    p.add_argument("--dir", type=Path, required=True, help="the sources' raw disks")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--rate", type=float, required=True, help="bytes/s written per source")
    p.add_argument("names", nargs="+", help="volume names (= disk file stems)")
    args = parser.parse_args(argv)
    result = generate(args.port, args.tls_dir, args.dir, args.names, args.seconds, args.rate)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
