"""``status``: one row per pair the orchestrator started, with what the agents say now.

The stored state says how far the journey got (``resyncing``, ``protected``,
``drained``, ``stopped``, ``failed-over``); the live columns come from the source
agent's ``Control.Status`` (state, mode, RPO, blocks still to send) and the master
target's ``ListPoints`` (the newest crash- and app-consistent points). An agent
that does not answer makes its rows ``unreachable``, never the whole table fail.
"""

from __future__ import annotations

from typing import Any

from .. import wire
from ..errors import ReplicationError
from .clients import SOURCE, Agents
from .model import Pair
from .pairstates import LIVE_STATES, OBSERVE
from .store import Store

__all__ = ["pair_rows", "render_table"]


def pair_rows(store: Store, agents: Agents) -> list[dict[str, Any]]:
    """Every pair of the store with its live state; refreshes the stored state."""
    statuses: dict[str, wire.AgentInfo | str] = {}
    rows = []
    for pair in store.pairs():
        live = _live(agents, statuses, pair)
        points = _points(store, agents, pair)
        rows.append(_row(pair, live, points))
        if _refresh(pair, live):
            store.set_pair_state(
                pair.vm,
                pair.disk,
                pair.direction,
                live.state,  # type: ignore[union-attr]
                event=OBSERVE,
            )
    return rows


def _refresh(pair: Pair, live: wire.PairInfo | str) -> bool:
    """Whether the live state should replace the stored one (the stored states that
    are the orchestrator's own, drained and after, stay)."""
    if not isinstance(live, wire.PairInfo) or live.state == pair.state:
        return False
    return pair.state in LIVE_STATES and live.state in LIVE_STATES


def _live(agents: Agents, cache: dict, pair: Pair) -> wire.PairInfo | str:
    """The agent's pair, or a word: ``unreachable``, ``not running``."""
    if pair.source_agent not in cache:
        try:
            cache[pair.source_agent] = agents.status(pair.source_agent, "source agent", role=SOURCE)
        except ReplicationError:
            cache[pair.source_agent] = "unreachable"
    info = cache[pair.source_agent]
    if isinstance(info, str):
        return info
    found = next((p for p in info.pairs if p.disk == pair.source_disk), None)
    return found if found is not None else "not running"


def _points(store: Store, agents: Agents, pair: Pair) -> list[wire.PointMsg]:
    try:
        mt = store.server(pair.master_target)
        return agents.client(mt.address, 10.0, role=mt.role).list_points(pair.volume)
    except ReplicationError:
        return []


def _row(pair: Pair, live: wire.PairInfo | str, points: list[wire.PointMsg]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "vm": pair.vm,
        "disk": pair.disk,
        "direction": pair.direction,
        "source_agent": pair.source_agent,
        "source_disk": pair.source_disk,
        "master_target": pair.master_target,
        "volume": pair.volume,
        "stored_state": pair.state,
        "point": pair.point,
    }
    if isinstance(live, wire.PairInfo):
        row.update(
            state=live.state,
            mode=live.mode,
            rpo_seconds=round(live.rpo_seconds, 3),
            backlog_blocks=max(0, live.blocks_total - live.blocks_done),
            error=live.error,
        )
    else:
        row.update(state=live, mode="", rpo_seconds=None, backlog_blocks=None, error="")
    row["last_crash"] = _last(points, "crash")
    row["last_app"] = _last(points, "app")
    return row


def _last(points: list[wire.PointMsg], kind: str) -> dict[str, Any] | None:
    found = [p for p in points if p.kind == kind]
    if not found:
        return None
    p = max(found, key=lambda p: (p.time, p.id))
    return {"id": p.id, "time": p.time, "tag": p.tag, "group": p.group}


def render_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table."""
    head = ["VM", "DISK", "DIR", "STATE", "MODE", "RPO", "BACKLOG", "LAST CRASH", "LAST APP"]
    body = [
        [
            r["vm"],
            r["disk"],
            r["direction"],
            r["state"]
            if r["state"] == r["stored_state"]
            else f"{r['state']} ({r['stored_state']})",
            r["mode"] or "-",
            "-" if r["rpo_seconds"] is None else f"{r['rpo_seconds']:.1f}s",
            "-" if r["backlog_blocks"] is None else str(r["backlog_blocks"]),
            _point_text(r["last_crash"]),
            _point_text(r["last_app"]),
        ]
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=True)]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [head, *body]
    )


def _point_text(point: dict[str, Any] | None) -> str:
    if point is None:
        return "-"
    import datetime as dt

    when = dt.datetime.fromtimestamp(point["time"], dt.UTC).strftime("%H:%M:%S")
    return f"#{point['id']} {when}" + (f" {point['tag']}" if point["tag"] else "")
