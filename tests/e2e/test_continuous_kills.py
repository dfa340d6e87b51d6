"""Crash matrix, continuous replication: kill -9 of each agent while writes keep coming.

A tracked source agent (``--state-dir``, NBD front end) protects a raw disk into a
VMDK volume through a process server and a master target, all real processes with
mutual TLS. A writer thread writes 64 KiB blocks at random offsets through NBD
(``NbdClient``: each write returns only when the source agent acknowledged it) while
the test kills one agent (source, process server or master target) with SIGKILL at
random moments and restarts it: the process server and the master target on their
ports, the source agent on its state directory (its bitmap recovers, design T5) and
a new NBD port the writer reconnects to.

After the writes stop and the source drains, the master target is stopped and the
target judged from outside: ``qemu-img check`` clean, ``qemu-img compare`` equal to
the source, and every write the writer got an acknowledgement for is in the target
(read by ``qemu-img convert``); a write cut by a kill of the source agent may be in
it, not, or in part (sector by sector), nothing else is allowed. The seed is
printed: ``CRASH_SEED`` reproduces the kill times and the writes (not the machine's
timing), ``CRASH_KILLS`` sets the count (default 5 per agent). The soak (``pytest
-m soak``) kills each agent ``SOAK_KILLS`` (200) times: episodes of 1 to
``KILLS_PER_EPISODE`` kills on one deployment, each judged before the next begins.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from replication.nbd.client import NbdClient
from tests import ledger
from tests.e2e.agents import restart
from tests.e2e.test_continuous import start_tracked
from tests.e2e.test_crash_points import (
    KILLS_PER_EPISODE,
    SIZE,
    SOAK_KILLS,
    SOAK_SECONDS_PER_KILL,
    deploy,
)
from tests.e2e.test_source_daemon import wait_for
from tests.helpers import qemu_check, qemu_compare, require

pytestmark = pytest.mark.oracle

BLOCK = 64 << 10
SECTOR = 512
#: blocks the writer picks from (the whole disk)
BLOCKS = SIZE // BLOCK
#: seconds between two writes of the writer (a steady, modest load)
WRITE_EVERY = 0.02
#: seconds for the target to come level once the writes stop
CONVERGE = 120.0


class Writer:
    """Writes random blocks through NBD and remembers what each block may hold.

    ``allowed[block]`` lists the contents the block may hold in the end, sector by
    sector: one after an acknowledged write; after a write that a kill cut, the
    contents it had and the new one, mixed by sector (an unacknowledged write has no
    atomicity: the kernel may stop a killed process's write part way, as a disk may
    tear one at a power cut). Runs on its own thread until ``stop()``.
    """

    def __init__(self, raw: Path, port: int, rng: random.Random) -> None:
        data = raw.read_bytes()
        self.allowed = {b: [data[b * BLOCK : (b + 1) * BLOCK]] for b in range(BLOCKS)}
        self.acked = self.cut = 0
        self._rng = random.Random(rng.randrange(1 << 30))
        self._port = port
        self._port_changed = threading.Event()
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="nbd-writer")
        self._thread.start()

    def reconnect(self, port: int) -> None:
        """The source agent listens on a new NBD port (after its restart)."""
        self._port = port
        self._port_changed.set()

    def stop(self) -> None:
        self._stop.set()
        self._port_changed.set()
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the writer did not stop"
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._connected_writes()
        except BaseException as err:  # reported by stop()
            self._failure = err

    def _connected_writes(self) -> None:
        """Write until the connection breaks (a killed source agent) or stop()."""
        self._port_changed.clear()
        try:
            client = NbdClient("127.0.0.1", self._port, "vol1", timeout=30)
        except OSError:
            self._port_changed.wait(10)  # the old port is gone: wait for the new one
            return
        with client:
            while not self._stop.wait(WRITE_EVERY):
                block = self._rng.randrange(BLOCKS)
                data = self._rng.randbytes(BLOCK)
                try:
                    client.write(block * BLOCK, data)
                except Exception:  # cut by a kill: on the disk, not, or in part
                    self.allowed[block].append(data)
                    self.cut += 1
                    self._port_changed.wait(30)
                    return
                self.allowed[block] = [data]
                self.acked += 1

    def lost(self, image: Path) -> list[int]:
        """Blocks of ``image`` (raw) with a sector that none of their contents holds."""
        data = image.read_bytes()
        blocks = (data[b * BLOCK : (b + 1) * BLOCK] for b in range(BLOCKS))
        return [b for b, block in enumerate(blocks) if not _held(block, self.allowed[b])]


def _held(block: bytes, allowed: list[bytes]) -> bool:
    """Whether every sector of ``block`` is that sector of one of ``allowed``."""
    if block in allowed:
        return True
    return all(
        any(block[i : i + SECTOR] == a[i : i + SECTOR] for a in allowed)
        for i in range(0, BLOCK, SECTOR)
    )


class Site:
    """MT + PS (``deploy`` of test_crash_points) and a tracked source agent with NBD."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.tls, self.raw, self.vmdk, self.agents = deploy(tmp_path)
        self.starts = 0
        self.source, self.nbd = self._start_source()
        wait_for(self.level, "the first resync", 90, every=0.3)

    def _start_source(self):
        self.starts += 1
        log = f"source-{self.starts}.log"  # one log per run: its NBD port is its own
        return start_tracked(self.tmp, self.tls, self.agents["ps"].port, self.raw, log)

    def level(self) -> bool:
        return qemu_compare(self.raw, self.vmdk, "vmdk").returncode == 0

    def kill_and_restart(self, who: str, writer: Writer) -> None:
        if who == "source":
            self.source.kill()
            self.source, self.nbd = self._start_source()
            writer.reconnect(self.nbd)
        else:
            self.agents[who].kill()
            self.agents[who] = restart(self.agents[who], self.agents[who].port)

    def judge(self, writer: Writer) -> None:
        """Writes stopped: converge, stop the MT cleanly, judge the target from outside."""
        wait_for(self.level, "the target level with the source", CONVERGE, every=0.5)
        self.agents["mt"].stop()  # its volume closed: nothing writes it while we look
        checked = qemu_check(self.vmdk)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert qemu_compare(self.raw, self.vmdk, "vmdk").returncode == 0
        image = self.tmp / "target-as-raw.img"
        subprocess.run(
            [require("qemu-img"), "convert", "-f", "vmdk", "-O", "raw", str(self.vmdk),
             str(image)],
            check=True, timeout=120,
        )  # fmt: skip
        assert writer.lost(image) == [], "acknowledged writes missing from the target"
        image.unlink()
        self.agents["mt"] = restart(self.agents["mt"], self.agents["mt"].port)

    def stop(self) -> None:
        for agent in (self.source, self.agents["ps"], self.agents["mt"]):
            agent.stop()


def _seed_and_kills(default: int) -> tuple[int, int]:
    seed = int(os.environ.get("CRASH_SEED", random.randrange(1 << 30)))
    return seed, int(os.environ.get("CRASH_KILLS", str(default)))


def _episode(site: Site, who: str, rng: random.Random, kills: int) -> int:
    """Writes, ``kills`` kills of ``who`` among them, then the judge; return kills made."""
    writer = Writer(site.raw, site.nbd, rng)
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(0.3, 1.2))
            site.kill_and_restart(who, writer)
        time.sleep(rng.uniform(0.3, 1.0))  # writes after the last restart, too
    finally:
        writer.stop()
    assert writer.acked > 0, "no write was acknowledged: the kills hit nothing"
    print(f"  {kills} kills of {who}: {writer.acked} writes acknowledged, {writer.cut} cut")
    site.judge(writer)
    return kills


@pytest.mark.parametrize("who", ["mt", "ps", "source"])
def test_random_kills_during_continuous_replication_lose_no_acknowledged_write(tmp_path, who):
    seed, kills = _seed_and_kills(5)
    print(f"continuous kills of {who}: CRASH_SEED={seed} CRASH_KILLS={kills}")
    site = Site(tmp_path)
    try:
        done = _episode(site, who, random.Random(seed), kills)
    finally:
        site.stop()
    ledger.tried("random kills (continuous)", who, done)
    ledger.lost_nothing("random kills (continuous)")


@pytest.mark.soak
@pytest.mark.parametrize("who", ["mt", "ps", "source"])
def test_soak_random_kills_during_continuous_replication(tmp_path, who, request):
    if "soak" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("long randomized run: opt in with -m soak")
    seed, kills = _seed_and_kills(SOAK_KILLS)
    print(f"soak: continuous kills of {who}: CRASH_SEED={seed} CRASH_KILLS={kills}")
    rng = random.Random(seed)
    deadline = time.monotonic() + SOAK_SECONDS_PER_KILL * kills + 300
    site = Site(tmp_path)
    done = episodes = 0
    try:
        while done < kills:
            assert time.monotonic() < deadline, f"soak over its bound after {done} kills"
            episodes += 1
            done += _episode(site, who, rng, min(kills - done, rng.randint(1, KILLS_PER_EPISODE)))
    finally:
        site.stop()
    ledger.tried("random kills (continuous)", who, done)
    ledger.lost_nothing("random kills (continuous)")
    print(f"soak: {who}: {done} kills in {episodes} episodes, every judge passed")
