"""The pair state table (``replication/orchestrator/pairstates.py``), the store's refusal
of any other change, the diagrams generated from the tables into docs/orchestrator.md,
and reprotect's refusal after a failover that stopped half way."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from agents.source_agent.pairs import PAIR_STATES as AGENT_PAIR_STATES
from replication import wire
from replication.cli import build_parser
from replication.errors import FailoverInterruptedError, PairStateError
from replication.orchestrator import Disk, Pair, Server, Vm, open_store
from replication.orchestrator.diagrams import render
from replication.orchestrator.journey import Journey
from replication.orchestrator.model import PHASES, TRANSITIONS
from replication.orchestrator.pairstates import (
    EVENTS,
    INITIAL,
    LIVE_STATES,
    NEW,
    PAIR_STATES,
    PAIR_TRANSITIONS,
    TERMINAL,
    exits,
)
from replication.orchestrator.preflight import Preflight

DOC = Path(__file__).parents[2] / "docs" / "orchestrator.md"
SIZE = 1 << 20


def orchestrate_verbs() -> set[str]:
    """The verbs ``replication orchestrate`` really has (read from its parser)."""

    def sub(parser: argparse.ArgumentParser) -> dict:
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices

    return set(sub(sub(build_parser("orchestrate"))["orchestrate"]))


# -- the table ------------------------------------------------------------------------


def test_the_table_names_only_its_states_and_events():
    for before, event, after in PAIR_TRANSITIONS:
        assert before in (NEW, *PAIR_STATES) and after in PAIR_STATES, (before, after)
        assert event in EVENTS
    assert len(set(PAIR_TRANSITIONS)) == len(PAIR_TRANSITIONS)  # no row twice
    assert [after for before, _, after in PAIR_TRANSITIONS if before == NEW] == [INITIAL]


def test_every_pair_state_is_reachable_from_a_new_pair():
    seen, todo = set(), [NEW]
    while todo:
        state = todo.pop()
        for before, _, after in PAIR_TRANSITIONS:
            if before == state and after not in seen:
                seen.add(after)
                todo.append(after)
    assert seen == set(PAIR_STATES)


def test_every_state_but_failed_over_has_a_way_out_that_a_cli_verb_performs():
    verbs = orchestrate_verbs()
    for event, (performed_by, what) in EVENTS.items():
        assert performed_by and set(performed_by) <= verbs, event
        assert what
    assert {"failed-over"} == TERMINAL  # a failback pair's end: the VM goes on with forward pairs
    for state in PAIR_STATES:
        if state in TERMINAL:
            assert exits(state) == []
            continue
        ways = {v for event, _ in exits(state) for v in EVENTS[event][0]}
        assert ways & verbs, f"{state} has no exit a CLI verb performs"


def test_the_live_states_are_the_ones_the_source_agent_reports():
    # the agent's "stopped" is its own word for a pair it no longer runs: never copied
    assert set(LIVE_STATES) == set(AGENT_PAIR_STATES) - {"stopped"}


# -- the store follows the table ----------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    with open_store(tmp_path / "store") as s:
        s.put_server(Server("mt1", "master-target", "127.0.0.1:9", "on-prem"))
        s.put_vm(Vm("web", "vmware-vm", azure_agent="127.0.0.1:8"))
        for name in ("data", "os"):
            s.put_disk(Disk("web", name, f"uuid-{name}", SIZE, original_volume=f"web-{name}"))
        s.put_group("PG1", ["web"])
        s.put_plan("plan1", ["PG1"])
        yield s


def record(store, *disks: str) -> None:
    pairs = [
        Pair("web", d, "failback", "127.0.0.1:8", f"web-{d}", "ps", "mt1", f"web-{d}")
        for d in disks
    ]
    store.record_started(pairs, {"web": ("failback-protected", "original")}, False)


def state(store, disk: str) -> str:
    return next(p.state for p in store.pairs("web", "failback") if p.disk == disk)


def test_the_store_refuses_a_pair_change_the_table_does_not_allow(store):
    with pytest.raises(PairStateError, match="is not recorded"):
        store.set_pair_state("web", "os", "failback", "protected", event="wait")  # no such pair
    record(store, "os")
    with pytest.raises(PairStateError) as caught:
        store.set_pair_state("web", "os", "failback", "failed-over", event="stop")
    assert caught.value.code == "orchestrator.pair_state"
    assert "stop -> stopped" in caught.value.message  # it says what is allowed
    with pytest.raises(PairStateError):  # status may copy only the agent's live states
        store.set_pair_state("web", "os", "failback", "drained", event="observe")
    assert state(store, "os") == "resyncing"
    for event, after in (("wait", "protected"), ("drain", "drained"), ("stop", "stopped")):
        store.set_pair_state("web", "os", "failback", after, event=event)
        assert state(store, "os") == after
    store.record_failover([("web", "os", "web-os", "/ds/web-os.vmdk", "7")], ["web"], "on-prem")
    assert state(store, "os") == "failed-over"


def test_a_refused_change_leaves_the_whole_transaction_undone(store):
    record(store, "data", "os")
    store.record_failover([("web", "os", "web-os", "/ds/web-os.vmdk", "7")], ["web"], "on-prem")
    with pytest.raises(PairStateError, match="nothing, it is final"):
        record(store, "os")  # a failed-over pair started again
    assert state(store, "os") == "failed-over"
    assert store.vm("web").phase == "on-prem"  # the phase change of the same call: undone
    with pytest.raises(PairStateError):  # data may fail over, os not again: neither is
        store.record_failover(
            [("web", "data", "web-data", "/y", "8"), ("web", "os", "web-os", "/x", "8")],
            ["web"],
            "on-prem",
        )
    assert {(p.disk, p.state, p.point) for p in store.pairs("web")} == {
        ("data", "resyncing", ""),
        ("os", "failed-over", "7"),
    }
    assert store.vm("web").disks[0].recovered_path == ""  # data's disk row: undone too


# -- the diagrams in the docs --------------------------------------------------------------


def test_the_diagrams_in_the_docs_are_generated_from_the_tables():
    assert DOC.read_text() == render(DOC.read_text()), "run `make docs`"


def _edges(section: str) -> set[tuple[str, str, str]]:
    """(from, event, to) of a generated section, read back from its Mermaid text."""
    text = DOC.read_text()
    body = text.split(f"<!-- BEGIN generated: {section} -->")[1].split("<!-- END generated")[0]
    names = dict(re.findall(r'state "([^"]+)" as (\S+)', body)) or {}
    label = {ident: name for name, ident in names.items()} | {"[*]": NEW}
    edges = set()
    for before, after, events in re.findall(r"^\s+(\S+) --> (\S+)(?: : (.*))?$", body, re.M):
        for event in events.split(", ") if events else [""]:
            edges.add((label[before], event, label[after]))
    return edges


def test_the_pair_diagram_draws_every_row_of_the_table_and_nothing_else():
    drawn = _edges("pair-states")
    ends = {(s, "", NEW) for s in TERMINAL}  # "--> [*]": the final states
    assert drawn == set(PAIR_TRANSITIONS) | ends


def test_the_phase_diagram_draws_every_step_of_the_phase_table():
    drawn = _edges("vm-phases")
    table = {(p, step, after) for p, steps in TRANSITIONS.items() for step, after in steps.items()}
    assert drawn == table | {(NEW, "", PHASES[0])}


# -- the re-run rules after a failover killed half way -------------------------------------


class FakeAgents:
    """The master target lists ``volumes``; every agent answers Status in its role."""

    def __init__(self, volumes: list[str]) -> None:
        self.volumes = volumes
        self.roles: list[str] = []

    def status(self, address, what, *, role):
        self.roles.append(role)
        return wire.AgentInfo(role, "test", 1)

    def client(self, address, timeout=None, *, role):
        self.roles.append(role)
        return self

    def list_volumes(self) -> list[wire.VolumeInfo]:
        return [wire.VolumeInfo(n, SIZE, "vmdk", "monolithicSparse") for n in self.volumes]


def reprotect_preflight(store, agents: FakeAgents) -> tuple[Preflight, list]:
    pf = Preflight("reprotect")
    journey = Journey(store, agents)  # type: ignore[arg-type]
    targets = journey._reprotect_targets(pf, [store.vm("web")], store.server("mt1"), None)
    return pf, targets


def test_reprotect_after_a_failover_killed_past_a_release_says_run_failover_again(store):
    record(store, "data", "os")
    for disk in ("data", "os"):  # failover drained and stopped both, then released web-data
        store.set_pair_state("web", disk, "failback", "stopped", event="stop")
    agents = FakeAgents(["web-os"])
    pf, targets = reprotect_preflight(store, agents)
    with pytest.raises(FailoverInterruptedError) as caught:
        pf.raise_if_failed()
    err = caught.value
    assert "failover of VM web was interrupted after releasing web-data" in err.message
    assert "run failover again" in err.hint and "failover plan1" in err.hint
    assert err.code == "orchestrator.failover_interrupted"
    failed = [c for c in pf.checks if c.status == "failed"]
    assert [c.code for c in failed] == ["orchestrator.failover_interrupted"]  # not "missing"
    assert [t.disk.name for t in targets] == ["os"]  # the released disk gets no target
    assert set(agents.roles) == {"source", "master-target"}


def test_reprotect_after_a_failover_stopped_before_any_release_resumes_protection(store):
    record(store, "data", "os")
    for disk in ("data", "os"):
        store.set_pair_state("web", disk, "failback", "stopped", event="stop")
    pf, targets = reprotect_preflight(store, FakeAgents(["web-data", "web-os"]))
    pf.raise_if_failed()
    assert [t.disk.name for t in targets] == ["data", "os"]
    assert any(
        c.name == "web: no failover left half done" and c.status == "passed" for c in pf.checks
    )
    record(store, "data", "os")  # and the table lets reprotect start them again
    assert {p.state for p in store.pairs("web")} == {"resyncing"}
