"""Azure page blobs as disks, against Azurite started by the test (loopback, in memory).

Judged from outside the engine: blobs are set up and read back with the Azure SDK
directly (never through ``PageBlobDisk``), downloaded blobs are compared with
``qemu-img compare``, and allocation is read from the service's page-range list.
Azurite is trusted for the data plane and plain page-range lists only (see
shared/oracles.md §5): no snapshot diff is used anywhere.
"""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import uuid
from pathlib import Path

import pytest

from replication.disks import open_disk
from replication.disks.pageblob import MAX_CALL, PAGE, parse_spec
from replication.disks.vhd_format import build_footer
from replication.errors import (
    ConfigError,
    CorruptHeaderError,
    DiskIOError,
    DiskReadOnlyError,
    OutOfRangeError,
    UnsupportedFormatError,
    UsageError,
)
from replication.hashmap import compute_maps
from replication.sync import sync_paths
from tests.azurite import KEY, Azurite, download, page_ranges, upload_sparse
from tests.e2e.agents import replication
from tests.e2e.test_source_daemon import relay  # noqa: F401 - the fixture, reused
from tests.helpers import make_raw, qemu_compare, qemu_convert, require, run

pytestmark = pytest.mark.oracle

SIZE = 32 << 20  # a whole number of MiB, above Azure's 20 MiB minimum; relay's volume size
MiB = 1 << 20


@pytest.fixture(scope="module")
def azurite(tmp_path_factory):
    with Azurite(tmp_path_factory.mktemp("azurite")) as az:
        yield az


@pytest.fixture
def container(azurite, monkeypatch):
    """A fresh container; the engine reaches Azurite with the development key."""
    monkeypatch.setenv("AZURE_STORAGE_KEY", KEY)
    for name in ("AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING"):
        monkeypatch.delenv(name, raising=False)
    name = f"t{uuid.uuid4().hex[:12]}"
    client = azurite.service().get_container_client(name)
    client.create_container()
    yield client
    client.close()


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        replication(*args), capture_output=True, text=True, timeout=120, env=env, check=False
    )


def vhd_image(tmp: Path, seed: int) -> tuple[Path, Path]:
    """A realistic raw image and the fixed VHD qemu makes of it (raw + 512-byte footer)."""
    raw = tmp / f"image{seed}.raw"
    make_raw(raw, SIZE, seed=seed)
    vhd = tmp / f"image{seed}.vhd"
    qemu_convert(raw, vhd, "vpc", "subformat=fixed", "force_size=on")
    assert vhd.stat().st_size == SIZE + 512
    return raw, vhd


def read_all(disk) -> bytes:
    return b"".join(
        disk.read(o, min(MiB, disk.virtual_size - o)) for o in range(0, disk.virtual_size, MiB)
    )


def test_spec_syntax_without_a_service():
    s = parse_spec("pageblob+https://acct.blob.core.windows.net/disks/vm1/os.vhd?format=vhd")
    assert (s.container, s.blob, s.format, s.sas) == ("disks", "vm1/os.vhd", "vhd", None)
    assert s.display == "pageblob+https://acct.blob.core.windows.net/disks/vm1/os.vhd"
    s = parse_spec("pageblob+http://127.0.0.1:10000/devstoreaccount1/c1/b?sv=1&sig=SECRET")
    assert (s.container, s.blob, s.sas) == ("c1", "b", "sv=1&sig=SECRET")
    assert "SECRET" not in s.display
    s = parse_spec("pageblob:c1/b?snapshot=2024-01-01T00:00:00Z")
    assert (s.container, s.blob, s.snapshot) == ("c1", "b", "2024-01-01T00:00:00Z")
    for bad in ("pageblob+http://127.0.0.1:1/acct/c", "pageblob:c", "pageblob:c/b?format=vmdk"):
        with pytest.raises(UsageError):
            parse_spec(bad)


def test_a_vhd_blob_opens_as_a_fixed_vhd_and_reads_as_qemu_made_it(azurite, container, tmp_path):
    require("qemu-img")
    raw, vhd = vhd_image(tmp_path, seed=11)
    blob = container.get_blob_client("os.vhd")
    uploaded = upload_sparse(blob, vhd)
    spec = azurite.spec(container.container_name, "os.vhd")
    expected = raw.read_bytes()
    with open_disk(spec) as disk:
        assert (disk.format_name, disk.virtual_size) == ("vhd", SIZE)
        assert read_all(disk) == expected
        # extents are the service's allocated pages (coalesced), the footer left out
        data = [(e.offset, e.end) for e in disk.extents() if not e.zero]
        assert data == [(s, min(e, SIZE)) for s, e in uploaded if s < SIZE]
        zero_bytes = sum(e.length for e in disk.extents() if e.zero)
        assert zero_bytes > SIZE // 10  # the image has holes: the hash map skips them
        info = disk.info()
        assert (info.format, info.subformat, info.extra["creator_app"]) == ("vhd", "fixed", "qem2")
    with open_disk(spec + "?format=raw") as disk:  # the same blob as raw: footer included
        assert disk.virtual_size == SIZE + 512
        assert disk.read(SIZE, 512) == vhd.read_bytes()[SIZE:]
    # the connection-string form reaches the same blob
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("AZURE_STORAGE_KEY")
        mp.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string)
        with open_disk(f"pageblob:{container.container_name}/os.vhd") as disk:
            assert disk.read(0, 4096) == expected[:4096]
    out = cli("disk", "info", spec, "--json", env=azurite.env())
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["virtual_size"] == SIZE


def test_sync_a_vmdk_into_a_vhd_blob_and_back(azurite, container, tmp_path):
    require("qemu-img")
    raw = tmp_path / "src.raw"
    data = make_raw(raw, SIZE, seed=12)
    src = tmp_path / "src.vmdk"
    qemu_convert(raw, src, "vmdk")
    spec = azurite.spec(container.container_name, "target.vhd")
    blob = container.get_blob_client("target.vhd")
    env = azurite.env()
    out = cli("disk", "create", spec, str(SIZE), "--format", "vhd", env=env)
    assert out.returncode == 0, out.stderr
    footer = blob.download_blob(offset=SIZE, length=512).readall()

    first = _sync(src, spec, env)
    assert first["bytes_written"] > 0
    got = download(blob, tmp_path / "blob.vhd")
    assert qemu_compare(raw, got, "vpc").returncode == 0
    assert got.read_bytes()[SIZE:] == footer  # writes never reach the footer
    # zeros were never allocated: only blocks holding data (plus the footer) have pages
    allocated = sum(e - s for s, e in page_ranges(blob))
    nonzero = sum(1 for o in range(0, SIZE, 65536) if any(data[o : o + 65536]))
    assert allocated <= nonzero * 65536 + 512

    # unchanged: the ETag generation lets the kept map be trusted; nothing written
    again = sync_paths(str(src), spec)
    assert (again.target_map, again.bytes_written) == ("cached", 0)
    # a foreign write changes the ETag: the map is recomputed and the block repaired
    blob.upload_page(random.Random(3).randbytes(4096), offset=5 * MiB, length=4096)
    repaired = sync_paths(str(src), spec)
    assert (repaired.target_map, repaired.blocks_differing) == ("computed", 1)
    assert qemu_compare(raw, download(blob, tmp_path / "blob2.vhd"), "vpc").returncode == 0

    # the blob as a source, into a fresh VMDK
    dst = tmp_path / "dst.vmdk"
    run(require("qemu-img"), "create", "-q", "-f", "vmdk", dst, str(SIZE))
    back = _sync(spec, dst, env)
    assert back["bytes_written"] > 0
    assert qemu_compare(raw, dst, "vmdk").returncode == 0


def _sync(source, target, env) -> dict:
    out = cli("sync", str(source), str(target), "--json", env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_unaligned_writes_and_zeroes_with_bounded_calls(azurite, container):
    size = 12 * MiB
    blob = container.get_blob_client("raw")
    blob.create_page_blob(size)
    model = bytearray(size)
    spec = azurite.spec(container.container_name, "raw")
    calls: list[tuple[str, int, int]] = []
    with open_disk(spec, writable=True) as disk:
        _spy(disk._client, calls)
        rng = random.Random(7)
        ops = [
            ("w", 0, 1),
            ("w", 510, 3),  # across a page edge
            ("w", 700, 20),  # inside one page
            ("w", 4 * MiB - 3, 5 * MiB + 7),  # across two 4 MiB boundaries
            ("z", 1000, MiB + 5),
            ("z", 5 * MiB + 100, 20),
            ("w", size - 1, 1),
        ]
        ops += [
            (
                rng.choice("wwz"),
                (o := rng.randrange(size - 1)),
                rng.randrange(1, min(2 * MiB, size - o)),
            )
            for _ in range(30)
        ]
        for kind, off, n in ops:
            if kind == "w":
                chunk = rng.randbytes(n)
                disk.write(off, chunk)
                model[off : off + n] = chunk
            else:
                disk.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
        assert read_all(disk) == model
        # zeros never allocate: an aligned zero range (either way) leaves no pages behind
        disk.write_zeroes(8 * MiB, 2 * MiB)
        disk.write(10 * MiB, bytes(MiB))
        model[8 * MiB : 11 * MiB] = bytes(3 * MiB)
        disk.flush()
    assert blob.download_blob().readall() == model  # judged through the SDK, not our reads
    assert not [r for r in page_ranges(blob) if r[0] < 11 * MiB and r[1] > 8 * MiB]
    assert all(off % PAGE == 0 and n % PAGE == 0 for _op, off, n in calls if _op != "get")
    puts = [(off, n) for op, off, n in calls if op == "upload"]
    assert puts and all(off // MAX_CALL == (off + n - 1) // MAX_CALL for off, n in puts)
    assert all(n <= MAX_CALL for op, _off, n in calls if op == "get")
    with open_disk(spec) as ro, pytest.raises(DiskReadOnlyError):
        ro.write(0, b"x")


def _spy(client, calls: list[tuple[str, int, int]]) -> None:
    """Record the offset and length of every data call the disk makes."""
    upload, clear, get = client.upload_page, client.clear_page, client.download_blob

    def upload_page(page, offset, length, **kw):
        calls.append(("upload", offset, length))
        return upload(page, offset=offset, length=length, **kw)

    def clear_page(offset, length, **kw):
        calls.append(("clear", offset, length))
        return clear(offset=offset, length=length, **kw)

    def download_blob(offset=None, length=None, **kw):
        calls.append(("get", offset, length))
        return get(offset=offset, length=length, **kw)

    client.upload_page, client.clear_page, client.download_blob = (
        upload_page,
        clear_page,
        download_blob,
    )


def test_extents_follow_the_page_ranges_and_the_hash_map_skips_the_rest(
    azurite, container, tmp_path
):
    size = 64 * MiB
    blob = container.get_blob_client("sparse")
    blob.create_page_blob(size)
    local = bytearray(size)
    rng = random.Random(9)
    # two adjacent writes (Azurite lists them as two ranges), one lone page, one at the end
    for off, n in (
        (3 * MiB, 64 << 10),
        (3 * MiB + (64 << 10), 128 << 10),
        (40 * MiB + 512, 512),
        (size - 4096, 4096),
    ):
        chunk = rng.randbytes(n)
        blob.upload_page(chunk, offset=off, length=n)
        local[off : off + n] = chunk
    expected = [
        (3 * MiB, 3 * MiB + (192 << 10)),
        (40 * MiB + 512, 40 * MiB + 1024),
        (size - 4096, size),
    ]
    assert page_ranges(blob) == expected  # Azurite's plain page-range list is right
    (tmp_path / "sparse.raw").write_bytes(local)
    with open_disk(azurite.spec(container.container_name, "sparse")) as disk:
        extents = list(disk.extents())
        assert [(e.offset, e.end) for e in extents if not e.zero] == expected
        assert extents[0].offset == 0 and extents[-1].end == size
        assert all(a.end == b.offset for a, b in itertools.pairwise(extents))
        (hmap,) = compute_maps([(disk, None)], 65536)
        assert hmap.bytes_read <= 6 * 65536  # only blocks with allocated pages were read
    with open_disk(str(tmp_path / "sparse.raw")) as ref:
        (ref_map,) = compute_maps([(ref, None)], 65536)
    assert len(hmap.diff(ref_map)) == 0


def test_a_wrong_key_or_a_missing_blob_is_a_typed_error(azurite, container, tmp_path):
    blob = container.get_blob_client("disk")
    blob.create_page_blob(MiB)
    spec = azurite.spec(container.container_name, "disk")
    wrong = "A" + KEY[1:]
    raw = tmp_path / "src.raw"
    make_raw(raw, MiB, seed=4)
    for args in (("disk", "info", spec), ("sync", str(raw), spec)):
        out = cli(*args, env=azurite.env(wrong))
        assert out.returncode == 2, out.stderr
        assert "[config.invalid]" in out.stderr and "access denied" in out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    with pytest.MonkeyPatch.context() as mp:
        for key in (wrong, "not base64!"):
            mp.setenv("AZURE_STORAGE_KEY", key)
            with pytest.raises(ConfigError):
                open_disk(spec)
    with pytest.raises(DiskIOError, match="BlobNotFound"):
        open_disk(spec + "x")
    # a read-only SAS: reading works, writing is refused by the service as a typed error
    from datetime import UTC, datetime, timedelta

    from azure.storage.blob import BlobSasPermissions, generate_blob_sas

    sas = generate_blob_sas(
        "devstoreaccount1", container.container_name, "disk", account_key=KEY,
        permission=BlobSasPermissions(read=True),
        expiry=datetime.now(UTC) + timedelta(hours=1),
    )  # fmt: skip
    with open_disk(azurite.spec(container.container_name, "disk", sas), writable=True) as disk:
        assert disk.read(0, 512) == bytes(512)
        with pytest.raises(ConfigError):
            disk.write(0, b"x" * 512)


def test_a_blob_that_is_not_a_fixed_vhd_is_refused_as_vhd(azurite, container):
    name = container.container_name
    blob = container.get_blob_client("raw")
    blob.create_page_blob(MiB)
    blob.upload_page(random.Random(1).randbytes(MiB), offset=0, length=MiB)
    with pytest.raises(CorruptHeaderError, match="cookie"):
        open_disk(azurite.spec(name, "raw"), format="vhd")
    out = cli("disk", "info", azurite.spec(name, "raw", "format=vhd"), env=azurite.env())
    assert out.returncode == 3 and "[disk.corrupt_header]" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    with open_disk(azurite.spec(name, "raw")) as disk:  # detected: no footer, so raw
        assert (disk.format_name, disk.virtual_size) == ("raw", MiB)
    # a valid footer for another size, and a dynamic-disk footer, in a page blob
    for blob_name, footer, error in (
        ("short", build_footer(2 * MiB, 2, 0xFFFFFFFFFFFFFFFF, uuid.uuid4()), CorruptHeaderError),
        ("dynamic", build_footer(MiB, 3, 512, uuid.uuid4()), UnsupportedFormatError),
    ):
        b = container.get_blob_client(blob_name)
        b.create_page_blob(MiB + 512)
        b.upload_page(footer, offset=MiB, length=512)
        with pytest.raises(error):
            open_disk(azurite.spec(name, blob_name))
    container.get_blob_client("block").upload_blob(b"not a page blob")
    with pytest.raises(UnsupportedFormatError, match="not a page blob"):
        open_disk(azurite.spec(name, "block"))


def test_a_blob_snapshot_is_a_read_only_consistent_source(azurite, container):
    blob = container.get_blob_client("live")
    blob.create_page_blob(MiB + 512)
    blob.upload_page(build_footer(MiB, 2, 0xFFFFFFFFFFFFFFFF, uuid.uuid4()), offset=MiB, length=512)
    blob.upload_page(b"\x01" * 4096, offset=0, length=4096)
    snap = blob.create_snapshot()["snapshot"]
    blob.upload_page(b"\x02" * 4096, offset=0, length=4096)
    spec = azurite.spec(container.container_name, "live", f"snapshot={snap}")
    with open_disk(spec) as disk:
        assert disk.format_name == "vhd" and disk.read(0, 4096) == b"\x01" * 4096
        assert disk.generation() == disk.generation()
    with pytest.raises(DiskReadOnlyError):
        open_disk(spec, writable=True)
    with open_disk(azurite.spec(container.container_name, "live"), writable=True) as disk:
        assert disk.read(0, 1) == b"\x02"
        with pytest.raises(OutOfRangeError):  # the footer is not part of the disk
            disk.write(MiB, b"x" * 512)


def test_source_agent_once_replicates_a_vhd_blob_into_a_master_target_vmdk(
    azurite,
    container,
    relay,  # noqa: F811 - the imported fixture
):
    raw, vhd = vhd_image(relay.tmp, seed=13)
    upload_sparse(container.get_blob_client("os.vhd"), vhd)
    spec = azurite.spec(container.container_name, "os.vhd")
    args = ["source-agent", "--process-server", f"127.0.0.1:{relay.ps.port}"]
    args += ["--tls-dir", str(relay.tls), "--disk", f"vol1={spec}", "--once", "--deadline", "60"]
    out = cli(*args, env=azurite.env())
    assert out.returncode == 0, out.stderr + out.stdout
    assert "all PERSISTED" in out.stdout
    assert qemu_compare(raw, relay.vmdk, "vmdk").returncode == 0
