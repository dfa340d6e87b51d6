"""``replication demo``: a failback's data path on generated disks, with a report.

Until the agents and the orchestrator exist, this is the most complete path: an
on-prem VMDK and its Azure copy (a fixed VHD) start equal (failover), the workload
then changes about 1 % of the Azure disk, and ``sync`` brings the VMDK level again
moving only the delta. Each step is checked: by our own reader, and by
``qemu-img compare`` when qemu-img is installed.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ..blocks import parse_size
from ..disks import create_disk, open_disk
from ..errors import PairFailedError
from ..launch import Launched, agent_command, launch
from ..sync import SyncOptions, SyncReport, sync_paths
from .sync_cmd import format_report

BLOCK = 65536


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run a failback data path on generated disks")
    p.add_argument(
        "--size", type=parse_size, default=parse_size("256M"), help="disk size (default 256M)"
    )
    p.add_argument(
        "--change",
        type=float,
        default=0.01,
        help="fraction of blocks the Azure workload rewrites (default 0.01)",
    )
    p.add_argument("--dir", help="work directory (default: a temporary one, removed)")
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    size = max(BLOCK * 16, args.size // BLOCK * BLOCK)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="replication-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _demo(work, size, args.change, args.seed)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


def _demo(work: Path, size: int, change: float, seed: int) -> int:
    rng = random.Random(seed)
    seed_raw = work / "failover-point.raw"
    vmdk, vhd = work / "onprem-vm.vmdk", work / "azure-vm.vhd"
    print(f"demo: work directory {work}, disk size {size >> 20} MiB\n")

    _step("1. the on-prem VM's disk at failover time (realistic content)")
    _write_content(seed_raw, size, rng)
    with create_disk(str(vmdk), size, format="vmdk", subformat="monolithicSparse") as d:
        d.flush()
    _show(sync_paths(str(seed_raw), str(vmdk)))

    _step("2. failover: the Azure copy of that disk, a fixed VHD")
    with create_disk(str(vhd), size, format="vhd", subformat="fixed") as d:
        d.flush()
    _show(sync_paths(str(seed_raw), str(vhd)))

    _step(f"3. the workload runs in Azure and rewrites {change:.1%} of the blocks")
    changed = _run_workload(vhd, size, change, rng)
    print(f"   {changed} blocks rewritten in {vhd.name}\n")

    _step("4. failback preflight (dry run, nothing written)")
    dry = sync_paths(str(vhd), str(vmdk), SyncOptions(dry_run=True, use_map_cache=False))
    print(
        f"   {dry.blocks_differing} blocks ({dry.blocks_differing * BLOCK / 2**20:.1f} MiB)"
        f" will move; {dry.blocks_total - dry.blocks_differing} are already equal\n"
    )

    _step("5. failback over the wire: source agent -> process server -> master target")
    started = time.monotonic()
    summary = _failback_through_agents(work, vhd, vmdk)
    seconds = time.monotonic() - started
    print(f"   {summary}\n")

    _step("6. verify")
    ok = _verify(vhd, vmdk)
    print(
        f"\nreport: failback of a {size >> 20} MiB disk moved {dry.blocks_differing} "
        f"changed blocks through mutual TLS, zstd and AES-GCM in {seconds:.2f} s "
        f"(agents' start-up included); target {'identical' if ok else 'DIFFERENT'}"
    )
    return 0 if ok else 1


def _failback_through_agents(work: Path, vhd: Path, vmdk: Path) -> str:
    """Run the three agents on loopback with fresh certificates; return the source's line."""
    from ..certs import init_tls_dir

    tls = work / "tls"
    init_tls_dir(tls, ["localhost"])
    agents: list[Launched] = []
    try:
        mt = launch(
            agent_command(
                "master-target",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                str(work / "mt"),
                "--tls-dir",
                str(tls),
                "--volume",
                f"onprem={vmdk}",
            ),
            work / "mt.log",
        )
        agents.append(mt)
        ps = launch(
            agent_command(
                "process-server",
                "--listen",
                "127.0.0.1:0",
                "--master-target",
                f"127.0.0.1:{mt.port}",
                "--spool-dir",
                str(work / "spool"),
                "--tls-dir",
                str(tls),
            ),
            work / "ps.log",
        )
        agents.append(ps)
        print(f"   master target on 127.0.0.1:{mt.port}, process server on 127.0.0.1:{ps.port}")
        src = subprocess.run(
            agent_command(
                "source-agent",
                "--process-server",
                f"127.0.0.1:{ps.port}",
                "--tls-dir",
                str(tls),
                "--disk",
                f"onprem={vhd}",
                "--once",
                "--deadline",
                "600",
            ),
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if src.returncode != 0:
            raise PairFailedError(f"source agent failed: {src.stderr.strip().splitlines()[-1]}")
        return src.stdout.strip()
    finally:
        for agent in agents:
            agent.stop()


def _step(title: str) -> None:
    print(title)


def _show(report: SyncReport) -> None:
    print("\n".join("   " + line for line in format_report(report).splitlines()) + "\n")


def _write_content(path: Path, size: int, rng: random.Random) -> None:
    text = b"2026-11-25T10:00:00Z app=orders level=info msg=order accepted id=%08d\n" * 64
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, BLOCK):
            kind = rng.random()
            if kind < 0.35:
                continue  # never-written area
            f.seek(off)
            f.write(rng.randbytes(BLOCK) if kind < 0.6 else (text * 20)[:BLOCK])


def _run_workload(vhd: Path, size: int, change: float, rng: random.Random) -> int:
    nblocks = size // BLOCK
    picked = rng.sample(range(nblocks), max(1, int(nblocks * change)))
    with open_disk(str(vhd), writable=True) as disk:
        for i in picked:
            disk.write(i * BLOCK + rng.randrange(0, 15) * 4096, rng.randbytes(4096))
        disk.flush()
    return len(picked)


def _verify(vhd: Path, vmdk: Path) -> bool:
    started = time.monotonic()
    with open_disk(str(vhd)) as a, open_disk(str(vmdk)) as b:
        same = all(
            a.read(off, min(4 << 20, a.virtual_size - off))
            == b.read(off, min(4 << 20, a.virtual_size - off))
            for off in range(0, a.virtual_size, 4 << 20)
        )
    print(
        f"   our readers: {'identical' if same else 'DIFFERENT'} "
        f"({time.monotonic() - started:.2f} s)"
    )
    if shutil.which("qemu-img"):
        proc = subprocess.run(
            ["qemu-img", "compare", "-f", "vpc", "-F", "vmdk", str(vhd), str(vmdk)],
            capture_output=True,
            text=True,
            check=False,
        )
        print(f"   qemu-img compare: {proc.stdout.strip() or proc.stderr.strip()}")
        same = same and proc.returncode == 0
        chk = subprocess.run(
            ["qemu-img", "check", "-f", "vmdk", str(vmdk)],
            capture_output=True,
            text=True,
            check=False,
        )
        verdict = chk.stdout.strip().splitlines()[-1] if chk.stdout.strip() else chk.stderr
        print(f"   qemu-img check: {verdict.strip()}")
        same = same and chk.returncode == 0
    else:
        print("   qemu-img compare: skipped (qemu-img not installed)")
    return same
