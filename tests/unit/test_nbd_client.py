"""The small NBD client against our NBD server over a real socket."""

from __future__ import annotations

import pytest

from replication.disks import create_disk, open_disk
from replication.errors import NbdProtocolError, OutOfRangeError
from replication.nbd import NbdServer
from replication.nbd.client import NbdClient

SIZE = 1 << 20


@pytest.fixture
def served(tmp_path):
    path = tmp_path / "d.raw"
    with create_disk(str(path), SIZE, format="raw") as d:
        d.flush()
    disk = open_disk(str(path), writable=True)
    seen = []
    server = NbdServer({"d": disk}, on_write=lambda off, n: seen.append((off, n)))
    port = server.start("127.0.0.1", 0)
    yield port, path, seen
    server.stop()
    disk.close()


def test_writes_are_acknowledged_after_the_hook_and_read_back(served):
    port, path, seen = served
    with NbdClient("127.0.0.1", port, "d") as c:
        assert c.size == SIZE
        c.write(4096, b"abc" * 100)
        c.flush()
        assert seen == [(4096, 300)]
        assert c.read(4096, 300) == b"abc" * 100
    assert path.read_bytes()[4096:4396] == b"abc" * 100


def test_out_of_range_and_unknown_exports_are_typed_errors(served):
    port, _path, _seen = served
    with NbdClient("127.0.0.1", port, "d") as c, pytest.raises(OutOfRangeError):
        c.write(SIZE - 10, b"x" * 20)
    with pytest.raises(NbdProtocolError, match="nope"):
        NbdClient("127.0.0.1", port, "nope")
