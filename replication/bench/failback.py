"""Stage ``failback``: reprotect of a VM whose Azure disk changed 1 % since failover,
against a full copy of that disk.

The disks: the on-prem VMDK (monolithicSparse) holds image A, as it did at
failover; its "Azure" copy, a fixed VHD, then had 1 % of its blocks rewritten
(:func:`.images.change_blocks`: half in clustered runs, half scattered, with the
images' realistic content).

Each round measures, from the same state (a fresh copy of the on-prem VMDK, the
disks in the page cache, the machine quiet):

* **reprotect**: the product's own path. A master target owning the VMDK and a
  process server on loopback with mutual TLS, a tracked source agent beside the
  VHD (``--state-dir``, ``--idle``), and the orchestrator
  (:class:`~replication.orchestrator.Orchestrator`) driving ``reprotect`` to the
  original location, as ``replication demo`` does. Timed: the reprotect job, from
  its preflight to every pair ``protected`` (the agents already run, as they do
  in a deployment; their start-up is not timed). Bytes: counted outside the
  agents by relays (:class:`~replication.netcount.ByteCounter`) on the process
  server -> master target link (the WAN from Azure to on-prem) and on the source
  -> process server link;
* **full copy**: ``qemu-img convert -n -f vpc -O vmdk`` of the VHD into the same
  existing VMDK. Its bytes are every non-zero 4 KiB of the disk (qemu-img skips
  zeros; nothing compressed): what a full copy must carry;
* **full resync**: the same reprotect into a new, empty VMDK: the product's own
  full copy, compressed and encrypted, bytes counted on the same links.

Every target is then compared with the VHD (``qemu-img compare``; our hash maps
when qemu-img is missing). A difference, or any step that fails, fails the stage:
it is reported as failed, never as a number.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from ..disks import create_disk
from ..errors import ReplicationError
from ..launch import Launched, agent_command, launch
from ..netcount import ByteCounter
from ..sync import SyncOptions, sync_paths
from .context import Context, median
from .figures import Figure, Target
from .images import change_blocks
from .replicate import tls_dir, verify_volume

__all__ = [
    "CHANGED",
    "CopyRun",
    "FailbackDisks",
    "ReprotectRun",
    "copy_round",
    "fresh_copy",
    "nonzero_bytes",
    "prepare_disks",
    "reprotect_round",
    "run",
    "same_disks",
]

#: fraction of the Azure disk's blocks written since failover
CHANGED = 0.01
VM, DISK = "vm", "os"
VOLUME = f"{VM}-{DISK}"  # the orchestrator's disk key: the agent's disk and the volume
TIME_VS_COPY = Target("ratio", "<=", 1.0, "a delta reprotect must not be slower than a full copy")
BYTES_VS_COPY = Target(
    "ratio", "<=", 0.05, "1 % of blocks changed: the delta and hash maps within 5 % of a full copy"
)
REPROTECT_TIMEOUT = 3600.0
_PAIR_TS = re.compile(r"ts=(\S+ \S+) .*?event=(pair_started|protected) ")


@dataclass(frozen=True)
class FailbackDisks:
    """The pristine on-prem VMDK, the changed Azure VHD, and what changed."""

    vmdk: Path
    vhd: Path
    changed_blocks: int
    nonzero_bytes: int  # of the VHD's data: what a full copy carries


@dataclass(frozen=True)
class ReprotectRun:
    """One measured reprotect job through the agents."""

    seconds: float  # the job: preflight, estimate, resync, every pair protected
    wan_bytes: int  # process server <-> master target, both ways
    lan_bytes: int  # source agent <-> process server, both ways
    estimate_blocks: int | None  # what the orchestrator said would move
    pair_seconds: float | None  # the source agent's log: pair started -> protected


@dataclass(frozen=True)
class CopyRun:
    """One measured full copy with qemu-img."""

    seconds: float


def run(ctx: Context) -> tuple[list[Figure], dict[str, object]]:
    """Measure reprotect, full copy and full resync ``rounds`` times; verify every target."""
    disks = prepare_disks(ctx)
    tls = tls_dir(ctx)
    d = ctx.work / "failback"
    delta: list[ReprotectRun] = []
    full: list[ReprotectRun] = []
    copies: list[CopyRun] = []
    for r in range(ctx.config.rounds):
        ctx.say(f"failback round {r + 1}/{ctx.config.rounds}: reprotect of the changed disk")
        target = fresh_copy(disks.vmdk, d / "reprotect.vmdk")
        delta.append(reprotect_round(ctx, tls, disks.vhd, target, d / "agents"))
        if ctx.tools["qemu-img"]:
            ctx.say(f"failback round {r + 1}/{ctx.config.rounds}: qemu-img full copy")
            copies.append(copy_round(ctx, disks.vhd, fresh_copy(disks.vmdk, d / "copy.vmdk")))
        ctx.say(f"failback round {r + 1}/{ctx.config.rounds}: reprotect into an empty VMDK")
        empty = _empty_vmdk(d / "empty.vmdk", ctx.size)
        full.append(reprotect_round(ctx, tls, disks.vhd, empty, d / "agents"))
    shutil.rmtree(d, ignore_errors=True)
    details = _details(disks, delta, full, copies)
    details["verified_with"] = "qemu-img compare" if ctx.tools["qemu-img"] else "our hash maps"
    return _figures(ctx, disks, delta, full, copies), details


def prepare_disks(ctx: Context) -> FailbackDisks:
    """Make (once per run) the on-prem VMDK holding A and the Azure VHD with 1 % changed."""
    cached = ctx.cache.get("failback")
    if isinstance(cached, FailbackDisks):
        return cached
    d = ctx.work / "failback-disks"
    d.mkdir(exist_ok=True)
    vmdk, vhd = d / "onprem.vmdk", d / "azure.vhd"
    ctx.say("failback: the on-prem VMDK and its Azure copy, 1 % of blocks changed")
    with create_disk(str(vmdk), ctx.size, format="vmdk", subformat="monolithicSparse") as disk:
        disk.flush()
    sync_paths(str(ctx.image("A")), str(vmdk), SyncOptions(use_map_cache=False))
    subprocess.run(["cp", "--sparse=always", str(ctx.image("A.vhd")), str(vhd)], check=True)
    changed = change_blocks(str(vhd), ctx.size, CHANGED, seed=ctx.config.seed + 10)
    disks = FailbackDisks(vmdk, vhd, len(changed), nonzero_bytes(vhd, ctx.size))
    ctx.cache["failback"] = disks
    return disks


def reprotect_round(ctx: Context, tls: Path, vhd: Path, target: Path, d: Path) -> ReprotectRun:
    """Start the three agents, run the orchestrator's reprotect of ``vhd`` onto ``target``.

    The agents are stopped before ``target`` is compared with ``vhd`` (the master
    target has closed it); a difference raises :class:`ReplicationError`.
    """
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    ctx.warm(vhd, target)
    with contextlib.ExitStack() as stack:
        site = _Site(ctx, tls, vhd, target, d, stack)
        measured = site.reprotect()
    same_disks(ctx, vhd, "vpc", target, "vmdk")
    shutil.rmtree(d, ignore_errors=True)
    return measured


def copy_round(ctx: Context, vhd: Path, target: Path) -> CopyRun:
    """Time ``qemu-img convert -n`` of ``vhd`` over the existing ``target``; compare them."""
    ctx.warm(vhd, target)
    argv = ["qemu-img", "convert", "-n", "-f", "vpc", "-O", "vmdk", str(vhd), str(target)]
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise ReplicationError(f"bench: qemu-img convert failed: {proc.stderr.strip()[-300:]}")
    same_disks(ctx, vhd, "vpc", target, "vmdk")
    target.unlink()
    return CopyRun(seconds)


class _Site:
    """The agents of one reprotect (stopped by ``stack``) and the orchestrator's set-up."""

    def __init__(
        self, ctx: Context, tls: Path, vhd: Path, target: Path, d: Path, stack: contextlib.ExitStack
    ) -> None:
        self.ctx, self.tls, self.vhd, self.target, self.dir = ctx, tls, vhd, target, d
        # a cache of its own: no hash map kept from an earlier round is reused
        env = dict(ctx.env(), REPLICATION_CACHE_DIR=str(d / "map-cache"))
        common = ("--listen", "127.0.0.1:0", "--tls-dir", str(tls))
        mt = ("--data-dir", str(d / "mt"), "--volume", f"{VOLUME}={target}")
        self.mt = self._start(stack, "mt", env, "master-target", *common, *mt)
        self.wan = stack.enter_context(contextlib.closing(ByteCounter(self.mt.port)))
        ps = ("--master-target", f"127.0.0.1:{self.wan.port}", "--spool-dir", str(d / "spool"))
        self.ps = self._start(stack, "ps", env, "process-server", *common, *ps)
        self.lan = stack.enter_context(contextlib.closing(ByteCounter(self.ps.port)))
        # tracked (--state-dir), started idle: the orchestrator's StartPair starts the pair
        source = (
            *("--tls-dir", str(tls), "--process-server", f"127.0.0.1:{self.lan.port}"),
            *("--disk", f"{VOLUME}={vhd}", "--state-dir", str(d / "cbt")),
            *("--control-listen", "127.0.0.1:0", "--idle"),
        )
        self.source = self._start(stack, "source", env, "source-agent", *source)

    def _start(self, stack: contextlib.ExitStack, name: str, env, *argv: str) -> Launched:
        agent = launch(agent_command(*argv), self.dir / f"{name}.log", timeout=120, env=env)
        stack.callback(agent.stop)
        return agent

    def reprotect(self) -> ReprotectRun:
        """Register everything, then time the reprotect job until every pair is protected."""
        from ..orchestrator import Orchestrator

        with Orchestrator(self.dir / "store", self.tls, poll=0.1) as o:
            o.register_server("mt", "master-target", f"127.0.0.1:{self.mt.port}", site="on-prem")
            o.register_server("ps", "process-server", f"127.0.0.1:{self.ps.port}", site="azure")
            o.register_vm(VM, "vmware-vm", azure_agent=f"127.0.0.1:{self.source.port}")
            o.register_disk(
                VM, DISK, uuid=str(uuid.uuid4()), azure_path=str(self.vhd),
                original_vmdk=str(self.target),
            )  # fmt: skip
            o.create_group("bench", [VM])
            o.create_plan("bench", ["bench"])
            self.ctx.wait_quiet()
            wan0, lan0 = self.wan.total, self.lan.total
            started = time.perf_counter()
            job = o.reprotect(
                plan="bench", master_target="mt", process_server="ps", timeout=REPROTECT_TIMEOUT
            )
            seconds = time.perf_counter() - started
        if job.state != "succeeded":
            raise ReplicationError(f"bench: reprotect job {job.state}: {job.error_message}")
        counts = [e.get("blocks") for e in job.result.get("estimates", [])]
        blocks = sum(counts) if counts and None not in counts else None
        pair = _pair_seconds((self.dir / "source.log").read_text(errors="replace"))
        return ReprotectRun(seconds, self.wan.total - wan0, self.lan.total - lan0, blocks, pair)


def _pair_seconds(log: str) -> float | None:
    """Seconds from the pair's start to ``protected`` in the source agent's log, if both."""
    stamps = {e: datetime.strptime(ts, "%Y-%m-%d %H:%M:%S,%f") for ts, e in _PAIR_TS.findall(log)}
    if "pair_started" in stamps and "protected" in stamps:
        return (stamps["protected"] - stamps["pair_started"]).total_seconds()
    return None


def same_disks(ctx: Context, a: Path, fa: str, b: Path, fb: str) -> None:
    """Raise unless ``a`` and ``b`` hold the same bytes: ``qemu-img compare``, else hash maps."""
    if not ctx.tools["qemu-img"]:
        verify_volume(a, b)
        return
    argv = ["qemu-img", "compare", "-f", fa, "-F", fb, str(a), str(b)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600, check=False)
    if proc.returncode != 0:
        said = (proc.stdout + proc.stderr).strip()[-300:]
        raise ReplicationError(f"bench: {b.name} differs from {a.name} (qemu-img compare: {said})")


def nonzero_bytes(path: Path, size: int, grain: int = 4096) -> int:
    """Bytes in the non-zero ``grain``-sized pieces of the first ``size`` bytes of ``path``."""
    total = 0
    chunk = 64 << 20
    with open(path, "rb") as f:
        for pos in range(0, size, chunk):
            data = np.frombuffer(f.read(min(chunk, size - pos)), dtype=np.uint8)
            full = len(data) // grain * grain
            total += int(data[:full].reshape(-1, grain).any(axis=1).sum()) * grain
            if full < len(data) and data[full:].any():
                total += len(data) - full
    return total


def fresh_copy(src: Path, dst: Path) -> Path:
    """Copy ``src`` to ``dst`` keeping its holes (a VMDK's unallocated grains cost nothing)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)
    return dst


def _empty_vmdk(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    with create_disk(str(path), size, format="vmdk", subformat="monolithicSparse") as disk:
        disk.flush()
    return path


def _figures(
    ctx: Context,
    disks: FailbackDisks,
    delta: list[ReprotectRun],
    full: list[ReprotectRun],
    copies: list[CopyRun],
) -> list[Figure]:
    sec = median([r.seconds for r in delta])
    wan = median([r.wan_bytes for r in delta])
    copy_s = median([c.seconds for c in copies])
    full_s = median([r.seconds for r in full])
    full_b = median([r.wan_bytes for r in full])
    name = f"reprotect {CHANGED:.0%} changed"
    no_qemu = None if ctx.tools["qemu-img"] else "qemu-img"
    return [
        Figure("failback", f"{name}: time", "s", sec, copy_s,
               "qemu-img convert -n -O vmdk (full copy)", TIME_VS_COPY, no_qemu,
               note=_speedup(sec, copy_s)),
        Figure("failback", f"{name}: time", "s", sec, full_s,
               "reprotect into an empty VMDK (full resync)", TIME_VS_COPY,
               note=_speedup(sec, full_s)),
        Figure("failback", f"{name}: bytes", "B", wan, disks.nonzero_bytes,
               "full copy (every non-zero 4 KiB)", BYTES_VS_COPY,
               note="PS -> MT link, both ways, counted outside the agents"),
        Figure("failback", f"{name}: bytes", "B", wan, full_b,
               "full resync on the same link", BYTES_VS_COPY),
    ]  # fmt: skip


def _speedup(value: float | None, baseline: float | None) -> str:
    if not value or baseline is None:
        return ""
    return f"speed-up {baseline / value:.1f}x"


def _details(
    disks: FailbackDisks,
    delta: list[ReprotectRun],
    full: list[ReprotectRun],
    copies: list[CopyRun],
) -> dict[str, object]:
    sec = median([r.seconds for r in delta])
    copy_s = median([c.seconds for c in copies])
    full_s = median([r.seconds for r in full])
    return {
        "changed_blocks": disks.changed_blocks,
        "nonzero_bytes": disks.nonzero_bytes,
        "speedup_vs_copy": copy_s / sec if sec and copy_s else None,
        "speedup_vs_full_resync": full_s / sec if sec and full_s else None,
        "reprotect": [asdict(r) for r in delta],
        "full_resync": [asdict(r) for r in full],
        "qemu_img_copy": [asdict(c) for c in copies],
    }
