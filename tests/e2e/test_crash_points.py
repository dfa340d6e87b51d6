"""Crash matrix: kill -9 of each agent at every named crash point and at random moments.

Each named point (replication/faults.py) is reached by a real agent process started
with ``REPLICATION_CRASH_AT``; the agent dies there with SIGKILL, is restarted
without it, and the source's run must still end with a target identical to the
source (``qemu-img compare``) that passes ``qemu-img check``. The random kills use
a printed seed (``CRASH_SEED`` reproduces a run; ``CRASH_KILLS`` sets the count).

The soak (``pytest -m soak tests/e2e/test_crash_points.py``, excluded from ``make
test``) kills each agent ``SOAK_KILLS`` (200) times at random moments: resync
episodes one after the other on the same deployment, each after rewriting half of
the source's blocks and with 1 to ``KILLS_PER_EPISODE`` kills, each landing while
the source still runs; after each episode the target is judged as above.
``CRASH_KILLS`` overrides the count (a short trial).
"""

from __future__ import annotations

import os
import random
import subprocess
import time

import pytest

from replication.faults import POINTS
from tests import ledger
from tests.e2e.agents import (
    init_tls,
    master_target,
    process_server,
    replication,
    restart,
    start,
)
from tests.helpers import make_raw, mutate_blocks, qemu_check, qemu_compare, require, write_raw
from tests.proxy import FaultProxy

pytestmark = pytest.mark.oracle

SIZE = 24 << 20
AGENT_OF = {"spool": "ps", "journal": "mt", "vmdk": "mt"}
#: the agents' points; the orchestrator's are killed in test_orchestrator_crashes.py
AGENT_POINTS = sorted(p for p in POINTS if p.split(".")[0] in AGENT_OF)
#: random kills per agent in the soak (``CRASH_KILLS`` overrides)
SOAK_KILLS = 200
#: a bound on the soak's wall time: this many seconds per kill (kills, restarts, judging)
SOAK_SECONDS_PER_KILL = 15.0
#: at most this many kills per resync episode (the source agent's --deadline is 180 s)
KILLS_PER_EPISODE = 8


def deploy(tmp_path, *, crash_at: dict[str, str] | None = None):
    """MT + PS (one of them may carry a crash point), a raw source, an empty VMDK."""
    require("qemu-img")
    tls = init_tls(tmp_path / "tls")
    raw = tmp_path / "source.raw"
    make_raw(raw, SIZE, seed=31)
    vmdk = tmp_path / "target.vmdk"
    # made by our own writer: its grain tables are allocated on demand (qemu-img
    # preallocates them, and the table allocation's crash point would never be reached)
    subprocess.run(
        replication("disk", "create", str(vmdk), str(SIZE), "--format", "vmdk"),
        check=True,
        timeout=60,
    )
    crash_at = crash_at or {}
    mt = start(
        master_target(tmp_path, tls, "--volume", f"vol1={vmdk}"),
        tmp_path / "mt.log",
        env=_crash_env(crash_at.get("mt")),
    )
    ps = start(
        process_server(tmp_path, tls, mt.port),
        tmp_path / "ps.log",
        env=_crash_env(crash_at.get("ps")),
    )
    return tls, raw, vmdk, {"mt": mt, "ps": ps}


def _crash_env(crash: str | None) -> dict[str, str] | None:
    return {"REPLICATION_CRASH_AT": crash} if crash else None


def source(tls, port: int, raw) -> subprocess.Popen:
    return subprocess.Popen(
        replication(
            "source-agent",
            "--process-server",
            f"127.0.0.1:{port}",
            "--tls-dir",
            str(tls),
            "--disk",
            f"vol1={raw}",
            "--once",
            "--deadline",
            "180",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_exit(proc, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    return proc.poll()


def judge(raw, vmdk, src) -> None:
    try:
        out, err = src.communicate(timeout=240)
    finally:
        if src.poll() is None:
            src.kill()
    assert src.returncode == 0, out + err
    assert qemu_check(vmdk).returncode == 0
    assert qemu_compare(raw, vmdk, "vmdk").returncode == 0


def test_every_crash_point_is_killed_by_a_test():
    """A new point's prefix names an agent here, or the orchestrator's crash tests."""
    import inspect

    from tests.e2e import test_orchestrator_crashes

    orchestrator = sorted(set(POINTS) - set(AGENT_POINTS))
    assert orchestrator and all(p.startswith("orchestrator.") for p in orchestrator)
    killed = inspect.getsource(test_orchestrator_crashes)
    assert [p for p in orchestrator if f'killed_at(w, store, "{p}"' not in killed] == []


@pytest.mark.parametrize("point", AGENT_POINTS)
def test_a_kill_at_each_named_crash_point_loses_nothing(tmp_path, point):
    who = AGENT_OF[point.split(".")[0]]
    # mid-stream, with earlier frames already acknowledged (grains are allocated once
    # per group commit, so the first allocation is already mid-stream)
    nth = 1 if point.startswith("vmdk.") else 3
    tls, raw, vmdk, agents = deploy(tmp_path, crash_at={who: f"{point}@{nth}"})
    try:
        src = source(tls, agents["ps"].port, raw)
        code = wait_exit(agents[who].proc, 90)
        assert code == -9, f"{who} did not die at {point} (exit {code})"
        assert f"crash point {point} reached" in agents[who].log.read_text()
        agents[who] = restart(agents[who], agents[who].port)
        ledger.tried("crash points killed", point)
        judge(raw, vmdk, src)
        ledger.lost_nothing("crash points killed")
    finally:
        for a in agents.values():
            a.stop()


@pytest.mark.parametrize("who", ["mt", "ps", "source"])
def test_random_kills_of_each_agent_lose_nothing(tmp_path, who):
    seed = int(os.environ.get("CRASH_SEED", random.randrange(1 << 30)))
    kills = int(os.environ.get("CRASH_KILLS", "5"))
    print(f"random kills of {who}: CRASH_SEED={seed} CRASH_KILLS={kills}")
    rng = random.Random(seed)
    tls, raw, vmdk, agents = deploy(tmp_path)
    proxy = FaultProxy(agents["ps"].port)
    proxy.delay = 0.01  # a slow link: the run lasts long enough for every kill
    try:
        src = source(tls, proxy.port, raw)
        for _ in range(kills):
            time.sleep(rng.uniform(0.2, 1.0))
            if who == "source":
                src.kill()
                src.wait(timeout=10)
                src = source(tls, proxy.port, raw)  # a fresh session: hash compare again
            else:
                agents[who].kill()
                agents[who] = restart(agents[who], agents[who].port)
        proxy.delay = 0.0
        ledger.tried("random kills (resync)", who, kills)
        judge(raw, vmdk, src)
        ledger.lost_nothing("random kills (resync)")
    finally:
        ledger.wire(proxy)
        proxy.close()
        for a in agents.values():
            a.stop()


@pytest.mark.soak
@pytest.mark.parametrize("who", ["mt", "ps", "source"])
def test_soak_random_kills_of_each_agent_lose_nothing(tmp_path, who, request):
    if "soak" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("long randomized run: opt in with -m soak")
    seed = int(os.environ.get("CRASH_SEED", random.randrange(1 << 30)))
    kills = int(os.environ.get("CRASH_KILLS", str(SOAK_KILLS)))
    print(f"soak: random kills of {who}: CRASH_SEED={seed} CRASH_KILLS={kills}")
    rng = random.Random(seed)
    tls, raw, vmdk, agents = deploy(tmp_path)
    proxy = FaultProxy(agents["ps"].port)
    deadline = time.monotonic() + SOAK_SECONDS_PER_KILL * kills + 300
    done = episodes = 0
    try:
        while done < kills:
            assert time.monotonic() < deadline, f"soak over its bound after {done} kills"
            episodes += 1
            if episodes > 1:  # new content: this episode's resync has data to move
                data = bytearray(raw.read_bytes())
                mutate_blocks(data, 0.5, seed=rng.randrange(1 << 30))
                write_raw(raw, data)
            proxy.delay = 0.01  # a slow link: the episode lasts long enough for kills
            src = source(tls, proxy.port, raw)
            # a few kills, then the episode must finish within the source's deadline
            for _ in range(min(kills - done, rng.randint(1, KILLS_PER_EPISODE))):
                time.sleep(rng.uniform(0.2, 1.0))
                if src.poll() is not None:
                    break  # the episode ended: a kill now would not land during a resync
                src, agents = _kill_and_restart(who, src, agents, tls, proxy.port, raw)
                done += 1
                ledger.tried("random kills (resync)", who)
            proxy.delay = 0.0
            judge(raw, vmdk, src)
        ledger.lost_nothing("random kills (resync)")
    finally:
        ledger.wire(proxy)
        proxy.close()
        for a in agents.values():
            a.stop()
    print(f"soak: {who}: {done} kills in {episodes} episodes, every target equal and clean")


def _kill_and_restart(who, src, agents, tls, port, raw):
    if who == "source":
        src.kill()
        src.wait(timeout=10)
        return source(tls, port, raw), agents  # a fresh session: hash compare again
    agents[who].kill()
    agents[who] = restart(agents[who], agents[who].port)
    return src, agents
