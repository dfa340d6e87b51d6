"""The state diagrams of docs/orchestrator.md, generated from the two state tables.

``make docs`` rewrites each section between ``<!-- BEGIN generated: NAME -->`` and
``<!-- END generated: NAME -->`` with a Mermaid ``stateDiagram-v2`` of the table:
``vm-phases`` from :data:`.model.TRANSITIONS`, ``pair-states`` from
:data:`.pairstates.PAIR_TRANSITIONS`. A unit test compares the file with
:func:`render`, so a table and its picture cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from .model import IN_AZURE, PHASES, TRANSITIONS
from .pairstates import EVENTS, NEW, PAIR_STATES, PAIR_TRANSITIONS, TERMINAL

__all__ = ["SECTIONS", "pair_state_diagram", "render", "update", "vm_phase_diagram"]


def vm_phase_diagram() -> str:
    """The VM phases: which step may run in which phase, and where it leads."""
    rows = [(NEW, "", IN_AZURE)]
    for phase, steps in TRANSITIONS.items():
        rows += [(phase, step, after) for step, after in steps.items()]
    return _mermaid(PHASES, rows, ())


def pair_state_diagram() -> str:
    """The pair states: every change the store accepts, labelled by event."""
    return _mermaid(PAIR_STATES, PAIR_TRANSITIONS, sorted(TERMINAL))


def _events_legend() -> str:
    lines = ["| event | performed by | what happens |", "|---|---|---|"]
    for event, (verbs, what) in EVENTS.items():
        lines.append(f"| `{event}` | {', '.join(f'`{v}`' for v in verbs)} | {what} |")
    return "\n".join(lines)


#: section name -> its generated text
SECTIONS = {
    "vm-phases": vm_phase_diagram,
    "pair-states": lambda: pair_state_diagram() + "\n\n" + _events_legend(),
}


def render(doc: str) -> str:
    """``doc`` with every generated section rewritten from the tables."""
    for name, make in SECTIONS.items():
        begin, end = f"<!-- BEGIN generated: {name} -->", f"<!-- END generated: {name} -->"
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        if not pattern.search(doc):
            raise ValueError(f"the document has no section {begin} ... {end}")
        note = "<!-- written by `make docs` from the code's table: do not edit -->"
        body = f"{begin}\n{note}\n{make()}\n{end}"
        doc = pattern.sub(lambda _m, body=body: body, doc)
    return doc


def update(path: str | Path) -> None:
    """Rewrite the generated sections of the file at ``path``."""
    file = Path(path)
    file.write_text(render(file.read_text()))


def _mermaid(
    states: Iterable[str], rows: Iterable[tuple[str, str, str]], final: Iterable[str]
) -> str:
    """A stateDiagram-v2; edges between the same two states share one label."""
    labels: dict[tuple[str, str], list[str]] = {}
    for before, event, after in rows:
        events = labels.setdefault((before, after), [])
        if event and event not in events:
            events.append(event)
    lines = ["```mermaid", "stateDiagram-v2"]
    lines += [f'    state "{s}" as {_id(s)}' for s in states]
    for (before, after), events in labels.items():
        label = f" : {', '.join(events)}" if events else ""
        lines.append(f"    {_id(before)} --> {_id(after)}{label}")
    lines += [f"    {_id(s)} --> [*]" for s in final]
    lines.append("```")
    return "\n".join(lines)


def _id(state: str) -> str:
    """A Mermaid id: no ``-``, never a keyword (``end``...); the label keeps the name."""
    return state if state == NEW else "s_" + state.replace("-", "_")
