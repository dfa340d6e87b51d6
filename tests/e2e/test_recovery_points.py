"""Recovery points end to end: app-consistent tags cut while qemu-io writes through the
source agent's NBD front end, and a two-disk group cut; every point produced by the
master target is a VMDK identical (``qemu-img compare``) to a copy of the source taken
at the tag, and passes ``qemu-img check``.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from replication.certs import load_identity
from replication.control import ControlClient, consistent_cut
from replication.wire import TagSpec
from tests.e2e.agents import (
    init_tls,
    master_target,
    process_server,
    replication,
    restart,
    start,
)
from tests.e2e.test_source_daemon import wait_for
from tests.helpers import make_raw, qemu_check, qemu_compare, require

pytestmark = pytest.mark.oracle

SIZE = 16 << 20


@pytest.fixture
def site(tmp_path):
    """Master target (with a datastore), process server, and a tracked source agent
    with two disks served over NBD."""
    require("qemu-img")
    require("qemu-io")
    tls = init_tls(tmp_path / "tls")
    datastore = tmp_path / "datastore"
    datastore.mkdir()
    disks, volumes = {}, []
    for name in ("web", "db"):
        disks[name] = tmp_path / f"{name}.raw"
        make_raw(disks[name], SIZE, seed=len(name))
        vmdk = tmp_path / f"{name}-target.vmdk"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "vmdk", str(vmdk), str(SIZE)], check=True, timeout=30
        )
        volumes += ["--volume", f"{name}={vmdk}"]
    agents = []
    mt = start(
        master_target(tmp_path, tls, "--datastore", str(datastore), "--crash-interval", "1",
                      *volumes),
        tmp_path / "mt.log",
    )  # fmt: skip
    agents.append(mt)
    ps = start(process_server(tmp_path, tls, mt.port), tmp_path / "ps.log")
    agents.append(ps)
    src = start(
        replication(
            "source-agent",
            "--process-server",
            f"127.0.0.1:{ps.port}",
            "--tls-dir",
            str(tls),
            *[a for n, p in disks.items() for a in ("--disk", f"{n}={p}")],
            "--state-dir",
            str(tmp_path / "cbt"),
            "--nbd-listen",
            "127.0.0.1:0",
            "--control-listen",
            "127.0.0.1:0",
        ),
        tmp_path / "source.log",
    )
    agents.append(src)
    nbd = int(
        wait_for(lambda: re.findall(r"event=nbd_listening port=(\d+)", src.log.read_text()), "NBD")[
            -1
        ]
    )
    orchestrator = load_identity(tls, "orchestrator", "localhost")
    with (
        ControlClient(f"127.0.0.1:{src.port}", orchestrator) as source,
        ControlClient(f"127.0.0.1:{mt.port}", orchestrator) as target,
    ):
        wait_for(
            lambda: len([p for p in source.status().pairs if p.state == "protected"]) == 2,
            "both pairs protected",
            90,
            every=0.3,
        )
        yield tmp_path, disks, nbd, source, target, datastore, agents
    for a in reversed(agents):
        a.stop()


def churn(nbd: int, disk: str, rng: random.Random, writes: int = 8) -> None:
    """qemu-io writes through the source agent's NBD front end (acknowledged on return)."""
    args = [require("qemu-io"), "-f", "raw", f"nbd://127.0.0.1:{nbd}/{disk}"]
    for _ in range(writes):
        offset = rng.randrange(0, SIZE - (1 << 20)) // 4096 * 4096
        length = rng.choice([4096, 65536, 300 * 1024])
        args += ["-c", f"write -P {rng.randrange(1, 255)} {offset} {length}"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def produced_equals(target, datastore: Path, volume: str, point: str, copy: Path, name: str):
    vol, got = target.produce_disk(volume, point, name)
    (image,) = (datastore / vol.name).glob("*.vmdk")  # the datastore's own layout
    assert qemu_check(image).returncode == 0
    assert qemu_compare(copy, image, "vmdk").returncode == 0, f"{volume}@{point} differs"
    return got


def test_app_consistent_tags_produce_exactly_the_tagged_disks(site):
    tmp_path, disks, nbd, source, target, datastore, _agents = site
    rng = random.Random(5)
    copies = []
    for n in range(3):
        churn(nbd, "web", rng)
        # writes paused (qemu-io returned): the copy is what the tag must capture
        copy = tmp_path / f"web-at-t{n}.raw"
        shutil.copyfile(disks["web"], copy)
        source.tag(TagSpec("app", f"t{n}", disks=("web",)))
        copies.append(copy)
    churn(nbd, "web", rng)  # after the last tag: in no point

    def tagged():
        tags = {p.tag for p in target.list_points("web") if p.kind == "app"}
        return {"t0", "t1", "t2"} <= tags

    wait_for(tagged, "three app-consistent points", 60, every=0.3)
    for n, copy in enumerate(copies):
        point = produced_equals(target, datastore, "web", f"tag:t{n}", copy, f"web-t{n}")
        assert point.kind == "app" and point.tag == f"t{n}"
        # the check can fail: the point is not the next tag's disk
        if n + 1 < len(copies):
            (image,) = (datastore / f"web-t{n}").glob("*.vmdk")
            assert qemu_compare(copies[n + 1], image, "vmdk").returncode != 0
    crash = [p for p in target.list_points("web") if p.kind == "crash"]
    assert crash, "crash-consistent points are made on the schedule too"


def test_a_group_cut_is_consistent_across_two_disks(site):
    tmp_path, disks, nbd, source, target, datastore, _agents = site
    rng = random.Random(9)
    churn(nbd, "web", rng)
    churn(nbd, "db", rng)
    copies = {}
    for name, path in disks.items():
        copies[name] = tmp_path / f"{name}-at-cut.raw"
        shutil.copyfile(path, copies[name])
    consistent_cut([source], TagSpec("app", "nightly", group="cut-1"))
    churn(nbd, "db", rng)  # after the cut: in neither point

    def cut_everywhere():
        return all(any(p.group == "cut-1" for p in target.list_points(v)) for v in ("web", "db"))

    wait_for(cut_everywhere, "the group's points on both volumes", 60, every=0.3)
    for name in disks:
        produced_equals(target, datastore, name, "group:cut-1", copies[name], f"{name}-cut1")


def test_every_crash_consistent_point_is_a_prefix_of_the_acknowledged_writes(site):
    tmp_path, disks, nbd, _source, target, datastore, _agents = site
    rng = random.Random(13)
    prefixes = {_sha256(disks["db"])}  # the disk before any write of this test
    before = {p.id for p in target.list_points("db")}

    def new_crash_points() -> int:
        return len({p.id for p in target.list_points("db") if p.kind == "crash"} - before)

    for _ in range(60):  # bounded: stops once three points were made during the churn
        churn(nbd, "db", rng, writes=1)  # one acknowledged write...
        prefixes.add(_sha256(disks["db"]))  # ...and the disk right after it
        time.sleep(0.2)  # epochs end between writes; crash points come every second
        if new_crash_points() >= 3:
            break
    assert new_crash_points() >= 3
    new = [p for p in target.list_points("db") if p.kind == "crash" and p.id not in before]
    for point in new:
        name = f"db-p{point.id}"
        target.produce_disk("db", str(point.id), name)
        (image,) = (datastore / name).glob("*.vmdk")
        raw = tmp_path / f"{name}.raw"
        subprocess.run(
            [require("qemu-img"), "convert", "-f", "vmdk", "-O", "raw", str(image), str(raw)],
            check=True,
            timeout=60,
        )
        assert _sha256(raw) in prefixes, f"point {point.id} is no prefix of the writes"


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_master_target_killed_while_applying_keeps_every_point(site):
    tmp_path, disks, nbd, source, target, datastore, agents = site
    rng = random.Random(21)
    churn(nbd, "web", rng)
    copy = tmp_path / "web-at-before.raw"
    shutil.copyfile(disks["web"], copy)
    source.tag(TagSpec("app", "before"))
    wait_for(lambda: any(p.tag == "before" for p in target.list_points("web")), "the tag's point")
    # a large write, and the master target killed while it applies it
    mt = agents[0]
    args = [require("qemu-io"), "-f", "raw", f"nbd://127.0.0.1:{nbd}/web"]
    before = _target(tmp_path, "web").stat().st_mtime_ns
    subprocess.run([*args, "-c", "write -P 0x3c 0 12M"], check=True, timeout=60)
    wait_for(
        lambda: _target(tmp_path, "web").stat().st_mtime_ns != before,
        "the master target to start writing the epoch",
        30,
        every=0.005,
    )
    mt.kill()
    agents[0] = restart(mt, mt.port)
    wait_for(
        lambda: qemu_compare(disks["web"], _target(tmp_path, "web"), "vmdk").returncode == 0,
        "the target level again after the restart",
        90,
        every=0.5,
    )
    assert qemu_check(_target(tmp_path, "web")).returncode == 0
    produced_equals(target, datastore, "web", "tag:before", copy, "web-before-again")


def _target(tmp_path: Path, name: str) -> Path:
    return tmp_path / f"{name}-target.vmdk"
