"""``replication bench``: our figures beside the tools they replace, measured in one run.

Every figure is measured together with its baseline on the same machine, in the
same run, from the same state (images in the page cache, no writeback in flight,
the machine otherwise quiet), because absolute numbers on a shared 2-core VM move
by 10-25 % between runs (see /work/shared/perf-limits.md). Stages:

* ``scan``: hash maps of two images (:mod:`.scan`) vs ``xxh128sum``;
* ``delta``: ``replication sync`` with 1 % and 10 % changed vs rsync through a
  daemon and ``qemu-img convert`` (:mod:`.delta`);
* ``replicate``: source agent -> process server -> master target vs a bare gRPC TLS
  relay through three processes (:mod:`.replicate`, :mod:`.relay`);
* ``memory``: each agent's peak RSS (:mod:`.memory`);
* ``rpo``: per-epoch RPO of a tracked disk written through NBD at 20 and 50 MB/s
  (:mod:`.rpo`);
* ``fan-in``: 100 sources from one generator into one process server and master
  target: concurrent streams, throughput, fairness (:mod:`.fanin`);
* ``failback``: the orchestrator's reprotect of a disk changed 1 % since failover
  through the three agents vs ``qemu-img convert -n`` and a full resync
  (:mod:`.failback`).

Images are deterministic (:mod:`.images`, fixed seeds). Results are a
:class:`BenchResult`; :mod:`.report` turns it into a table, JSON and Markdown.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import BenchConfig
    from .figures import Figure, Target
    from .stages import STAGES, BenchResult, StageResult, run_bench, select_stages

__all__ = [
    "STAGES",
    "BenchConfig",
    "BenchResult",
    "Figure",
    "StageResult",
    "Target",
    "run_bench",
    "select_stages",
]

_HOME = {
    "BenchConfig": "context",
    "Figure": "figures",
    "Target": "figures",
    "STAGES": "stages",
    "BenchResult": "stages",
    "StageResult": "stages",
    "run_bench": "stages",
    "select_stages": "stages",
}


def __getattr__(name: str) -> object:
    # lazy: the relay's processes (python -m replication.bench.relay) import this
    # package and must not pay for numpy, the disks and the stages
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
