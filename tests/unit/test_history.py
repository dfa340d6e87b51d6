"""Recovery history of a volume: points at consistent epoch ends only, produced disks
equal to copies taken at each point, verification that can fail."""

from __future__ import annotations

import random

import pytest

from replication.disks import create_disk, open_disk
from replication.errors import RemoteProtocolError, VerifyMismatchError
from replication.history import HistoryPolicy, VolumeHistory, parse_marker

BLOCK = 65536
SIZE = 4 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def volume(tmp_path):
    raw = tmp_path / "vol.raw"
    with create_disk(str(raw), SIZE, format="raw") as d:
        d.write(0, random.Random(1).randbytes(SIZE // 2))
        d.flush()
    disk = open_disk(str(raw), writable=True)
    clock = Clock()
    history = VolumeHistory(
        tmp_path / "journal", "vol1", disk, BLOCK, HistoryPolicy(crash_interval=60), clock=clock
    )
    yield disk, history, clock
    history.close()
    disk.close()


def write(disk, history, offset: int, data: bytes) -> None:
    history.before_write(disk, offset, len(data))
    disk.write(offset, data)
    history.after_write(offset, data, disk.read)


def epoch_end(consistent=True, tag=None) -> dict:
    return {"type": "epoch-end", "epoch": 1, "consistent": consistent, "tag": tag}


def test_points_come_only_at_consistent_epoch_ends_and_on_schedule(volume):
    disk, history, clock = volume
    write(disk, history, 0, b"a" * BLOCK)
    assert history.on_epoch_end(epoch_end(consistent=False)) is None  # a resync epoch
    first = history.on_epoch_end(epoch_end())
    assert first is not None and first.kind == "crash"
    clock.now += 10
    write(disk, history, BLOCK, b"b" * BLOCK)
    assert history.on_epoch_end(epoch_end()) is None  # the last crash point is too recent
    clock.now += 60
    assert history.on_epoch_end(epoch_end()).kind == "crash"
    tagged = history.on_epoch_end(epoch_end(tag={"kind": "app", "name": "t1", "group": "g"}))
    assert (tagged.kind, tagged.tag, tagged.group) == ("app", "t1", "g")
    assert history.find("latest-app").id == tagged.id


def test_every_point_produces_the_content_it_had(volume, tmp_path):
    disk, history, clock = volume
    rng = random.Random(7)
    copies = {}
    for _ in range(4):
        for _ in range(5):
            offset = rng.randrange(0, SIZE - 3 * BLOCK) // 512 * 512
            write(disk, history, offset, rng.randbytes(rng.choice([512, BLOCK, 3 * BLOCK])))
        clock.now += 61
        point = history.on_epoch_end(epoch_end())
        copies[point.id] = disk.read(0, SIZE)
    assert len(copies) == 4 and list(copies) == sorted(copies)
    write(disk, history, 0, b"z" * BLOCK)  # after the last point: in no copy
    for pid, expected in copies.items():
        out_path = tmp_path / f"p{pid}.vmdk"
        with create_disk(str(out_path), SIZE, format="vmdk") as out:
            history.produce(str(pid), disk, out)
        with open_disk(str(out_path)) as out:
            assert out.read(0, SIZE) == expected


def test_verification_names_a_differing_disk(volume, tmp_path):
    disk, history, _ = volume
    write(disk, history, 0, b"q" * BLOCK)
    point = history.on_epoch_end(epoch_end())
    other = tmp_path / "other.raw"
    with create_disk(str(other), SIZE, format="raw") as d:
        d.write(0, disk.read(0, SIZE))
        d.write(5 * BLOCK, b"\x01")
        d.flush()
    with open_disk(str(other)) as d, pytest.raises(VerifyMismatchError, match="block 5"):
        history.verify(d, point)
    history.verify(disk, point)  # the live volume still equals it


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b'{"type": "other"}',
        b'{"type": "epoch-end", "tag": {"kind": "x"}}',
        b"[" * 70000,
    ],
)
def test_malformed_markers_are_protocol_errors(data):
    with pytest.raises(RemoteProtocolError):
        parse_marker(data)
