"""The NBD front end driven by real clients: qemu-io, qemu-img and nbdinfo (libnbd).

Each test starts :class:`~replication.nbd.NbdServer` on 127.0.0.1 (a free port) or
a Unix socket, in a thread of the test process, over a real disk (raw, or a sparse
VMDK from ``create_disk``), and records what the ``on_write`` hook saw. Disks are a
few MiB; every subprocess has a timeout. After the server stops, the disk file is
judged by ``qemu-img compare`` as well, so the VMDK written through NBD is checked by
an independent reader.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from replication.disks import Disk, create_disk
from replication.nbd import NbdServer
from tests.helpers import MiB, make_raw, qemu_compare, require, write_raw

pytestmark = [pytest.mark.oracle, pytest.mark.timeout(120)]

SIZE = 4 * MiB
K64 = 64 << 10
TIMEOUT = 60  # seconds, per subprocess


@dataclass
class Served:
    """A running server over one disk, and what its hook saw."""

    disk: Disk
    path: Path
    fmt: str
    server: NbdServer | None = None
    port: int = 0
    seen: list[tuple[int, int]] = field(default_factory=list)
    hook: Callable[[int, int], None] | None = None  # replaces the recording, if set

    @property
    def url(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/disk0"

    def on_write(self, offset: int, length: int) -> None:
        if self.hook is not None:
            self.hook(offset, length)
        else:
            self.seen.append((offset, length))

    def close(self) -> None:
        """Stop serving and close the disk (flushes a VMDK's metadata)."""
        if self.server is not None:
            self.server.stop()
        self.disk.close()


def qemu_io(url: str, *commands: str, read_only: bool = False) -> subprocess.CompletedProcess:
    args = [require("qemu-io"), "-f", "raw"] + (["-r"] if read_only else []) + [url]
    for c in commands:
        args += ["-c", c]
    return subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT)


def ok(proc: subprocess.CompletedProcess) -> str:
    """qemu-io exits 0 even when a pattern check fails: look at its output too."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "fail" not in out.lower() and "error" not in out.lower(), out
    return out


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [require("qemu-img"), *args], capture_output=True, text=True, timeout=TIMEOUT
    )


def nbdinfo(*args: str) -> dict:
    proc = subprocess.run(
        [require("nbdinfo"), "--json", *args], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def reference(writes: list[tuple[int, bytes]]) -> bytearray:
    data = bytearray(SIZE)
    for offset, chunk in writes:
        data[offset : offset + len(chunk)] = chunk
    return data


@pytest.fixture(params=["raw", "vmdk"])
def served(request, tmp_path):
    fmt = request.param
    path = tmp_path / f"disk.{fmt}"
    disk = create_disk(str(path), SIZE, format=fmt)
    s = Served(disk, path, fmt)
    s.server = NbdServer({"disk0": disk}, on_write=s.on_write)
    s.port = s.server.start("127.0.0.1", 0)
    yield s
    s.close()


def assert_disk_is(s: Served, want: bytes | bytearray, tmp_path: Path) -> None:
    """Close the disk, then let qemu-img read the file in its own format."""
    s.close()
    ref = write_raw(tmp_path / "want.raw", want)
    proc = qemu_compare(ref, s.path, s.fmt)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- writes, reads and what the hook sees ------------------------------------------------------


def test_qemu_io_write_then_read_back(served, tmp_path):
    ok(qemu_io(served.url, "write -P 0xab 0 1M", "read -P 0xab 0 1M", "read -P 0 1M 3M"))
    assert served.seen == [(0, MiB)]
    assert_disk_is(served, reference([(0, b"\xab" * MiB)]), tmp_path)


def test_write_zeroes_and_discard_through_qemu_io(served, tmp_path):
    ok(
        qemu_io(
            served.url,
            f"write -P 0xcd 0 {SIZE}",
            f"write -z 1M {K64}",  # qemu sends NBD_CMD_FLAG_NO_HOLE without -u
            f"write -z -u 3M {K64}",
            f"discard 2M {K64}",
            f"read -P 0 1M {K64}",
            f"read -P 0 2M {K64}",
            f"read -P 0 3M {K64}",
            "read -P 0xcd 0 1M",
            f"read -P 0xcd {MiB + K64} {MiB - K64}",
        )
    )
    assert served.seen == [(0, SIZE), (MiB, K64), (3 * MiB, K64), (2 * MiB, K64)]
    want = reference([(0, b"\xcd" * SIZE)] + [(m * MiB, bytes(K64)) for m in (1, 2, 3)])
    assert_disk_is(served, want, tmp_path)


def test_fua_write_is_flushed_before_its_ack(served, monkeypatch):
    order: list[object] = []
    real_flush = served.disk.flush
    monkeypatch.setattr(served.disk, "flush", lambda: (order.append("flush"), real_flush())[1])
    served.hook = lambda o, n: order.append((o, n))
    ok(qemu_io(served.url, f"write -f -P 0x11 0 {K64}"))
    assert order[:2] == [(0, K64), "flush"]


def test_hook_runs_before_the_client_gets_its_ack(served):
    entered, release = threading.Event(), threading.Event()
    on_disk_during_hook: list[bytes] = []

    def hook(offset: int, length: int) -> None:
        on_disk_during_hook.append(served.disk.read(offset, length))
        entered.set()
        assert release.wait(30)

    served.hook = hook
    args = [require("qemu-io"), "-f", "raw", served.url, "-c", f"write -P 0x77 0 {K64}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert entered.wait(30), "the hook was never called"
        # the client is stuck waiting for its ack while the hook holds the write
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(0.5)
        assert on_disk_during_hook == [bytes(K64)]  # write-ahead: the disk is unchanged yet
        release.set()
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        release.set()
        proc.kill()
    assert proc.returncode == 0, err
    assert served.disk.read(0, K64) == b"\x77" * K64


# --- qemu-img as the workload --------------------------------------------------------------------


def test_qemu_img_convert_into_and_out_of_the_export(served, tmp_path):
    ref = tmp_path / "ref.raw"
    data = make_raw(ref, SIZE, seed=5)
    proc = qemu_img("convert", "-n", "-f", "raw", "-O", "raw", str(ref), served.url)
    assert proc.returncode == 0, proc.stderr
    proc = qemu_img("compare", "-f", "raw", "-F", "raw", str(ref), served.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out.raw"
    proc = qemu_img("convert", "-f", "raw", "-O", "raw", served.url, str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == bytes(data)
    # every byte that changed was reported, and nothing outside the disk
    reported = bytearray(SIZE)
    for offset, length in served.seen:
        assert offset >= 0 and offset + length <= SIZE
        reported[offset : offset + length] = b"\x01" * length
    assert all(reported[i] for i in range(SIZE) if data[i])
    assert_disk_is(served, data, tmp_path)


def test_qemu_img_compare_notices_a_difference(served, tmp_path):
    ref = tmp_path / "ref.raw"
    make_raw(ref, SIZE, seed=6)
    assert qemu_img("convert", "-n", "-f", "raw", "-O", "raw", str(ref), served.url).returncode == 0
    ok(qemu_io(served.url, "write -P 0x5a 3M 4k"))
    proc = qemu_img("compare", "-f", "raw", "-F", "raw", str(ref), served.url)
    assert proc.returncode == 1, proc.stdout + proc.stderr


# --- what the export advertises ------------------------------------------------------------------


def test_nbdinfo_reports_size_and_features(served):
    (info,) = nbdinfo(served.url)["exports"]
    assert info["export-size"] == SIZE
    assert info["is_read_only"] is False
    for feature in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert info[feature] is True, feature
    assert info["can_fast_zero"] is False
    assert (info["block_size_minimum"], info["block_size_maximum"]) == (1, 32 * MiB)


def test_several_named_exports_and_read_only(tmp_path):
    disks = {n: create_disk(str(tmp_path / f"{n}.raw"), (i + 1) * MiB) for i, n in enumerate("ab")}
    seen: list[tuple[int, int]] = []
    server = NbdServer(disks, on_write=lambda o, n: seen.append((o, n)), read_only=True)
    port = server.start()
    try:
        listed = nbdinfo("--list", f"nbd://127.0.0.1:{port}")["exports"]
        assert {(e["export-name"], e["export-size"], e["is_read_only"]) for e in listed} == {
            ("a", MiB, True),
            ("b", 2 * MiB, True),
        }
        proc = qemu_io(f"nbd://127.0.0.1:{port}/b", "write -P 1 0 4k")
        assert proc.returncode != 0  # qemu refuses to open a read-only export for writing
        ok(qemu_io(f"nbd://127.0.0.1:{port}/b", "read -P 0 0 4k", read_only=True))
        proc = qemu_io(f"nbd://127.0.0.1:{port}/nope", "read 0 4k", read_only=True)
        assert proc.returncode != 0
    finally:
        server.stop()
        for d in disks.values():
            d.close()
    assert seen == []


# --- transports and concurrency ------------------------------------------------------------------


def test_unix_socket(tmp_path):
    disk = create_disk(str(tmp_path / "u.raw"), SIZE)
    sock = tmp_path / "nbd.sock"
    seen: list[tuple[int, int]] = []
    server = NbdServer({"disk0": disk}, on_write=lambda o, n: seen.append((o, n)))
    server.serve_unix(str(sock))
    try:
        url = f"nbd+unix:///disk0?socket={sock}"
        ok(qemu_io(url, "write -P 0x42 8k 8k", "read -P 0x42 8k 8k"))
        (info,) = nbdinfo(url)["exports"]
        assert info["export-size"] == SIZE
    finally:
        server.stop()
        disk.close()
    assert seen == [(8192, 8192)]
    assert not sock.exists()


def test_parallel_clients_and_a_hostile_one(served, tmp_path):
    # a client that sends junk after the greeting is dropped; the others carry on
    junk = socket.create_connection(("127.0.0.1", served.port))
    junk.sendall(b"\x00\x00\x00\x03" + b"NOTMAGIC" * 4)
    writers = [
        threading.Thread(target=lambda i=i: ok(qemu_io(served.url, f"write -P {i + 1} {i}M 1M")))
        for i in range(SIZE // MiB)
    ]
    for t in writers:
        t.start()
    for t in writers:
        t.join(TIMEOUT)
    assert junk.recv(100).startswith(b"NBDMAGIC")
    junk.settimeout(TIMEOUT)
    while junk.recv(100):  # the server hangs up on the junk
        pass
    junk.close()
    assert sorted(served.seen) == [(i * MiB, MiB) for i in range(SIZE // MiB)]
    assert served.server.statistics().protocol_errors == 1
    want = reference([(i * MiB, bytes([i + 1]) * MiB) for i in range(SIZE // MiB)])
    assert_disk_is(served, want, tmp_path)
