"""ReleaseVolume on a real master target (a process on loopback, mutual TLS).

The master target hands a volume's disk over to another writer: refused while a
data session is open on it, durable across a restart, a typed error for a name it
never knew or a caller that is not the orchestrator, and taken back by CreateVolume.
Judged from outside: ListVolumes, the errors a data session gets, and the bytes of
the disk file itself. Last, the orchestrator's side: reverse reprotect's preflight
reports a recovered VMDK that a master target still holds.
"""

from __future__ import annotations

import os
import queue
import time
from pathlib import Path

import grpc
import pytest

from replication import wire
from replication.applier import Applier
from replication.certs import load_identity
from replication.config import load_passphrase
from replication.control import ControlClient
from replication.errors import (
    InvalidVolumeNameError,
    PeerRoleError,
    ServerUnreachableError,
    UnknownVolumeError,
    VolumeHeldError,
    VolumeInUseError,
)
from replication.frame import FrameEncoder
from replication.orchestrator.journey import Journey
from replication.orchestrator.model import Disk, Pair, Server, Vm
from replication.orchestrator.preflight import Preflight
from replication.orchestrator.store import open_store
from replication.server import error_from_rpc
from replication.tls import secure_channel
from replication.v1 import data_pb2_grpc
from replication.volumes import VolumeRegistry, volume_disk_id
from tests.e2e.agents import Agent, init_tls, master_target, start

SIZE = 1 << 20
BS = 65536


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> Path:
    return init_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def mt(tmp_path, tls):
    """A master target owning ``reg`` (a raw file) and a datastore; stopped at the end."""
    raw = tmp_path / "reg.raw"
    raw.write_bytes(bytes(SIZE))
    (tmp_path / "datastore").mkdir()
    extra = ("--volume", f"reg={raw}", "--datastore", str(tmp_path / "datastore"))
    agents: list[Agent] = [start(master_target(tmp_path, tls, *extra), tmp_path / "mt.log")]

    def restart() -> Agent:
        agents[-1].stop()
        agents.append(start(agents[-1].args, tmp_path / "mt.log"))
        return agents[-1]

    yield agents[0], raw, restart
    for a in agents:
        a.stop()


def control(tls: Path, agent: Agent, role: str = "orchestrator") -> ControlClient:
    return ControlClient(f"127.0.0.1:{agent.port}", load_identity(tls, role), timeout=30)


def names(tls: Path, agent: Agent) -> set[str]:
    with control(tls, agent) as c:
        return {v.name for v in c.list_volumes()}


class Session:
    """An Apply stream as the process server holds one: open, one frame, then held."""

    def __init__(self, tls: Path, agent: Agent, volume: str) -> None:
        self.volume = volume
        self.encoder = FrameEncoder(load_passphrase(tls / "passphrase"), volume_disk_id(volume))
        self._out: queue.Queue = queue.Queue()
        self._channel = secure_channel(
            f"127.0.0.1:{agent.port}", load_identity(tls, "process-server")
        )
        stub = data_pb2_grpc.MasterTargetStub(self._channel)
        self._out.put(wire.OpenMsg(volume, self.encoder.session_salt, BS, SIZE, 1))
        self.call = stub.Apply(self._requests(), timeout=120)

    def _requests(self):
        while (msg := self._out.get(timeout=120)) is not None:
            yield wire.source_message_to_pb(msg)

    def write(self, seq: int, offset: int, data: bytes) -> int:
        """Send one frame; return the PERSISTED seq the master target acks."""
        self._out.put(wire.FrameMsg(seq, self.encoder.encode(seq, offset, data)))
        return wire.ack_from_pb(next(self.call)).seq

    def end(self) -> Exception | None:
        """Close our side; return the error the stream ended with, if any."""
        self._out.put(None)
        try:
            for _ in self.call:
                pass
        except grpc.RpcError as err:
            return error_from_rpc(err, "apply")
        finally:
            self._channel.close()
        return None


def released_eventually(tls: Path, agent: Agent, name: str) -> wire.VolumeInfo:
    """Release ``name``, retrying while the stream that just ended is still counted."""
    deadline = time.monotonic() + 30
    with control(tls, agent) as c:
        while True:
            try:
                return c.release_volume(name)
            except VolumeInUseError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def test_release_is_refused_while_a_session_is_open_then_the_disk_is_handed_over(mt, tls):
    agent, raw, _ = mt
    session = Session(tls, agent, "reg")
    data = os.urandom(BS)
    assert session.write(1, 3 * BS, data) == 1  # the session is open and applied
    with control(tls, agent) as c, pytest.raises(VolumeInUseError) as caught:
        c.release_volume("reg")
    assert "session open" in caught.value.message and "StopPair" in str(caught.value)
    assert "reg" in names(tls, agent)
    assert session.end() is None
    info = released_eventually(tls, agent, "reg")
    assert (info.name, info.size, info.format) == ("reg", SIZE, "raw")
    assert "reg" not in names(tls, agent)
    # the frame acknowledged before the release is in the file the new owner gets
    with open(raw, "rb") as f:
        f.seek(3 * BS)
        assert f.read(BS) == data
    # a session naming it now is refused as an unknown volume, and writes nothing
    before = raw.read_bytes()
    late = Session(tls, agent, "reg")
    with pytest.raises(grpc.RpcError):
        late.write(1, 0, os.urandom(BS))
    assert isinstance(late.end(), UnknownVolumeError)
    assert raw.read_bytes() == before
    with control(tls, agent) as c:
        assert c.release_volume("reg").name == "reg"  # released already: the same answer


def test_a_released_volume_stays_released_after_a_restart_until_taken_back(mt, tls):
    agent, raw, restart = mt
    with control(tls, agent) as c:
        c.create_volume("made", SIZE)
        assert {v.name for v in c.list_volumes()} == {"reg", "made"}
        c.release_volume("made")
        c.release_volume("reg")
    agent = restart()
    assert names(tls, agent) == set()
    with control(tls, agent) as c:
        with pytest.raises(UnknownVolumeError) as caught:
            c.list_points("reg")
        assert "released" in caught.value.message
        # CreateVolume takes them back (their disks as they are), the same size only
        assert c.create_volume("made", SIZE).size == SIZE
        assert c.create_volume("reg", SIZE).format == "raw"
    agent = restart()
    assert names(tls, agent) == {"reg", "made"}
    session = Session(tls, agent, "reg")  # replication into it works again
    assert session.write(1, 0, b"\x07" * BS) == 1
    assert session.end() is None
    assert raw.read_bytes()[:BS] == b"\x07" * BS


def test_releasing_an_unknown_or_invalid_volume_is_a_typed_error(mt, tls):
    agent, _, _ = mt
    with control(tls, agent) as c:
        with pytest.raises(UnknownVolumeError):
            c.release_volume("never-was")
        with pytest.raises(InvalidVolumeNameError):
            c.release_volume("../reg")
    assert names(tls, agent) == {"reg"}


def test_the_applier_refuses_to_let_go_of_uncommitted_frames(tmp_path):
    """The other half of "in use": frames applied, their commit not yet done."""
    raw = tmp_path / "v.raw"
    raw.write_bytes(bytes(SIZE))
    registry = VolumeRegistry({"v": raw}, None, state_dir=tmp_path)
    secret = b"s" * 32
    history = tmp_path / "history"
    with Applier(registry, tmp_path / "state.db", secret, history_dir=history) as applier:
        enc = FrameEncoder(secret, volume_disk_id("v"))
        applier.open_session("v", enc.session_salt, BS, SIZE)
        applier.apply("v", enc.session_salt, 1, enc.encode(1, 0, b"\x05" * BS))
        with pytest.raises(VolumeInUseError) as caught:
            applier.release("v")
        assert "not yet committed" in caught.value.message
        applier.commit()
        assert (history / "v").is_dir()  # the undo journal of the write above
        applier.release("v")
        registry.release("v")
        # its history is set aside: a take-back would start a new one
        assert not (history / "v").exists()
        assert len(list((tmp_path / "released-history").iterdir())) == 1
        with pytest.raises(UnknownVolumeError):
            applier.open_session("v", enc.session_salt, BS, SIZE)
    assert raw.read_bytes()[:BS] == b"\x05" * BS


@pytest.mark.parametrize("role", ["process-server", "source"])
def test_only_the_orchestrator_may_release_a_volume(mt, tls, role):
    agent, _, _ = mt
    with control(tls, agent, role) as c, pytest.raises(PeerRoleError):
        c.release_volume("reg")
    assert names(tls, agent) == {"reg"}


# -- the orchestrator's side: reverse reprotect's preflight ------------------------------


class FakeAgents:
    """Answers ListVolumes for one master target address (or fails like a dead one)."""

    def __init__(self, volumes: list[str] | None) -> None:
        self.volumes = volumes

    def client(self, address: str, timeout: float | None = None, *, role: str):
        return self

    def list_volumes(self) -> list[wire.VolumeInfo]:
        if self.volumes is None:
            raise ServerUnreachableError("master target at 127.0.0.1:9 does not answer")
        return [wire.VolumeInfo(n, SIZE, "vmdk", "monolithicSparse") for n in self.volumes]


@pytest.mark.parametrize(
    ("listed", "status"),
    [(["web-os", "other"], "failed"), (["other"], "passed"), (None, "skipped")],
)
def test_reverse_reprotect_reports_a_volume_still_held_by_a_master_target(tmp_path, listed, status):
    with open_store(tmp_path / "store") as store:
        store.put_server(Server("mt1", "master-target", "127.0.0.1:9", "on-prem"))
        store.put_vm(Vm("web", "vmware-vm", azure_agent="127.0.0.1:8"))
        store.put_disk(Disk("web", "os", "uuid-1", SIZE, original_vmdk="/x/web-os.vmdk"))
        pair = Pair("web", "os", "failback", "127.0.0.1:8", "web-os", "ps", "mt1", "web-os")
        store.record_started([pair], {"web": ("failback-protected", "original")}, True)
        store.record_failover([("web", "os", "web-os", "/x/web-os.vmdk", "7")], ["web"], "on-prem")
        pf = Preflight("reverse-reprotect")
        Journey(store, FakeAgents(listed))._check_handed_over(pf, store.vm("web"), {})
    (check,) = pf.checks
    assert check.status == status and "web-os" in check.name, check
    if status == "failed":
        assert check.code == "orchestrator.volume_held" and "release-volume" in check.fix
        with pytest.raises(VolumeHeldError):
            pf.raise_if_failed()
    else:
        pf.raise_if_failed()
