"""Reverse reprotect onto an Azure page blob: a master target whose volume is a page blob.

The on-prem side is a VMDK read by a real source agent; the Azure side is a master
target (a real process, real mutual TLS) whose volume is a fixed-VHD page blob in
Azurite, started by the test (tests/azurite.py). Judged from outside the engine: the
blob is downloaded with the Azure SDK and compared with the VMDK by ``qemu-img
compare`` (``vpc`` against ``vmdk``) and read whole by libvhdi and libvmdk; its footer
bytes must be the ones it was created with; bytes are counted by a TCP proxy between
source agent and process server; allocation comes from the service's page-range list.

``qemu-img check`` cannot judge a VHD (its ``vpc`` driver has no check: exit status
63), so the two independent readers and the footer's bytes stand in for it.

First the agents alone (a full sync then a delta, ``--once`` runs), then the same
through the orchestrator's ``reverse_reprotect`` (the Azure disk registered as
``pageblob:CONTAINER/BLOB``, the master target reaching it with a connection string),
and the preflight refusals of a missing blob and of a blob too small.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
from pathlib import Path

import pytest

from replication.disks import create_disk
from replication.errors import AzureDiskMissingError, DiskSizeMismatchError
from replication.mapcache import disk_key
from replication.orchestrator import Orchestrator
from tests.azurite import KEY, download, page_ranges, upload_sparse
from tests.e2e.agents import replication
from tests.e2e.test_failback_journey import (
    BLOCK,
    cli,
    delta_cost,
    make_vhd,
    make_vmdk,
    qemu_same,
    read_disk,
    reverse_site,
    world,
    write_blocks,
)
from tests.e2e.test_replication import source_args
from tests.helpers import libyal_sha256, realistic_bytes, require
from tests.oracle.test_pageblob_azurite import azurite, container

#: fixtures imported from their modules (pytest finds them in this module's namespace)
REUSED_FIXTURES = (azurite, container, world)

pytestmark = pytest.mark.oracle

SIZE = 32 << 20  # whole MiB, above Azure's 20 MiB minimum
BLOCKS = SIZE // BLOCK
MAP_BYTES = 16 * BLOCKS  # one hash map crosses per sync (16 bytes per block)
FOOTER = 512


def footer_of(blob) -> bytes:
    return blob.download_blob(offset=SIZE, length=FOOTER).readall()


def once(w, port: int, disk: str) -> str:
    """Run ``source-agent --once`` for ``disk`` through ``127.0.0.1:port``; its output."""
    done = subprocess.run(
        replication(*source_args(w.tls, port, disk, 120)),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def judge(w, blob, vmdk: Path, footer: bytes, name: str) -> Path:
    """Download the blob; it must be the VMDK's content behind the untouched footer."""
    got = download(blob, w.root / f"{name}-downloaded.vhd")
    assert got.stat().st_size == SIZE + FOOTER
    assert qemu_same(got, "vpc", vmdk, "vmdk")
    assert libyal_sha256(got, "vhd") == libyal_sha256(vmdk, "vmdk")
    with open(got, "rb") as f:
        f.seek(SIZE)
        assert f.read() == footer  # never written: it lies outside the volume
    return got


def agents_log_clean(*logs: Path) -> None:
    """No per-request SDK chatter, and never the account key, in the agents' logs."""
    for log in logs:
        text = log.read_text(errors="replace")
        assert "Request URL" not in text and KEY not in text, log


# -- the agents alone ---------------------------------------------------------------------


def test_a_vmdk_replicates_into_a_page_blob_volume_full_then_delta(world, azurite, container):
    require("qemu-img")
    w = world
    data = realistic_bytes(SIZE, 21)
    vmdk = make_vmdk(w.root / "onprem.vmdk", bytes(data))
    spec = azurite.spec(container.container_name, "azure-os.vhd")
    create_disk(spec, SIZE, format="vhd").close()  # what `replication disk create` makes
    blob = container.get_blob_client("azure-os.vhd")
    footer = footer_of(blob)
    mt = w.agent(
        "master-target", "--data-dir", str(w.root / "mt"), "--volume", f"azure-os={spec}",
        log="mt.log",
    )  # fmt: skip
    ps = w.agent(
        "process-server", "--master-target", f"127.0.0.1:{mt.port}",
        "--spool-dir", str(w.root / "spool"), log="ps.log",
    )  # fmt: skip
    proxy = w.proxy(ps.port)

    # full sync into the empty blob: the non-zero blocks, compressed, plus the map
    nonzero, compressed = delta_cost(bytes(data), bytes(SIZE))
    out = once(w, proxy.port, f"azure-os={vmdk}")
    assert f"azure-os: {nonzero} of {BLOCKS} blocks sent" in out, out
    full = proxy.bytes_up + proxy.bytes_down
    assert full <= 1.2 * (compressed + MAP_BYTES), (full, compressed)
    judge(w, blob, vmdk, footer, "full")

    # on-prem life: 12 blocks rewritten, one block of data zeroed
    rng = random.Random(22)
    before = read_disk(vmdk)
    data_blocks = [i for i in range(BLOCKS) if before[i * BLOCK : (i + 1) * BLOCK].count(0) < BLOCK]
    zeroed, *rewritten = rng.sample(data_blocks, 13)
    write_blocks(vmdk, {**{i: rng.randbytes(BLOCK) for i in rewritten}, zeroed: bytes(BLOCK)})
    changed, compressed = delta_cost(read_disk(vmdk), before)
    assert changed == 13
    out = once(w, proxy.port, f"azure-os={vmdk}")
    assert f"azure-os: 13 of {BLOCKS} blocks sent" in out, out
    delta = proxy.bytes_up + proxy.bytes_down - full
    assert 12 * BLOCK <= delta <= 1.2 * (compressed + MAP_BYTES), (delta, compressed)
    judge(w, blob, vmdk, footer, "delta")

    # zeros are cleared, never allocated: the zeroed block left the page-range list
    lo, hi = zeroed * BLOCK, (zeroed + 1) * BLOCK
    assert not [r for r in page_ranges(blob) if r[0] < hi and lo < r[1]]
    # the volume's undo journal and manifests stay on local disk, under the data dir
    history = w.root / "mt" / "history" / "azure-os"
    assert history.is_dir() and any(p.is_file() for p in history.rglob("*"))
    for where in (w.root, Path.cwd()):
        assert not list(where.glob("pageblob*")), where  # no file named after the spec
    agents_log_clean(mt.log)


def test_the_map_cache_names_a_blob_by_its_url_whatever_the_spec(
    azurite, container, monkeypatch, tmp_path
):
    """The same blob by URL or by ``pageblob:C/B`` is one cache entry, from any directory."""
    from replication.disks import open_disk

    spec = azurite.spec(container.container_name, "cached.vhd")
    create_disk(spec, SIZE, format="vhd").close()
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    with open_disk(spec) as by_url:
        key = disk_key(by_url)
        monkeypatch.chdir(tmp_path)
        assert disk_key(by_url) == key
    with open_disk(f"pageblob:{container.container_name}/cached.vhd") as by_name:
        assert disk_key(by_name) == key
    assert key == spec  # the URL, the account in it; no working directory


# -- through the orchestrator --------------------------------------------------------------


def failed_back_vm(o: Orchestrator, site: dict, vm: str, vmdk: Path, azure_path: str, **disk):
    """Register ``vm`` as it is after its failover to on-prem (the journey's first two
    steps are test_failback_journey's): its VMDK live on-prem, its Azure disk a blob."""
    o.register_server("mt-azure", "master-target", f"127.0.0.1:{site['mt'].port}", site="azure")
    o.register_server("ps1", "process-server", f"127.0.0.1:{site['ps'].port}", site="on-prem")
    o.register_vm(vm, "vmware-vm", onprem_agent=f"127.0.0.1:{site['src'].port}")
    registered = o.register_disk(
        vm, "os", uuid=f"6000c29-{vm}-os", original_vmdk=str(vmdk), azure_path=azure_path, **disk
    )
    o.store.set_phase([vm], "on-prem", "original")
    return registered


def test_reverse_reprotect_onto_a_page_blob_through_the_orchestrator(
    world, azurite, container, monkeypatch
):
    require("qemu-img")
    w = world
    # the master target (and this orchestrator) reach the account by connection string
    monkeypatch.delenv("AZURE_STORAGE_KEY")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
    # the Azure disk as Azure left it at the failover: a fixed VHD qemu made, uploaded
    azure = realistic_bytes(SIZE, 31)
    vhd = make_vhd(w.root / "azure.vhd", bytes(azure))
    blob = container.get_blob_client("web-os.vhd")
    upload_sparse(blob, vhd)
    footer = vhd.read_bytes()[SIZE:]
    # on-prem life since: 16 blocks rewritten on the recovered VMDK
    rng = random.Random(32)
    onprem = bytearray(azure)
    for i in rng.sample(range(BLOCKS), 16):
        onprem[i * BLOCK : (i + 1) * BLOCK] = rng.randbytes(BLOCK)
    vmdk = make_vmdk(w.root / "web-os.vmdk", bytes(onprem))
    changed, compressed = delta_cost(bytes(onprem), bytes(azure))
    assert changed == 16
    azure_path = f"pageblob:{container.container_name}/web-os.vhd"
    site = reverse_site(w, {"web-os": azure_path}, {"web-os": vmdk})
    with Orchestrator(w.root / "store", w.tls, poll=0.2) as o:
        disk = failed_back_vm(o, site, "web", vmdk, azure_path)
        assert disk.size == SIZE  # read from the blob (its footer's current size)
        args = {"master_target": "mt-azure", "process_server": "ps1", "timeout": 120}
        dry = o.reverse_reprotect(["web"], dry_run=True, **args)
        (estimate,) = dry.result["estimates"]
        assert estimate["blocks"] == 16  # the orchestrator read the blob and the VMDK
        assert site["proxy"].bytes_up + site["proxy"].bytes_down == 0
        job = o.reverse_reprotect(["web"], **args)
        assert job.state == "succeeded"
        checks = {c["name"]: c["status"] for c in job.result["checks"]}
        assert checks["web/os: sizes compatible"] == "passed", checks
        assert set(checks.values()) == {"passed"}, checks
        assert o.store.vm("web").phase == "protected-to-azure"
        (pair,) = o.store.pairs("web", "forward")
        assert (pair.volume, pair.state) == ("web-os", "protected")
    judge(w, blob, vmdk, footer, "reverse")
    moved = site["proxy"].bytes_up + site["proxy"].bytes_down
    assert 16 * BLOCK <= moved <= 1.2 * (compressed + MAP_BYTES), (moved, compressed)
    agents_log_clean(site["mt"].log)


def test_reverse_reprotect_refuses_a_missing_or_too_small_page_blob(world, azurite, container):
    """Both refused by the preflight, typed, with the fix; no byte moves, no pair starts,
    the blobs untouched (a missing one is not created, a small one keeps its ETag)."""
    w = world
    name = container.container_name
    small_spec = azurite.spec(name, "small-os.vhd")
    create_disk(small_spec, SIZE // 2, format="vhd").close()
    small = container.get_blob_client("small-os.vhd")
    etag = small.get_blob_properties().etag
    vmdks = {
        n: make_vmdk(w.root / f"{n}.vmdk", bytes(realistic_bytes(SIZE, 40)))
        for n in ("gone-os", "small-os")
    }
    volumes = {"gone-os": azurite.spec(name, "gone-os.vhd"), "small-os": small_spec}
    site = reverse_site(w, volumes, vmdks)
    store = w.root / "store"
    with Orchestrator(store, w.tls, poll=0.2) as o:
        failed_back_vm(o, site, "gone", vmdks["gone-os"], volumes["gone-os"])
        failed_back_vm(o, site, "small", vmdks["small-os"], small_spec)
        assert o.store.vm("gone").disks[0].size == SIZE  # from the VMDK: no blob to read
        assert o.store.vm("small").disks[0].size == SIZE // 2  # from the blob: read first
        with pytest.raises(DiskSizeMismatchError) as caught:
            o.reverse_reprotect(["small"], master_target="mt-azure", process_server="ps1")
        err = caught.value
        failed = [c for c in err.checks if c.status == "failed"]
        assert [c.name for c in failed] == ["small/os: sizes compatible"], err.checks
        assert failed[0].code == err.code and "grow the target disk" in failed[0].fix
        assert f"({SIZE // 2} bytes) is smaller than the source ({SIZE} bytes)" in err.message
        assert o.job(err.job_id).state == "failed"
    # the missing blob, through the CLI: exit status, code, fix, no traceback
    done = cli(
        store, w.tls, "reverse-reprotect", "gone",
        "--master-target", "mt-azure", "--process-server", "ps1",
    )  # fmt: skip
    assert done.returncode == AzureDiskMissingError.exit_status, done.stdout + done.stderr
    assert "orchestrator.azure_disk_missing" in done.stderr and "Traceback" not in done.stderr
    assert re.search(r"\[FAIL\] gone/os: Azure disk is registered on 'mt-azure'", done.stdout)
    assert "gone-os.vhd" in done.stdout and "replication disk create" in done.stdout
    # nothing moved, nothing started, nothing written
    assert site["proxy"].bytes_up + site["proxy"].bytes_down == 0
    from replication.certs import load_identity
    from replication.control import ControlClient

    with ControlClient(f"127.0.0.1:{site['src'].port}", load_identity(w.tls, "orchestrator")) as c:
        assert not c.status().pairs
    assert not container.get_blob_client("gone-os.vhd").exists()
    assert small.get_blob_properties().etag == etag
    jobs = json.loads(cli(store, w.tls, "jobs", "--json").stdout)
    assert [j["state"] for j in jobs] == ["failed", "failed"]


def test_a_master_target_refuses_a_blob_snapshot_or_a_malformed_blob_as_a_volume(world):
    """Checked at start, before any network: a snapshot cannot be written."""
    w = world
    common = ["--listen", "127.0.0.1:0", "--tls-dir", str(w.tls), "--data-dir", str(w.root / "mt")]
    snapshot = (
        "pageblob+http://127.0.0.1:9/devstoreaccount1/disks/os.vhd?snapshot=2024-05-01T10:00:00Z"
    )
    for volume, code, says in (
        (f"os={snapshot}", "config.invalid", "is a blob snapshot, which cannot be written"),
        ("os=pageblob:disks", "usage.invalid", "expected pageblob:CONTAINER/BLOB"),
    ):
        done = subprocess.run(
            replication("master-target", *common, "--volume", volume),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert code in done.stderr and says in done.stderr and "Traceback" not in done.stderr
