"""Fault classes: each one detected within a bound, reported, then cleared with nothing lost.

For every fault class the test injects the fault into a running deployment (real
agent processes, mutual TLS, loopback: ``cluster`` in conftest.py), asserts that it
is DETECTED within a stated bound and REPORTED where an operator looks (the control
``Status`` as the orchestrator reads it with :class:`ControlClient`: ``problems``,
a pair's ``state`` and ``error``; and the Prometheus metrics of ``--metrics-listen``),
removes it, and asserts that the report clears and that the target ends identical
to the source (``qemu-img compare``).

The reports of one fault are polled together (:func:`poll`), then each is checked
(:func:`expect`): a report that never came fails the test and names what is missing.
The process server's reports come from ``agents/process_server/liveness.py``
(keepalive, progress deadline, probe; design F4), the relay's problem lines and
its metrics; the source agent's from its pair table.

Bounds: faults the agents see as errors (a refused or reset connection, a typed
refusal) must be reported within ``DETECT`` seconds; silent faults (nothing ever
arrives, nothing errors) within ``DETECT_SILENT`` seconds, which leaves room for a
liveness probe of a few seconds; the report must clear, and the source finish,
within ``CLEAR`` seconds of the fault's removal.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from replication.certs import load_identity
from replication.control import ControlClient
from tests import ledger
from tests.e2e.agents import Agent, replication, start
from tests.e2e.test_replication import source_args
from tests.helpers import qemu_compare
from tests.proxy import FaultProxy

pytestmark = [pytest.mark.oracle, pytest.mark.timeout(120)]

MiB = 1 << 20
SIZE = 16 * MiB
DATA = 8 * MiB  # random, so 8 incompressible frames of 1 MiB
RATE = "4M/s"  # the source's bandwidth limit: frames still flow when the fault hits

DETECT = 10.0
DETECT_SILENT = 10.0
CLEAR = 30.0
GRACE = 2.0

#: a transient line: it lasts from a failed forward until the next ack (~0.1-0.3 s)
RETRYING = "a 'retrying' problem line"


# --- observing ----------------------------------------------------------------------------


def poll(
    bound: float,
    claims: dict[str, Callable[[], object]],
    *,
    given: tuple[str, ...] = (),
    every: float = 0.05,
) -> dict[str, float | None]:
    """Check every claim every ``every`` s until all held or ``bound`` s passed.

    Once every claim named in ``given`` held (the fault is detected), the others have
    ``GRACE`` seconds more, not the whole bound: a report that comes from the same
    state (a metric beside a problem line) comes at the same time. Return, per claim,
    the seconds after which it first held (None: never). A claim that raises (an
    agent restarting, a metric not there yet) does not hold.
    """
    began = time.monotonic()
    end = began + bound
    seen: dict[str, float | None] = dict.fromkeys(claims)
    while True:
        for name, claim in claims.items():
            if seen[name] is None and _holds(claim):
                seen[name] = time.monotonic() - began
                if given and all(seen[g] is not None for g in given):
                    end = min(end, time.monotonic() + GRACE)
        if all(v is not None for v in seen.values()) or time.monotonic() > end:
            print("seconds to each claim (None: never):", seen)  # shown with -rA or on failure
            return seen
        time.sleep(every)


def _holds(claim: Callable[[], object]) -> bool:
    try:
        return bool(claim())
    except Exception:
        return False


def expect(seen: dict[str, float | None], claim: str, what: str) -> None:
    """Fail naming ``what`` unless ``claim`` held in ``seen`` (from :func:`poll`)."""
    assert seen.get(claim) is not None, f"not seen: {what}"


def within(bound: float, claim: Callable[[], object], what: str, every: float = 0.05) -> float:
    """Seconds until ``claim`` held; fail the test if it did not within ``bound``."""
    seen = poll(bound, {what: claim}, every=every)[what]
    assert seen is not None, f"not within {bound} s: {what}"
    return seen


def control(cluster, agent: Agent) -> ControlClient:
    """A control client of ``agent`` with the orchestrator's certificate (closed by the caller)."""
    identity = load_identity(cluster.tls, "orchestrator", "localhost")
    return ControlClient(f"127.0.0.1:{agent.port}", identity, timeout=5)


def metric(agent: Agent, name: str, **labels: str) -> float | None:
    """The sum of the samples on ``agent``'s metrics page (its newest process) named
    ``name`` with these ``labels`` (all of a counter's reasons, if none given), or None."""
    ports = re.findall(r"metrics_port=(\d+)", agent.log.read_text(errors="replace"))
    assert ports and ports[-1] != "None", f"{agent.log} names no metrics port"
    url = f"http://127.0.0.1:{ports[-1]}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    values = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(values) if values else None


def forwarding_problem(client: ControlClient, volume: str = "vol1") -> str | None:
    """The process server's problem line saying forwarding ``volume`` fails, if any."""
    for line in client.status().problems:
        if f"session {volume}/" in line and "retrying" in line:
            return line
    return None


def pair(client: ControlClient, disk: str):
    """A source agent's pair of ``disk`` (a ``PairInfo``), or None."""
    return next((p for p in client.status().pairs if p.disk == disk), None)


# --- the deployment -----------------------------------------------------------------------


def master_target(
    cluster,
    *,
    port: int = 0,
    volume: Path | None = None,
    datastore: Path | None = None,
    passphrase: Path | None = None,
) -> Agent:
    """Start a master target (again on ``port`` after a stop), with metrics."""
    args = ["--data-dir", str(cluster.root / "mt"), "--metrics-listen", "127.0.0.1:0"]
    if volume is not None:
        args += ["--volume", f"vol1={volume}"]
    if datastore is not None:
        args += ["--datastore", str(datastore)]
    if passphrase is not None:
        args += ["--passphrase-file", str(passphrase)]
    return _start(cluster, "master-target", port, args, "mt.log")


def process_server(cluster, mt_port: int, *, port: int = 0, spool_limit: str = "") -> Agent:
    """Start a process server forwarding to ``127.0.0.1:mt_port``, with metrics."""
    args = ["--master-target", f"127.0.0.1:{mt_port}", "--spool-dir", str(cluster.root / "spool")]
    args += ["--metrics-listen", "127.0.0.1:0"]
    if spool_limit:
        args += ["--spool-limit", spool_limit]
    return _start(cluster, "process-server", port, args, "ps.log")


def source_daemon(cluster, ps_port: int, disk: str, *extra: str) -> Agent:
    """Start a source agent daemon (control and metrics) with ``--disk disk``."""
    args = ["source-agent", "--process-server", f"127.0.0.1:{ps_port}"]
    args += ["--tls-dir", str(cluster.tls), "--disk", disk, "--control-listen", "127.0.0.1:0"]
    args += ["--metrics-listen", "127.0.0.1:0", "--rescan-interval", "60", *extra]
    agent = start(replication(*args), cluster.root / "src.log")
    cluster.agents.append(agent)
    return agent


def source_once(cluster, ps_port: int, disk: Path, rate: str = RATE) -> subprocess.Popen[bytes]:
    """Start ``source-agent --once`` for ``vol1=disk`` at ``rate``; output in ``src.log``."""
    args = [*source_args(cluster.tls, ps_port, f"vol1={disk}", 90), "--bandwidth-limit", rate]
    with open(cluster.root / "src.log", "ab") as log:
        proc = subprocess.Popen(replication(*args), stdout=log, stderr=log)
    cluster.sources.append(proc)
    return proc


def _start(cluster, role: str, port: int, args: list[str], log: str) -> Agent:
    common = ["--listen", f"127.0.0.1:{port}", "--tls-dir", str(cluster.tls)]
    agent = start(replication(role, *common, *args), cluster.root / log)
    cluster.agents.append(agent)
    return agent


def stop_all(cluster) -> None:
    """Stop every process, newest first: no server waits out its grace for a client's stream."""
    for proc in cluster.sources:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    for agent in reversed(cluster.agents):
        agent.stop()


def disks(cluster) -> tuple[Path, Path]:
    """A raw source whose first ``DATA`` bytes are random, and an empty target VMDK."""
    source = cluster.make_source("source.raw", SIZE, DATA)
    return source, cluster.make_volume(cluster.root / "target.vmdk", SIZE)


def frames_flowing(ps: Agent) -> None:
    """Wait until the process server forwarded a frame (the session is mid-stream)."""
    forwarded = lambda: (metric(ps, "replication_frames_total", direction="out") or 0) >= 1  # noqa: E731
    within(DETECT, forwarded, "a frame forwarded to the master target")


def finish(cluster, src: subprocess.Popen[bytes], ps_client: ControlClient, volume: Path):
    """After the fault: the source ends PERSISTED, problems clear, the target equals it."""
    assert src.wait(timeout=CLEAR) == 0, cluster.source_log()
    within(CLEAR, lambda: not ps_client.status().problems, "the process server's problems clear")
    ps_client.close()
    stop_all(cluster)
    compared = qemu_compare(cluster.root / "source.raw", volume, "vmdk")
    assert compared.returncode == 0, compared.stdout
    ledger.lost_nothing("network and device faults")


# --- the master target unreachable -------------------------------------------------------


def test_a_stopped_master_target_is_reported_by_the_process_server(cluster):
    ledger.tried("network and device faults", _fault_name())
    source, volume = disks(cluster)
    mt = master_target(cluster, volume=volume)
    ps = process_server(cluster, mt.port)
    ps_client = control(cluster, ps)
    src = source_once(cluster, ps.port, source)
    frames_flowing(ps)
    mt.kill()  # gone: its port refuses connections
    seen = poll(
        DETECT,
        {
            "status": lambda: forwarding_problem(ps_client),
            "metric": lambda: metric(ps, "replication_forward_retrying_sessions") == 1,
        },
        given=("status",),
    )
    assert seen["status"] is not None, ps_client.status()
    assert "UNAVAILABLE" in forwarding_problem(ps_client)
    assert src.poll() is None  # the source is not failed: its frames are RECEIVED
    expect(seen, "metric", "process server: gauge replication_forward_retrying_sessions 1")
    master_target(cluster, port=mt.port, volume=volume)
    finish(cluster, src, ps_client, volume)


def test_an_unreachable_master_target_is_reported_before_any_session(cluster):
    ledger.tried("network and device faults", _fault_name())
    source, volume = disks(cluster)
    mt = master_target(cluster, volume=volume)
    ps = process_server(cluster, mt.port)
    mt.kill()
    ps_client = control(cluster, ps)
    src = source_daemon(cluster, ps.port, f"vol1={source}")
    src_client = control(cluster, src)
    within(DETECT, lambda: pair(src_client, "vol1"), "the pair started")
    seen = poll(
        DETECT,
        {
            "ps status": lambda: any("master target" in p for p in ps_client.status().problems),
            "ps metric": lambda: metric(ps, "replication_master_target_up") == 0,
            "pair error": lambda: pair(src_client, "vol1").error,
        },
    )
    expect(seen, "ps status", "process server: a problem line for the unreachable MT")
    expect(seen, "ps metric", "process server: gauge replication_master_target_up 0")
    expect(seen, "pair error", "source agent: the pair's error says why it retries")
    master_target(cluster, port=mt.port, volume=volume)
    within(CLEAR, lambda: pair(src_client, "vol1").state == "protected", "the pair protected")
    assert pair(src_client, "vol1").error == ""
    assert not ps_client.status().problems
    src_client.close()
    ps_client.close()
    stop_all(cluster)
    assert qemu_compare(source, volume, "vmdk").returncode == 0
    ledger.lost_nothing("network and device faults")


# --- the link between the process server and the master target --------------------------


def relay_through_proxy(cluster):
    """Source -> PS -> FaultProxy -> MT, frames flowing; return what the test needs."""
    source, volume = disks(cluster)
    mt = master_target(cluster, volume=volume)
    to_mt = FaultProxy(mt.port)
    ps = process_server(cluster, to_mt.port)
    ps_client = control(cluster, ps)
    src = source_once(cluster, ps.port, source)
    within(DETECT, lambda: to_mt.bytes_up > MiB, "frames to reach the master target")
    ledger.tried("network and device faults", _fault_name())
    return to_mt, ps, ps_client, src, volume


def _fault_name() -> str:
    """The running test's name, without ``test_`` (its fault)."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0].split("::")[-1]
    return test.removeprefix("test_").replace("_", " ")


def test_a_stalled_link_to_the_master_target_is_reported(cluster):
    to_mt, ps, ps_client, src, volume = relay_through_proxy(cluster)
    try:
        to_mt.stall(True)
        _expect_forwarding_reported(ps, ps_client, DETECT_SILENT, to_mt, src)
        to_mt.stall(False)
        finish(cluster, src, ps_client, volume)
    finally:
        ledger.wire(to_mt)
        to_mt.close()


def _expect_forwarding_reported(ps: Agent, ps_client, bound: float, to_mt: FaultProxy, src) -> None:
    """Poll for the report of a silent fault; check the fault held all along (not faked)."""
    time.sleep(0.5)  # a chunk the proxy was relaying when the fault began is counted by now
    reached = to_mt.bytes_up
    seen = poll(
        bound,
        {
            "status": lambda: forwarding_problem(ps_client),
            "metric": lambda: metric(ps, "replication_forward_retrying_sessions") == 1,
        },
    )
    if seen["status"] is None:  # nothing reported: then nothing may have moved either
        assert to_mt.bytes_up == reached and src.poll() is None, "the fault did not hold"
    expect(seen, "status", f"process server: a 'retrying' problem line within {bound} s")
    expect(seen, "metric", "process server: gauge replication_forward_retrying_sessions 1")


def test_a_link_cut_again_and_again_is_reported(cluster):
    to_mt, ps, ps_client, src, volume = relay_through_proxy(cluster)
    done, cuts = threading.Event(), []

    def cut_repeatedly() -> None:
        while not done.wait(0.4):
            cuts.append(to_mt.cut())

    cutter = threading.Thread(target=cut_repeatedly, daemon=True)
    try:
        cutter.start()
        within(DETECT, lambda: forwarding_problem(ps_client), RETRYING, every=0.01)
        time.sleep(2.0)  # more cuts
        done.set()
        cutter.join(timeout=5)
        hits = sum(1 for n in cuts if n)  # cuts that closed a live connection
        assert hits >= 3, cuts
        failures = metric(ps, "replication_forward_failures_total") or 0
        assert failures >= hits // 2, (
            f"process server: {failures} forwarding failures for {hits} cuts"
        )
        finish(cluster, src, ps_client, volume)
    finally:
        done.set()
        ledger.wire(to_mt)
        to_mt.close()


@pytest.mark.parametrize(
    "fault",
    [
        "server side dropped",
        "down direction closed",
    ],
)
def test_a_half_open_connection_to_the_master_target_is_reported(cluster, fault):
    to_mt, ps, ps_client, src, volume = relay_through_proxy(cluster)
    try:
        if fault == "server side dropped":
            to_mt.drop_server_side()  # the MT sees the end; the PS's side stays open, unanswered
            _expect_forwarding_reported(ps, ps_client, DETECT_SILENT, to_mt, src)
            to_mt.cut()  # the removal: the half-open connection is finally reset
        else:
            to_mt.close_direction("down")  # the PS reads end-of-stream, its writes still go
            within(DETECT, lambda: forwarding_problem(ps_client), RETRYING, every=0.01)
            failures = metric(ps, "replication_forward_failures_total")
            assert failures, "process server: replication_forward_failures_total counts it"
        finish(cluster, src, ps_client, volume)
    finally:
        ledger.wire(to_mt)
        to_mt.close()


def test_a_master_target_that_stops_reading_is_reported(cluster):
    to_mt, ps, ps_client, src, volume = relay_through_proxy(cluster)
    try:
        to_mt.stop_reading("up")  # the PS's frames pile up unread; the MT's side still flows
        _expect_forwarding_reported(ps, ps_client, DETECT_SILENT, to_mt, src)
        to_mt.stop_reading("up", on=False)
        finish(cluster, src, ps_client, volume)
    finally:
        ledger.wire(to_mt)
        to_mt.close()


# --- the spool full -----------------------------------------------------------------------


def test_a_full_spool_is_reported(cluster):
    ledger.tried("network and device faults", _fault_name())
    limit = 4 * MiB
    source = cluster.make_source("source.raw", SIZE, SIZE)  # 16 frames: four times the limit
    volume = cluster.make_volume(cluster.root / "target.vmdk", SIZE)
    mt = master_target(cluster, volume=volume)
    ps = process_server(cluster, mt.port, spool_limit="4M")
    ps_client = control(cluster, ps)
    src = source_once(cluster, ps.port, source, rate="8M/s")
    frames_flowing(ps)
    mt.kill()
    full = limit - MiB  # within one 1 MiB segment of the limit
    seen = poll(
        DETECT,
        {
            "spool bytes": lambda: ps_client.status().spool_bytes >= full,
            "spool metric": lambda: metric(ps, "replication_spool_bytes") >= full,
            "forwarding": lambda: forwarding_problem(ps_client),
            "spool problem": lambda: any(
                p.startswith("spool") for p in ps_client.status().problems
            ),
            "limit metric": lambda: metric(ps, "replication_spool_limit_bytes") == limit,
        },
        given=("spool bytes", "spool metric", "forwarding"),
    )
    for claim in ("spool bytes", "spool metric", "forwarding"):
        assert seen[claim] is not None, (claim, ps_client.status())
    assert ps_client.status().spool_bytes <= limit
    assert src.poll() is None, cluster.source_log()  # pushed back, not failed
    expect(seen, "spool problem", "process server: a problem line for a spool at its limit")
    expect(seen, "limit metric", "process server: gauge replication_spool_limit_bytes")
    master_target(cluster, port=mt.port, volume=volume)
    assert src.wait(timeout=CLEAR) == 0, cluster.source_log()
    within(CLEAR, lambda: not ps_client.status().problems, "the problems clear")
    within(CLEAR, lambda: metric(ps, "replication_spool_bytes") < full, "the spool drained")
    ps_client.close()
    stop_all(cluster)
    assert qemu_compare(source, volume, "vmdk").returncode == 0
    ledger.lost_nothing("network and device faults")


# --- refusals -----------------------------------------------------------------------------


def test_a_permanent_refusal_is_reported_and_clears_after_the_fix(cluster):
    ledger.tried("network and device faults", _fault_name())
    source, volume = disks(cluster)
    other = cluster.root / "other-passphrase"
    other.write_text("ab" * 32)
    other.chmod(0o600)
    mt = master_target(cluster, volume=volume, passphrase=other)  # not the source's key
    ps = process_server(cluster, mt.port)
    ps_client = control(cluster, ps)
    src = source_daemon(cluster, ps.port, f"vol1={source}")
    src_client = control(cluster, src)
    seen = poll(
        DETECT,
        {
            "parked": lambda: any(
                "parked" in p and "vol1" in p and "frame.auth" in p
                for p in ps_client.status().problems
            ),
            "parked metric": lambda: metric(ps, "replication_parked_sessions") >= 1,
            "pair error": lambda: (
                pair(src_client, "vol1").state == "error"
                and "frame.auth" in pair(src_client, "vol1").error
            ),
            "source problem": lambda: any(
                p.startswith("vol1:") and "frame.auth" in p for p in src_client.status().problems
            ),
            "pair metric": lambda: metric(src, "replication_pairs", state="error") == 1,
        },
        given=("parked", "parked metric", "pair error", "source problem"),
    )
    for claim in ("parked", "parked metric", "pair error", "source problem"):
        assert seen[claim] is not None, (claim, ps_client.status(), src_client.status())
    expect(seen, "pair metric", 'source agent: gauge replication_pairs{state="error"} 1')
    # the fix: the right key at the master target, and a restart of the process server
    # (parking lasts for the life of its process)
    mt.stop()
    master_target(cluster, port=mt.port, volume=volume)
    ps.stop()
    ps = process_server(cluster, mt.port, port=ps.port)
    within(CLEAR, lambda: pair(src_client, "vol1").state == "protected", "the pair protected")
    assert pair(src_client, "vol1").error == "" and not src_client.status().problems
    assert not ps_client.status().problems
    assert metric(ps, "replication_parked_sessions") == 0
    src_client.close()
    ps_client.close()
    stop_all(cluster)
    assert qemu_compare(source, volume, "vmdk").returncode == 0
    ledger.lost_nothing("network and device faults")


def test_a_pair_whose_volume_is_unknown_is_in_error_until_the_volume_exists(cluster):
    ledger.tried("network and device faults", _fault_name())
    source = cluster.make_source("source.raw", SIZE, DATA)
    datastore = cluster.root / "datastore"
    mt = master_target(cluster, datastore=datastore)
    ps = process_server(cluster, mt.port)
    src = source_daemon(cluster, ps.port, f"disk1={source}", "--idle")
    src_client = control(cluster, src)
    src_client.start_pair("disk1", "vol2")  # no such volume on the master target
    seen = poll(
        DETECT,
        {
            "pair error": lambda: (
                pair(src_client, "disk1").state == "error"
                and "volume.unknown" in pair(src_client, "disk1").error
                and "vol2" in pair(src_client, "disk1").error
            ),
            "source problem": lambda: any(
                p.startswith("disk1:") and "vol2" in p for p in src_client.status().problems
            ),
            "pair metric": lambda: metric(src, "replication_pairs", state="error") == 1,
        },
        given=("pair error", "source problem"),
    )
    assert pair(src_client, "disk1").state in ("error", "resyncing"), src_client.status()
    expect(seen, "pair error", "source agent: the pair in 'error' with [volume.unknown]")
    expect(seen, "source problem", "source agent: a problem line for the pair")
    expect(seen, "pair metric", 'source agent: gauge replication_pairs{state="error"} 1')
    # the process server relayed the refusal with its status and code (design F5)
    assert "Traceback" not in ps.log.read_text(errors="replace")
    with control(cluster, mt) as mt_client:
        mt_client.create_volume("vol2", SIZE)
    within(CLEAR, lambda: pair(src_client, "disk1").state == "protected", "the pair protected")
    assert pair(src_client, "disk1").error == "" and not src_client.status().problems
    src_client.close()
    stop_all(cluster)
    assert qemu_compare(source, datastore / "vol2" / "vol2.vmdk", "vmdk").returncode == 0
    ledger.lost_nothing("network and device faults")
