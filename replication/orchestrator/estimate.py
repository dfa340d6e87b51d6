"""How much a step will move, before it moves anything.

The agents decide what moves by comparing hash maps (only differing blocks, zero
blocks against an empty target cost nothing). When the orchestrator can read both
disks itself (a shared datastore, or the tests' single machine) it computes the
same comparison locally, read-only, with :mod:`replication.sync` in dry-run mode;
against a new, empty VMDK it counts the source's non-zero blocks. When it cannot,
the estimate says so and the step goes on: the agents move only the delta anyway.
A page blob (``pageblob+URL``) is reached with this process's Azure credentials.
"""

from __future__ import annotations

import os

from ..blocks import DEFAULT_BLOCK_SIZE
from ..disks import open_disk
from ..disks.pageblob import is_pageblob_spec
from ..errors import ReplicationError
from ..hashmap import compute_maps
from ..sync import SyncOptions, sync_disks
from .model import Estimate

__all__ = ["estimate_move", "reachable"]

LOCAL_METHOD = "dry run computed locally with replication.sync"
EMPTY_METHOD = "non-zero blocks of the source, against a new empty VMDK"


def estimate_move(
    vm: str, disk: str, source: str, target: str | None, block_size: int = DEFAULT_BLOCK_SIZE
) -> Estimate:
    """Blocks and bytes that differ between ``source`` and ``target`` (None: a new VMDK)."""
    if not reachable(source):
        return _unknown(vm, disk, block_size, "the source disk is not reachable from here")
    if target is not None and not reachable(target):
        return _unknown(vm, disk, block_size, "the target disk is not reachable from here")
    try:
        if target is None:
            blocks, size = _non_zero_blocks(source, block_size)
            method = EMPTY_METHOD
        else:
            blocks, size = _differing_blocks(source, target, block_size)
            method = LOCAL_METHOD
    except ReplicationError as err:
        return _unknown(vm, disk, block_size, f"could not read the disks: {err.message}")
    return Estimate(vm, disk, blocks, block_size, size, method)


def reachable(path: str) -> bool:
    """Whether the orchestrator can try to open the disk at ``path`` itself.

    A local path must exist here; a page blob is tried over the network (opening it
    may still fail: callers treat a typed error as "not readable from here").
    """
    return bool(path) and (is_pageblob_spec(path) or os.path.exists(path))


def _differing_blocks(source: str, target: str, block_size: int) -> tuple[int, int]:
    # both read-only: a dry run never writes (design S1), and the master target may
    # hold the target open for writing
    options = SyncOptions(block_size=block_size, dry_run=True, use_map_cache=False)
    with open_disk(source) as src, open_disk(target) as tgt:
        report = sync_disks(src, tgt, options)
        size = src.virtual_size
    return report.blocks_differing, min(report.blocks_differing * block_size, size)


def _non_zero_blocks(source: str, block_size: int) -> tuple[int, int]:
    with open_disk(source) as src:
        (hmap,) = compute_maps([(src, None)], block_size)
        size = src.virtual_size
    zero = hmap.zero_mask()
    blocks = int((~zero).sum())
    moved = sum(hmap.block_length(i) for i in range(len(hmap)) if not zero[i])
    return blocks, min(moved, size)


def _unknown(vm: str, disk: str, block_size: int, why: str) -> Estimate:
    return Estimate(vm, disk, None, block_size, None, f"not computed: {why}")
