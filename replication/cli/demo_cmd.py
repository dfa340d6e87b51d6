"""``replication demo``: the whole failback journey on loopback, with a report.

A synthetic VMware VM with two disks of realistic content is protected to "Azure"
(fixed VHDs) and failed over; its workload then writes in Azure through the source
agent's NBD front end. The failback runs with the real agents and the orchestrator
(:class:`replication.orchestrator.Orchestrator`), exactly as an operator would:

1. reprotect Azure -> on-prem, original location: a dry run estimates the delta,
   then only the delta moves into the original VMDKs;
2. failover to on-prem at the latest point (the Azure writes stopped first);
3. on-prem life, then reverse reprotect on-prem -> Azure: deltas only again.

Bytes are counted on the wire by a relay between each source agent and its process
server (outside the agents). At the end every disk pair is compared: by our readers
and by ``qemu-img compare`` when qemu-img is installed.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..blocks import parse_size
from ..disks import create_disk, open_disk
from ..errors import UsageError
from ..launch import Launched, agent_command, launch
from ..netcount import ByteCounter
from ..sync import sync_paths
from ..verify import VerifyOptions, verify_paths

BLOCK = 65536
VM = "app01"
#: nothing writes the disks when they are compared: no re-check delay needed
_ONE_PASS = VerifyOptions(recheck_delay=0.0)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole failback journey on generated disks")
    p.add_argument(
        "--size", type=parse_size, default=parse_size("256M"), help="OS disk size (default 256M)"
    )
    p.add_argument(
        "--change",
        type=float,
        default=0.01,
        help="fraction of blocks the workload rewrites in Azure (default 0.01)",
    )
    p.add_argument("--dir", help="work directory (default: a temporary one, removed)")
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.change <= 0.5:
        raise UsageError("--change must be in (0, 0.5]")
    size = max(BLOCK * 64, args.size // BLOCK * BLOCK)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="replication-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    demo = Demo(work, {"os": size, "data": max(BLOCK * 32, size // 2 // BLOCK * BLOCK)})
    try:
        return demo.run(args.change, random.Random(args.seed))
    finally:
        demo.stop_all()
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


@dataclass
class Row:
    step: str
    seconds: float
    bytes_moved: int | None
    note: str


@dataclass
class Demo:
    work: Path
    sizes: dict[str, int]
    agents: list[Launched] = field(default_factory=list)
    counters: list[ByteCounter] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)

    # --- the journey ----------------------------------------------------------------------

    def run(self, change: float, rng: random.Random) -> int:
        from ..certs import init_tls_dir

        total = sum(self.sizes.values())
        print(f"demo: VM {VM}, disks {self._sizes_text()}, work directory {self.work}\n")
        self.tls = self.work / "tls"
        init_tls_dir(self.tls, ["localhost"])
        self.vmdk = {d: self.work / f"onprem-{VM}-{d}.vmdk" for d in self.sizes}
        self.vhd = {d: self.work / f"azure-{VM}-{d}.vhd" for d in self.sizes}
        self._timed("0. on-prem VM, protected to Azure and failed over", self._prepare, rng)
        self._start_failback_sites()
        self._timed(
            f"1. Azure workload rewrites {change:.1%} of the blocks", self._azure_work, change, rng
        )
        self._reprotect()
        self._failover()
        self._timed("3. on-prem life: the VM writes", self._onprem_work, change / 2, rng)
        self._reverse_reprotect()
        ok = self._verify()
        self._report(total, ok)
        return 0 if ok else 1

    def _prepare(self, rng: random.Random) -> str:
        from ..bench.images import write_image

        for disk, size in self.sizes.items():
            raw = self.work / f"{disk}.raw"
            write_image(str(raw), size, seed=rng.randrange(1 << 30))
            for path, fmt, sub in (
                (self.vmdk[disk], "vmdk", "monolithicSparse"),
                (self.vhd[disk], "vhd", "fixed"),
            ):
                with create_disk(str(path), size, format=fmt, subformat=sub) as d:
                    d.flush()
                sync_paths(str(raw), str(path))
            raw.unlink()
        return "VMDKs and their Azure copies (fixed VHDs) are equal"

    def _start_failback_sites(self) -> None:
        datastore = self.work / "datastore"
        datastore.mkdir(exist_ok=True)
        volumes = [a for d in self.sizes for a in ("--volume", f"{VM}-{d}={self.vmdk[d]}")]
        self.mt = self._agent(
            "mt-onprem", "master-target", "--listen", "127.0.0.1:0", "--data-dir",
            str(self.work / "mt"), "--datastore", str(datastore), *volumes,
        )  # fmt: skip
        self.ps = self._agent(
            "ps-azure", "process-server", "--listen", "127.0.0.1:0", "--master-target",
            f"127.0.0.1:{self.mt.port}", "--spool-dir", str(self.work / "spool"),
        )  # fmt: skip
        self.wire = ByteCounter(self.ps.port)
        self.counters.append(self.wire)
        self.azure = self._agent(
            "source-azure", "source-agent", "--process-server", f"127.0.0.1:{self.wire.port}",
            *[a for d in self.sizes for a in ("--disk", f"{VM}-{d}={self.vhd[d]}")],
            "--state-dir", str(self.work / "cbt"), "--nbd-listen", "127.0.0.1:0",
            "--control-listen", "127.0.0.1:0", "--idle",
        )  # fmt: skip
        self.nbd = self._nbd_port(self.azure)
        self.datastore = datastore

    def _azure_work(self, change: float, rng: random.Random) -> str:
        from ..nbd.client import NbdClient

        blocks = 0
        for disk, size in self.sizes.items():
            with NbdClient("127.0.0.1", self.nbd, f"{VM}-{disk}") as nbd:
                for i in rng.sample(range(size // BLOCK), max(1, int(size // BLOCK * change))):
                    nbd.write(i * BLOCK, rng.randbytes(BLOCK // 2) + bytes(BLOCK // 2))
                    blocks += 1
                nbd.flush()
        return f"{blocks} blocks written through the source agent's NBD front end"

    def _reprotect(self) -> None:
        from ..orchestrator import Orchestrator

        self.store = self.work / "store"
        with Orchestrator(self.store, self.tls, poll=0.2) as o:
            o.register_server(
                "mt-onprem", "master-target", f"127.0.0.1:{self.mt.port}", site="on-prem",
                datastore=str(self.datastore),
            )  # fmt: skip
            o.register_server("ps-azure", "process-server", f"127.0.0.1:{self.ps.port}",
                              site="azure")  # fmt: skip
            o.register_vm(VM, "vmware-vm", azure_agent=f"127.0.0.1:{self.azure.port}")
            for disk in self.sizes:
                o.register_disk(
                    VM, disk, uuid=str(uuid.uuid4()), azure_path=str(self.vhd[disk]),
                    original_vmdk=str(self.vmdk[disk]),
                )  # fmt: skip
            o.create_group("PG1", [VM])
            o.create_plan("plan1", ["PG1"])
            started = time.monotonic()
            dry = o.reprotect(
                plan="plan1", master_target="mt-onprem", process_server="ps-azure", dry_run=True
            )
            estimate = sum(e.get("blocks", 0) for e in dry.result.get("estimates", []))
            self.rows.append(
                Row("2a. reprotect preflight + dry run", time.monotonic() - started,
                    self.wire.total, f"{estimate} blocks will move; nothing moved")
            )  # fmt: skip
            print(f"2a. preflight passed; {estimate} blocks will move (dry run)")
            before, started = self.wire.total, time.monotonic()
            o.reprotect(plan="plan1", master_target="mt-onprem", process_server="ps-azure")
            moved = self.wire.total - before
            self.rows.append(
                Row("2b. reprotect Azure -> on-prem (original VMDKs)",
                    time.monotonic() - started, moved, "deltas only; pairs protected")
            )  # fmt: skip
            print(f"2b. reprotected: {moved / 2**20:.2f} MiB on the wire")

    def _failover(self) -> None:
        from ..orchestrator import Orchestrator

        started = time.monotonic()
        with Orchestrator(self.store, self.tls, poll=0.2) as o:
            # the Azure VM is shut down by the failover (we stopped writing above)
            job = o.failover("plan1", point="latest", writes_stopped=True, timeout=600)
        points = ", ".join(
            f"{r['disk']}: {Path(r['path']).name}" for r in job.result.get("recovered", [])
        )
        self.rows.append(
            Row("2c. failover to on-prem (latest)", time.monotonic() - started, None, points)
        )
        print(f"2c. failed over at the latest point: {points}")
        for agent in (self.azure, self.ps, self.mt):
            agent.stop()  # Azure is gone; the master target hands the VMDKs to the VM

    def _onprem_work(self, change: float, rng: random.Random) -> str:
        blocks = 0
        for disk, size in self.sizes.items():
            with open_disk(str(self.vmdk[disk]), writable=True) as d:
                for i in rng.sample(range(size // BLOCK), max(1, int(size // BLOCK * change))):
                    d.write(i * BLOCK, rng.randbytes(4096) * 16)
                    blocks += 1
                d.flush()
        return f"{blocks} blocks written to the on-prem VMDKs"

    def _reverse_reprotect(self) -> None:
        from ..orchestrator import Orchestrator

        volumes = [a for d in self.sizes for a in ("--volume", f"{VM}-{d}={self.vhd[d]}")]
        mt = self._agent(
            "mt-azure", "master-target", "--listen", "127.0.0.1:0", "--data-dir",
            str(self.work / "mt-azure"), *volumes,
        )  # fmt: skip
        ps = self._agent(
            "ps-onprem", "process-server", "--listen", "127.0.0.1:0", "--master-target",
            f"127.0.0.1:{mt.port}", "--spool-dir", str(self.work / "spool-onprem"),
        )  # fmt: skip
        wire = ByteCounter(ps.port)
        self.counters.append(wire)
        onprem = self._agent(
            "source-onprem", "source-agent", "--process-server", f"127.0.0.1:{wire.port}",
            *[a for d in self.sizes for a in ("--disk", f"{VM}-{d}={self.vmdk[d]}")],
            "--control-listen", "127.0.0.1:0", "--idle", "--rescan-interval", "600",
        )  # fmt: skip
        started = time.monotonic()
        with Orchestrator(self.store, self.tls, poll=0.2) as o:
            o.register_server("mt-azure", "master-target", f"127.0.0.1:{mt.port}", site="azure")
            o.register_server("ps-onprem", "process-server", f"127.0.0.1:{ps.port}",
                              site="on-prem")  # fmt: skip
            vm = next(v for v in o.vms() if v.name == VM)
            o.register_vm(VM, vm.kind, azure_agent=vm.azure_agent,
                          onprem_agent=f"127.0.0.1:{onprem.port}")  # fmt: skip
            o.reverse_reprotect(
                plan="plan1", master_target="mt-azure", process_server="ps-onprem", timeout=600
            )
        self.rows.append(
            Row("4. reverse reprotect on-prem -> Azure", time.monotonic() - started,
                wire.total, "deltas only; pairs protected")
        )  # fmt: skip
        print(f"4. reverse reprotected: {wire.total / 2**20:.2f} MiB on the wire")
        self.stop_all()  # the VHDs are compared below: nothing may write them meanwhile

    # --- checks and report ----------------------------------------------------------------

    def _verify(self) -> bool:
        ok = True
        for disk in self.sizes:
            # the product's own check: hash maps, then a byte re-check of any difference
            same = verify_paths(str(self.vmdk[disk]), str(self.vhd[disk]), _ONE_PASS).equal
            verdict = "identical" if same else "DIFFERENT"
            if shutil.which("qemu-img"):
                proc = subprocess.run(
                    ["qemu-img", "compare", "-q", "-f", "vmdk", "-F", "vpc",
                     str(self.vmdk[disk]), str(self.vhd[disk])],
                    capture_output=True, timeout=600, check=False,
                )  # fmt: skip
                same = same and proc.returncode == 0
                verdict += f"; qemu-img compare: {'identical' if proc.returncode == 0 else 'DIFF'}"
            print(f"5. verify {disk}: our readers: {verdict}")
            ok = ok and same
        return ok

    def _report(self, total: int, ok: bool) -> None:
        print(f"\nreport: VM {VM}, {len(self.sizes)} disks, {total / 2**20:.0f} MiB in all")
        print(f"  {'step':<48} {'time':>8} {'on the wire':>14}  note")
        for r in self.rows:
            moved = "-" if r.bytes_moved is None else f"{r.bytes_moved / 2**20:.2f} MiB"
            print(f"  {r.step:<48} {r.seconds:>7.2f}s {moved:>14}  {r.note}")
        print(f"  final check: every disk pair {'IDENTICAL' if ok else 'DIFFERENT'}")

    # --- plumbing -------------------------------------------------------------------------

    def _timed(self, title: str, fn, *args) -> None:
        started = time.monotonic()
        note = fn(*args)
        self.rows.append(Row(title, time.monotonic() - started, None, note))
        print(f"{title}: {note}")

    def _agent(self, name: str, role: str, *args: str) -> Launched:
        agent = launch(
            agent_command(role, "--tls-dir", str(self.tls), *args),
            self.work / f"{name}.log",
            timeout=120,
        )
        self.agents.append(agent)
        return agent

    def _nbd_port(self, agent: Launched) -> int:
        import re

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = re.findall(rb"event=nbd_listening port=(\d+)", agent.log.read_bytes())
            if found:
                return int(found[-1])
            time.sleep(0.05)
        raise UsageError(f"the source agent did not start its NBD front end: see {agent.log}")

    def _sizes_text(self) -> str:
        return ", ".join(f"{d} {s >> 20} MiB" for d, s in self.sizes.items())

    def stop_all(self) -> None:
        for agent in reversed(self.agents):
            agent.stop()
        self.agents.clear()
        for counter in self.counters:
            counter.close()
        self.counters.clear()
