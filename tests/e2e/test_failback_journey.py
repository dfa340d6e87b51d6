"""The failback journey end to end, with real agents on loopback and the orchestrator.

One "Azure" side (a source agent beside fixed VHDs, tracked and written through
its NBD front end; a process server in Azure) and one on-prem side (a master
target owning the original VMDKs and a datastore). Two VMs in one recovery plan:
``web``, a VMware VM with two disks failed back to their original VMDKs (deltas
only), and ``db``, a physical server, always failed back to a new VMDK.

Judged from outside: ``qemu-img compare`` of every disk after each step, bytes
counted by a TCP proxy between source agent and process server, the store's
content, and the CLI's exit codes and output. The on-prem master target is never
stopped: failover makes it release the recovered VMDKs (``ReleaseVolume``), and it
serves its other volume through the reverse reprotect.

The second half: every preflight refusal against real agents (a module-scoped
site), each before any byte moves, and a kill -9 of the orchestrator CLI in the
middle of a reprotect.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import zstandard

from replication.disks import create_disk, open_disk
from replication.errors import (
    DatastoreNotWritableError,
    DiskHasSnapshotsError,
    DuplicateDiskUuidError,
    PhysicalTargetError,
    ServerUnreachableError,
    UnknownVmError,
    WrongStateError,
)
from replication.orchestrator import Orchestrator
from tests.e2e.agents import Agent, init_tls, replication, start
from tests.helpers import qemu_convert, realistic_bytes, require, write_raw
from tests.proxy import FaultProxy

pytestmark = pytest.mark.oracle

SIZE = 16 << 20
BLOCK = 65536
DISKS = {("web", "os"): 11, ("web", "data"): 12, ("db", "os"): 13}


def wait_for(predicate, what: str, timeout: float = 60.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def qemu_same(a: Path, fa: str, b: Path, fb: str) -> bool:
    done = subprocess.run(
        [require("qemu-img"), "compare", "-f", fa, "-F", fb, str(a), str(b)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode == 0


def read_disk(path: Path) -> bytes:
    with open_disk(str(path)) as d:
        return d.read(0, d.virtual_size)


def write_blocks(path: Path, blocks: dict[int, bytes]) -> None:
    with open_disk(str(path), writable=True) as d:
        for index, data in blocks.items():
            d.write(index * BLOCK, data)
        d.flush()


def delta_cost(a: bytes, b: bytes) -> tuple[int, int]:
    """(blocks that differ, their zstd-1 compressed bytes) between two disk contents."""
    cctx = zstandard.ZstdCompressor(level=1)
    blocks, size = 0, 0
    for off in range(0, len(a), BLOCK):
        if a[off : off + BLOCK] != b[off : off + BLOCK]:
            blocks += 1
            size += len(cctx.compress(a[off : off + BLOCK]))
    return blocks, size


@dataclass
class World:
    """Both sites of the journey; agents stopped at teardown."""

    root: Path
    tls: Path
    agents: list[Agent] = field(default_factory=list)
    proxies: list[FaultProxy] = field(default_factory=list)

    def agent(self, role: str, *args: str, log: str) -> Agent:
        common = ["--tls-dir", str(self.tls)]
        if role != "source-agent":
            common += ["--listen", "127.0.0.1:0"]
        a = start(replication(role, *common, *args), self.root / log, timeout=60)
        self.agents.append(a)
        return a

    def proxy(self, port: int) -> FaultProxy:
        p = FaultProxy(port)
        self.proxies.append(p)
        return p

    def close(self) -> None:
        for a in reversed(self.agents):
            a.stop()
        for p in self.proxies:
            p.close()


@pytest.fixture
def world(tmp_path):
    require("qemu-img")
    w = World(tmp_path, init_tls(tmp_path / "tls"))
    yield w
    w.close()


def make_vmdk(path: Path, data: bytes) -> Path:
    with create_disk(str(path), len(data), format="vmdk", subformat="monolithicSparse") as d:
        for off in range(0, len(data), BLOCK):
            chunk = data[off : off + BLOCK]
            if chunk.count(0) != len(chunk):
                d.write(off, chunk)
        d.flush()
    return path


def make_vhd(path: Path, data: bytes) -> Path:
    raw = path.with_suffix(".raw")
    write_raw(raw, data)
    qemu_convert(raw, path, "vpc", "subformat=fixed,force_size=on")
    raw.unlink()
    return path


def onprem_and_azure_disks(root: Path) -> dict:
    """The on-prem VMDKs as they were at the failover to Azure, and the Azure VHDs now."""
    disks = {}
    for (vm, name), seed in DISKS.items():
        before = realistic_bytes(SIZE, seed)
        now = bytearray(before)
        rng = random.Random(seed)
        for i in rng.sample(range(SIZE // BLOCK), 24):  # Azure wrote 24 blocks since
            now[i * BLOCK : (i + 1) * BLOCK] = rng.randbytes(BLOCK // 2) * 2
        vmdk = None if vm == "db" else make_vmdk(root / f"{vm}-{name}.vmdk", bytes(before))
        vhd = make_vhd(root / f"{vm}-{name}.vhd", bytes(now))
        disks[(vm, name)] = {"vmdk": vmdk, "vhd": vhd, "before": bytes(before), "now": bytes(now)}
    return disks


def start_forward_sites(w: World, disks: dict) -> dict:
    """On-prem master target; Azure process server, proxy, tracked source agent."""
    datastore = w.root / "datastore"
    datastore.mkdir()
    volumes = [
        a
        for (vm, n), d in disks.items()
        if d["vmdk"]
        for a in ("--volume", f"{vm}-{n}={d['vmdk']}")
    ]
    mt = w.agent(
        "master-target",
        "--data-dir",
        str(w.root / "mt"),
        "--datastore",
        str(datastore),
        "--crash-interval",
        "1",
        *volumes,
        log="mt.log",
    )
    ps = w.agent(
        "process-server",
        "--master-target",
        f"127.0.0.1:{mt.port}",
        "--spool-dir",
        str(w.root / "spool"),
        log="ps.log",
    )
    proxy = w.proxy(ps.port)
    src = w.agent(
        "source-agent",
        "--process-server", f"127.0.0.1:{proxy.port}",
        *[a for (vm, n), d in disks.items() for a in ("--disk", f"{vm}-{n}={d['vhd']}")],
        "--state-dir", str(w.root / "cbt"), "--nbd-listen", "127.0.0.1:0",
        "--control-listen", "127.0.0.1:0", "--idle",
        log="azure-source.log",
    )  # fmt: skip
    nbd = int(
        wait_for(lambda: re.findall(r"event=nbd_listening port=(\d+)", src.log.read_text()), "NBD")[
            -1
        ]
    )
    return {"mt": mt, "ps": ps, "src": src, "proxy": proxy, "nbd": nbd, "datastore": datastore}


def register(o: Orchestrator, disks: dict, site: dict) -> None:
    o.register_server(
        "mt1",
        "master-target",
        f"127.0.0.1:{site['mt'].port}",
        site="on-prem",
        datastore=str(site["datastore"]),
    )
    o.register_server("ps-azure", "process-server", f"127.0.0.1:{site['ps'].port}", site="azure")
    azure = f"127.0.0.1:{site['src'].port}"
    o.register_vm("web", "vmware-vm", azure_agent=azure)
    o.register_vm("db", "physical", azure_agent=azure)
    for (vm, name), d in disks.items():
        where = {"azure_path": str(d["vhd"])}
        if d["vmdk"]:
            where["original_vmdk"] = str(d["vmdk"])
        o.register_disk(vm, name, uuid=f"6000c29{vm}{name}", **where)
    o.create_group("PGweb", ["web"])
    o.create_group("PGdb", ["db"])
    o.create_plan("plan1", ["PGweb", "PGdb"])  # reprotected together
    o.create_plan("web-plan", ["PGweb"])  # failed over at the latest point
    o.create_plan("db-plan", ["PGdb"])  # failed over at an app-consistent tag


def cli(store: Path, tls: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    common = ["--store", str(store), "--tls-dir", str(tls)]
    verb, rest = args[0], args[1:]
    group = "store" if verb in ("backup", "restore") else "orchestrate"
    return subprocess.run(
        replication(group, verb, *common, *rest), capture_output=True, text=True, timeout=timeout
    )


def churn(nbd: int, export: str, seed: int) -> None:
    rng = random.Random(seed)
    args = [require("qemu-io"), "-f", "raw", f"nbd://127.0.0.1:{nbd}/{export}"]
    for _ in range(6):
        offset = rng.randrange(0, SIZE - BLOCK) // 4096 * 4096
        args += ["-c", f"write -P {rng.randrange(1, 255)} {offset} {rng.choice([4096, 65536])}"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_failback_journey(world):
    require("qemu-io")
    w = world
    disks = onprem_and_azure_disks(w.root)
    site = start_forward_sites(w, disks)
    store = w.root / "store"
    with Orchestrator(store, w.tls, poll=0.2) as o:
        register(o, disks, site)
    targets = reprotect(w, store, disks, site)
    backup_lose_and_restore(w, store)
    tag_copy = churn_and_tag(w, site, disks)
    targets = failover(w, store, disks, site, targets, tag_copy)
    handed_over(w, site, targets)
    reverse_reprotect(w, store, disks, targets)
    # the master target served its other volumes throughout: still up, still without them
    assert site["mt"].proc.poll() is None
    handed_over(w, site, targets)


def handed_over(w: World, site: dict, targets: dict) -> None:
    """Failover released every recovered VMDK: the on-prem master target, still running,
    no longer lists them (it keeps the alternate volume db's failback pair wrote)."""
    from replication.certs import load_identity
    from replication.control import ControlClient

    address = f"127.0.0.1:{site['mt'].port}"
    with ControlClient(address, load_identity(w.tls, "orchestrator")) as mt:
        listed = {v.name for v in mt.list_volumes()}
    produced = targets[("db", "os")].parent.name
    assert listed == {"db-os-failback"}, (listed, produced)


def reprotect(w: World, store: Path, disks: dict, site: dict) -> dict:
    """Step 1 through the CLI: a dry run moves nothing, then only the delta moves."""
    args = ["--plan", "plan1", "--master-target", "mt1", "--process-server", "ps-azure", "--json"]
    dry = cli(store, w.tls, "reprotect", *args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    estimates = {
        (e["vm"], e["disk"]): e for e in json.loads(dry.stdout)["job"]["result"]["estimates"]
    }
    assert estimates[("web", "os")]["blocks"] == 24  # exactly the blocks Azure wrote
    assert site["proxy"].bytes_up == 0
    done = cli(store, w.tls, "reprotect", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["job"]["state"] == "succeeded"
    alternate = site["datastore"] / "db-os-failback" / "db-os-failback.vmdk"
    targets = {k: (d["vmdk"] or alternate) for k, d in disks.items()}
    for key, d in disks.items():
        assert qemu_same(d["vhd"], "vpc", targets[key], "vmdk"), key
    # bytes at the proxy: the changed blocks compressed, plus one hash map per disk
    expected = 0
    for d in disks.values():
        _, compressed = delta_cost(d["now"], d["before"] if d["vmdk"] else bytes(SIZE))
        expected += compressed + 16 * (SIZE // BLOCK)
    moved = site["proxy"].bytes_up + site["proxy"].bytes_down
    assert moved <= 1.2 * expected, (moved, expected)
    return targets


def backup_lose_and_restore(w: World, store: Path) -> None:
    """The configuration server's backup, in the middle of a protected state."""
    backup = w.root / "store-backup.sqlite"
    assert cli(store, w.tls, "backup", str(backup)).returncode == 0
    for f in store.iterdir():
        f.unlink()
    restored = cli(store, w.tls, "restore", str(backup))
    assert restored.returncode == 0, restored.stderr
    status = cli(store, w.tls, "status", "--json")
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)
    assert len(rows) == 3 and {r["state"] for r in rows} == {"protected"}


def churn_and_tag(w: World, site: dict, disks: dict) -> Path:
    """Azure keeps writing (replication goes on); an app tag on db, then more writes."""
    from replication.certs import load_identity
    from replication.control import ControlClient
    from replication.wire import TagSpec

    churn(site["nbd"], "web-os", 1)
    churn(site["nbd"], "db-os", 2)
    copy = w.root / "db-os-at-tag.raw"
    copy.write_bytes(read_disk(disks[("db", "os")]["vhd"]))  # writes paused: what the tag holds
    address = f"127.0.0.1:{site['src'].port}"
    with (
        ControlClient(address, load_identity(w.tls, "orchestrator")) as azure,
        ControlClient(f"127.0.0.1:{site['mt'].port}", load_identity(w.tls, "orchestrator")) as mt,
    ):
        azure.tag(TagSpec("app", "before-upgrade", disks=("db-os",)))
        wait_for(
            lambda: any(p.tag == "before-upgrade" for p in mt.list_points("db-os-failback")),
            "the tag's point",
        )
    churn(site["nbd"], "db-os", 3)  # after the tag: in no failover of db
    status = cli(w.root / "store", w.tls, "status", "--json")
    (db,) = [r for r in json.loads(status.stdout) if r["vm"] == "db"]
    assert db["last_app"]["tag"] == "before-upgrade" and db["mode"] == "tracked"
    return copy


def failover(w: World, store: Path, disks: dict, site: dict, targets: dict, copy: Path) -> dict:
    """Step 2: web at the latest point (its writes stopped), then, with the Azure side
    gone, db at its app-consistent tag."""
    with Orchestrator(store, w.tls, poll=0.2) as o:
        job = o.failover("web-plan", point="latest", writes_stopped=True, timeout=120)
        recovered = {(r["vm"], r["disk"]): r for r in job.result["recovered"]}
        assert recovered[("web", "os")]["path"] == str(disks[("web", "os")]["vmdk"])
        site["src"].stop()  # Azure is gone: a failover to a recovery point needs only on-prem
        job = o.failover("db-plan", point="tag:before-upgrade", timeout=120)
        (db,) = job.result["recovered"]
        skipped = [c for c in job.result["checks"] if c["status"] == "skipped"]
        assert "source agent reachable" in skipped[0]["name"]
        assert {vm.phase for vm in o.vms()} == {"on-prem"}
        assert o.store.group("PGweb_Failback").vms == ("web",)
        assert o.store.plan("plan1").groups == ("PGweb", "PGdb", "PGweb_Failback", "PGdb_Failback")
    for key in (("web", "os"), ("web", "data")):
        assert qemu_same(disks[key]["vhd"], "vpc", targets[key], "vmdk"), key
    produced = Path(db["path"])
    assert produced.parent.parent == site["datastore"] and produced != targets[("db", "os")]
    assert qemu_same(copy, "raw", produced, "vmdk")  # exactly the disk at the tag
    assert not qemu_same(disks[("db", "os")]["vhd"], "vpc", produced, "vmdk")
    return {**targets, ("db", "os"): produced}


def reverse_reprotect(w: World, store: Path, disks: dict, targets: dict) -> None:
    """On-prem life, then step 3: the VMDKs replicate to the Azure disks, deltas only."""
    rng = random.Random(99)
    for key in disks:
        write_blocks(
            targets[key], {i: rng.randbytes(BLOCK) for i in rng.sample(range(SIZE // BLOCK), 8)}
        )
    expected = 0
    for key, d in disks.items():
        _, compressed = delta_cost(read_disk(targets[key]), read_disk(d["vhd"]))
        expected += compressed + 16 * (SIZE // BLOCK)
    volumes = [a for (vm, n), d in disks.items() for a in ("--volume", f"{vm}-{n}={d['vhd']}")]
    azure_mt = w.agent(
        "master-target", "--data-dir", str(w.root / "mt-azure"), *volumes, log="mt-azure.log"
    )
    ps1 = w.agent(
        "process-server",
        "--master-target",
        f"127.0.0.1:{azure_mt.port}",
        "--spool-dir",
        str(w.root / "spool1"),
        log="ps1.log",
    )
    proxy1 = w.proxy(ps1.port)
    onprem = w.agent(
        "source-agent", "--process-server", f"127.0.0.1:{proxy1.port}",
        *[a for (vm, n) in disks for a in ("--disk", f"{vm}-{n}={targets[(vm, n)]}")],
        "--control-listen", "127.0.0.1:0", "--idle", "--rescan-interval", "600",
        log="onprem-source.log",
    )  # fmt: skip
    with Orchestrator(store, w.tls, poll=0.2) as o:
        o.register_server("mt-azure", "master-target", f"127.0.0.1:{azure_mt.port}", site="azure")
        o.register_server("ps1", "process-server", f"127.0.0.1:{ps1.port}", site="on-prem")
        for vm in o.vms():
            o.register_vm(
                vm.name,
                vm.kind,
                azure_agent=vm.azure_agent,
                onprem_agent=f"127.0.0.1:{onprem.port}",
            )
        job = o.reverse_reprotect(
            plan="plan1", master_target="mt-azure", process_server="ps1", timeout=120
        )
        assert job.state == "succeeded"
        assert {vm.phase for vm in o.vms()} == {"protected-to-azure"}
        # the preflight asked the running on-prem master target: it holds none of them
        held = [c for c in job.result["checks"] if "let go of" in c["name"]]
        assert len(held) == 3 and {c["status"] for c in held} == {"passed"}, held
    for key, d in disks.items():
        assert qemu_same(d["vhd"], "vpc", targets[key], "vmdk"), key
    moved = proxy1.bytes_up + proxy1.bytes_down
    assert moved <= 1.2 * expected, (moved, expected)


# -- refusals: every preflight failure, before any byte moves ------------------------------
#
# Against real agents: each refusal leaves the target's sha256 unchanged, not one byte
# at the proxy between source agent and process server, and no pair started; it names
# its fix and is recorded as a failed job with every check. Then a kill -9 of the
# orchestrator CLI in the middle of a reprotect: the job is marked interrupted and
# running the step again completes it.

AZURE_DISKS = ("vm1-os", "snap-os", "phys-os", "kill-os", "vm2-os")


def sha256(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def raw_disk(path: Path, seed: int, data_bytes: int = 4 << 20) -> Path:
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(random.Random(seed).randbytes(data_bytes))
    return path


@pytest.fixture(scope="module")
def refusal_site(tmp_path_factory):
    """Master target (datastore + original VMDKs), process server, proxy, an idle
    bandwidth-limited source agent beside the "Azure" disks; a second master target
    whose datastore path is a regular file (a file where a directory is expected:
    we run as root, so chmod 0555 would not stop the master target)."""
    require("qemu-img")
    root = tmp_path_factory.mktemp("refusals")
    tls = init_tls(root / "tls")
    azure = {name: raw_disk(root / f"{name}.raw", n) for n, name in enumerate(AZURE_DISKS)}
    vmdks = {n: make_vmdk(root / f"{n}.vmdk", bytes(SIZE)) for n in ("vm1-os", "kill-os")}
    (root / "snap").mkdir()
    vmdks["snap-os"] = make_vmdk(root / "snap" / "base.vmdk", bytes(SIZE))
    child = root / "snap" / "child.vmdk"
    snapshot = ["create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", "child.vmdk"]
    subprocess.run([require("qemu-img"), *snapshot], check=True, timeout=30, cwd=root / "snap")
    (root / "datastore").mkdir()
    (root / "not-a-directory").write_text("a file where the datastore directory is expected\n")
    common = ["--listen", "127.0.0.1:0", "--tls-dir", str(tls)]
    agents = []
    volumes = [a for n, p in vmdks.items() for a in ("--volume", f"{n}={p}")]
    mt = start(
        replication(
            "master-target",
            *common,
            "--data-dir",
            str(root / "mt"),
            "--datastore",
            str(root / "datastore"),
            *volumes,
        ),
        root / "mt.log",
    )
    agents.append(mt)
    mt_ro = start(
        replication(
            "master-target",
            *common,
            "--data-dir",
            str(root / "mt-ro"),
            "--datastore",
            str(root / "not-a-directory"),
        ),
        root / "mt-ro.log",
    )
    agents.append(mt_ro)
    ps = start(
        replication(
            "process-server",
            *common,
            "--master-target",
            f"127.0.0.1:{mt.port}",
            "--spool-dir",
            str(root / "spool"),
        ),
        root / "ps.log",
    )
    agents.append(ps)
    proxy = FaultProxy(ps.port)
    src = start(
        replication(
            "source-agent", "--tls-dir", str(tls), "--process-server", f"127.0.0.1:{proxy.port}",
            *[a for n, p in azure.items() for a in ("--disk", f"{n}={p}")],
            "--control-listen", "127.0.0.1:0", "--idle", "--rescan-interval", "600",
            "--bandwidth-limit", "2M/s",
        ),
        root / "source.log",
    )  # fmt: skip
    agents.append(src)
    yield SimpleNamespace(
        root=root,
        tls=tls,
        azure=azure,
        vmdks=vmdks,
        child=child,
        mt=mt,
        mt_ro=mt_ro,
        ps=ps,
        proxy=proxy,
        src=src,
    )
    for a in reversed(agents):
        a.stop()
    proxy.close()


def refusal_orchestrator(site, store: Path) -> Orchestrator:
    o = Orchestrator(store, site.tls, poll=0.2)
    o.register_server(
        "mt1",
        "master-target",
        f"127.0.0.1:{site.mt.port}",
        site="on-prem",
        datastore=str(site.root / "datastore"),
    )
    o.register_server("mt-ro", "master-target", f"127.0.0.1:{site.mt_ro.port}", site="on-prem")
    o.register_server("ps-azure", "process-server", f"127.0.0.1:{site.ps.port}", site="azure")
    return o


def add_vm(
    o: Orchestrator,
    site,
    name: str,
    kind: str = "vmware-vm",
    *,
    disk: str,
    volume: str = "",
    uuid: str = "",
) -> None:
    o.register_vm(name, kind, azure_agent=f"127.0.0.1:{site.src.port}")
    original = (
        {"original_volume": volume, "original_vmdk": str(site.vmdks[volume])} if volume else {}
    )
    o.register_disk(
        name,
        "os",
        uuid=uuid or f"uuid-{name}",
        size=SIZE,
        azure_disk=disk,
        azure_path=str(site.azure[disk]),
        **original,
    )


class Unmoved:
    """Watches one refusal: the targets' sha256, the proxy's bytes, the agent's pairs."""

    def __init__(self, site, disk: str, *targets: Path) -> None:
        self.site, self.disk, self.targets = site, disk, targets
        self.hashes = sha256(*targets)
        self.proxied = site.proxy.bytes_up + site.proxy.bytes_down

    def __enter__(self) -> Unmoved:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            return
        site = self.site
        assert sha256(*self.targets) == self.hashes
        assert site.proxy.bytes_up + site.proxy.bytes_down == self.proxied
        from replication.certs import load_identity
        from replication.control import ControlClient

        with ControlClient(
            f"127.0.0.1:{site.src.port}", load_identity(site.tls, "orchestrator")
        ) as c:
            assert self.disk not in {p.disk for p in c.status().pairs}


def refused(o: Orchestrator, error, **reprotect):
    with pytest.raises(error) as caught:
        o.reprotect(
            master_target=reprotect.pop("master_target", "mt1"),
            process_server="ps-azure",
            **reprotect,
        )
    err = caught.value
    failed = [c for c in err.checks if c.status == "failed"]
    assert failed and failed[0].code == err.code and failed[0].fix, err.checks
    job = o.job(err.job_id)
    assert job.state == "failed" and job.error_code == err.code
    assert any(c["status"] == "failed" for c in job.result["checks"])
    return err


def test_a_vm_with_snapshots_is_refused_with_the_fix(refusal_site, tmp_path):
    site = refusal_site
    store = tmp_path / "store"
    with refusal_orchestrator(site, store) as o:
        add_vm(o, site, "snap", disk="snap-os", volume="snap-os")
    with Unmoved(site, "snap-os", site.vmdks["snap-os"], site.child):
        done = cli(
            store,
            site.tls,
            "reprotect",
            "snap",
            "--master-target",
            "mt1",
            "--process-server",
            "ps-azure",
        )
    assert done.returncode == DiskHasSnapshotsError.exit_status, done.stderr
    assert "disk.has_snapshots" in done.stderr and "Traceback" not in done.stderr
    assert "[FAIL] snap/os: target disk has no snapshots" in done.stdout
    assert "fix: delete or consolidate the VM's snapshots" in done.stdout


def test_an_unknown_vm_is_refused_saying_to_register_it(refusal_site, tmp_path):
    site = refusal_site
    store = tmp_path / "store"
    with refusal_orchestrator(site, store):
        pass
    with Unmoved(site, "vm1-os"):
        done = cli(
            store,
            site.tls,
            "reprotect",
            "ghost",
            "--master-target",
            "mt1",
            "--process-server",
            "ps-azure",
            "--json",
        )
    assert done.returncode == UnknownVmError.exit_status
    out = json.loads(done.stdout)
    assert out["error"]["code"] == "orchestrator.unknown_vm"
    assert "register" in out["error"]["hint"]
    assert out["job"]["state"] == "failed"


def test_an_unwritable_datastore_is_the_read_only_account_error(refusal_site, tmp_path):
    site = refusal_site
    with refusal_orchestrator(site, tmp_path / "store") as o, Unmoved(site, "phys-os"):
        add_vm(o, site, "phys", "physical", disk="phys-os")
        err = refused(o, DatastoreNotWritableError, vms=["phys"], master_target="mt-ro")
        assert "read-only" in err.hint and "vCenter" in err.hint
        assert o.store.vm("phys").phase == "in-azure"
    assert not (site.root / "datastore" / "phys-os-failback").exists()


def test_two_disks_sharing_a_uuid_are_refused(refusal_site, tmp_path):
    site = refusal_site
    with (
        refusal_orchestrator(site, tmp_path / "store") as o,
        Unmoved(site, "vm1-os", site.vmdks["vm1-os"]),
    ):
        add_vm(o, site, "vm1", disk="vm1-os", volume="vm1-os", uuid="6000C29-same")
        add_vm(o, site, "vm2", disk="vm2-os", uuid="6000c29-SAME")
        err = refused(o, DuplicateDiskUuidError, vms=["vm1"])
        assert "vm1/os" in err.message and "vm2/os" in err.message


def test_an_unreachable_master_target_is_refused(refusal_site, tmp_path):
    site = refusal_site
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with (
        refusal_orchestrator(site, tmp_path / "store") as o,
        Unmoved(site, "vm1-os", site.vmdks["vm1-os"]),
    ):
        o.register_server(
            "mt-dead", "master-target", f"127.0.0.1:{dead}", site="on-prem", fingerprint=""
        )
        add_vm(o, site, "vm1", disk="vm1-os", volume="vm1-os")
        err = refused(o, ServerUnreachableError, vms=["vm1"], master_target="mt-dead")
        assert f"127.0.0.1:{dead}" in err.message and "start the master-target" in err.hint


def test_failing_back_onto_a_physical_machine_is_unsupported(refusal_site, tmp_path):
    site = refusal_site
    with (
        refusal_orchestrator(site, tmp_path / "store") as o,
        Unmoved(site, "vm1-os", site.vmdks["vm1-os"]),
    ):
        add_vm(o, site, "phys1", "physical", disk="vm1-os", volume="vm1-os")
        err = refused(o, PhysicalTargetError, vms=["phys1"], location="original")
        assert "alternate" in err.hint


def test_failover_before_reprotect_and_latest_without_stopped_writes_are_refused(
    refusal_site, tmp_path
):
    site = refusal_site
    with (
        refusal_orchestrator(site, tmp_path / "store") as o,
        Unmoved(site, "vm1-os", site.vmdks["vm1-os"]),
    ):
        add_vm(o, site, "vm1", disk="vm1-os", volume="vm1-os")
        o.create_group("PG1", ["vm1"])
        o.create_plan("plan1", ["PG1"])
        with pytest.raises(WrongStateError) as caught:
            o.failover("plan1", writes_stopped=True)
        assert "reprotect" in caught.value.hint


def test_kill_9_of_the_orchestrator_mid_reprotect_then_the_rerun_completes(refusal_site, tmp_path):
    site = refusal_site
    store = tmp_path / "store"
    with refusal_orchestrator(site, store) as o:
        add_vm(o, site, "killme", disk="kill-os", volume="kill-os")
    args = ["reprotect", "killme", "--master-target", "mt1", "--process-server", "ps-azure"]
    common = ["--store", str(store), "--tls-dir", str(site.tls)]
    proc = subprocess.Popen(
        replication("orchestrate", args[0], *common, *args[1:]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with Orchestrator(store, site.tls) as o:
            # the pair is started and bytes are moving (2 MB/s: 4 MiB take ~2 s)
            wait_for(lambda: site.proxy.bytes_up > (512 << 10), "bytes moving", 60, every=0.05)
            assert o.jobs()[0].state == "running"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    jobs = cli(store, site.tls, "jobs", "--json")
    assert jobs.returncode == 0, jobs.stderr
    first = json.loads(jobs.stdout)[0]
    assert first["state"] == "interrupted" and "run reprotect again" in first["message"]
    started = time.monotonic()
    again = cli(store, site.tls, *args, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["job"]["state"] == "succeeded"
    assert time.monotonic() - started < 60
    assert qemu_same(site.azure["kill-os"], "raw", site.vmdks["kill-os"], "vmdk")


def reverse_site(w, volumes: dict[str, str], disks: dict[str, Path], *source_flags: str) -> dict:
    """The Azure-side master target owning ``volumes``; the on-prem process server, a
    proxy before it, and an idle source agent beside the VMDKs (as the journey's step 3),
    started with ``source_flags`` too."""
    mt = w.agent(
        "master-target", "--data-dir", str(w.root / "mt-azure"),
        *[a for n, spec in volumes.items() for a in ("--volume", f"{n}={spec}")],
        log="mt-azure.log",
    )  # fmt: skip
    ps = w.agent(
        "process-server", "--master-target", f"127.0.0.1:{mt.port}",
        "--spool-dir", str(w.root / "spool1"), log="ps1.log",
    )  # fmt: skip
    proxy = w.proxy(ps.port)
    src = w.agent(
        "source-agent", "--process-server", f"127.0.0.1:{proxy.port}",
        *[a for n, p in disks.items() for a in ("--disk", f"{n}={p}")],
        "--control-listen", "127.0.0.1:0", "--idle", "--rescan-interval", "600",
        *source_flags, log="onprem-source.log",
    )  # fmt: skip
    return {"mt": mt, "ps": ps, "proxy": proxy, "src": src}
