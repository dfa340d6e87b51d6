"""Stage ``memory``: peak resident memory of each agent during a full resync.

Read from the kernel while each process runs (``VmHWM`` polled until it exits, see
:mod:`.procs` for why not ``ru_maxrss``), from the same rounds as stage ``replicate`` (run once for
both). The baseline is the matching process of the bare relay (client, relay,
sink): what Python, gRPC and TLS cost by themselves. The goal is absolute: each
agent under 256 MiB, whatever the disk size.
"""

from __future__ import annotations

from .context import Context
from .figures import Figure, Target
from .replicate import measure

__all__ = ["run"]

TARGET = Target("value", "<", 256.0, "product issue: each agent's peak RSS < 256 MiB")
_PAIRS = (("source", "client"), ("process_server", "relay"), ("master_target", "sink"))


def run(ctx: Context) -> tuple[list[Figure], dict[str, object]]:
    """Return one figure per agent: its peak RSS (MiB, max over rounds) vs its relay peer."""
    res = measure(ctx)
    figures = []
    for role, peer in _PAIRS:
        value = max(a.max_rss[role] for a in res.agents) / 2**20
        baseline = max(r.max_rss[peer] for r in res.relays) / 2**20
        name = f"{role.replace('_', ' ')} peak RSS"
        figures.append(Figure("memory", name, "MiB", value, baseline, f"relay {peer}", TARGET))
    details = {
        "agents_max_rss": [a.max_rss for a in res.agents],
        "relay_max_rss": [r.max_rss for r in res.relays],
    }
    return figures, details
