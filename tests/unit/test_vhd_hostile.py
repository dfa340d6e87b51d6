"""Hostile VHDs: committed fixtures raise typed errors; fuzzed metadata never crashes."""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from replication.disks import detect_format
from replication.disks.vhd import open_vhd
from replication.errors import ERRORS_BY_CODE, ReplicationError

FIXTURES = Path(__file__).resolve().parents[1] / "testdata" / "vhd"
CASES: dict[str, dict[str, str]] = json.loads((FIXTURES / "cases.json").read_text())


def _load_fixture_builder():
    path = FIXTURES / "make_fixtures.py"
    spec = importlib.util.spec_from_file_location("vhd_make_fixtures", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


make_fixtures = _load_fixture_builder()


def test_fixtures_are_current_and_tiny() -> None:
    built = make_fixtures.cases()
    assert set(built) == set(CASES)
    assert len(CASES) >= 20
    for name, (data, expect) in built.items():
        committed = (FIXTURES / name).read_bytes()
        assert committed == data, f"{name} is stale: rerun make_fixtures.py"
        assert CASES[name] == expect
        assert len(committed) <= 1 << 20
        assert expect["code"] in ERRORS_BY_CODE


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixture_raises_typed_error(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    src = FIXTURES / name
    # detection must route the file to the VHD code unless the case says --format vhd
    assert detect_format(str(src)) == ("raw" if "format" in case else "vhd")
    if "format" in case:
        assert case["format"] == "vhd"
    with pytest.raises(ReplicationError) as exc:
        open_vhd(str(src))
    assert exc.value.code == case["code"], str(exc.value)
    assert str(src) in str(exc.value)  # the message names the file
    # writable opens fail the same way (or as the case says) and never modify the file
    copy = tmp_path / name
    shutil.copyfile(src, copy)
    with pytest.raises(ReplicationError) as exc:
        open_vhd(str(copy), writable=True)
    assert exc.value.code == case.get("writable_code", case["code"])
    assert copy.read_bytes() == src.read_bytes()


# --- fuzzing ----------------------------------------------------------------------------

_BASE = make_fixtures.dynamic()
_LEN = len(_BASE)


def _fix_checksums(buf: bytearray) -> None:
    for at in (0, _LEN - 512):
        if at + 512 <= len(buf):
            struct.pack_into(">I", buf, at + 64, make_fixtures.checksum(buf[at : at + 512], 64))
    struct.pack_into(">I", buf, 512 + 36, make_fixtures.checksum(buf[512:1536], 36))


_regions = st.sampled_from(
    [(0, 100), (512, 560), (1536, 1600), (_LEN - 512, _LEN - 420), (2048, _LEN)]
)
_mutation = st.tuples(_regions, st.integers(0, 10**6), st.integers(0, 255))


@settings(
    max_examples=150,
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    muts=st.lists(_mutation, min_size=1, max_size=8),
    fix=st.booleans(),
    cut=st.one_of(st.none(), st.integers(0, _LEN)),
    write=st.booleans(),
)
def test_fuzzed_metadata_only_typed_errors(
    tmp_path: Path, muts: list, fix: bool, cut: int | None, write: bool
) -> None:
    buf = bytearray(_BASE)
    for (lo, hi), pos, val in muts:
        buf[lo + pos % (hi - lo)] = val
    if fix:  # recompute checksums so the mutation reaches the semantic checks
        _fix_checksums(buf)
    if cut is not None:
        del buf[cut:]
    p = tmp_path / "fuzz.vhd"
    p.write_bytes(bytes(buf))
    try:
        with open_vhd(str(p), writable=write) as d:
            size = d.virtual_size
            assert 0 < size <= 64 << 40
            d.info()
            n = min(size, 1 << 20)
            assert len(d.read(0, n)) == n and len(d.read(size - n, n)) == n
            exts = list(d.extents())
            assert sum(e.length for e in exts) == size
            if write and size >= 8192:
                d.write(4096 - 3, b"fuzz" * 3)
                d.write(size - 5, b"tail!")
                d.flush()
                assert d.read(4096 - 3, 12) == b"fuzz" * 3
                assert d.read(size - 5, 5) == b"tail!"
        event("opened")
    except ReplicationError as err:
        event(err.code)


_CHILD = make_fixtures.differencing(
    make_fixtures.SIZE,
    make_fixtures.UID,  # the uuid of make_fixtures.dynamic()
    {0: (b"\xf0", b"C" * 4096), 3: (b"\xff", b"D" * 4096)},
    parent_name="parent.vhd",
    locators={b"W2ru": ".\\parent.vhd"},
)
_CHILD_REGIONS = st.sampled_from([(0, 100), (512, 1536), (1536, 2560), (len(_CHILD) - 512, 100)])


@settings(
    max_examples=100,
    deadline=2000,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(muts=st.lists(st.tuples(_CHILD_REGIONS, st.integers(0, 10**6), st.integers(0, 255))))
def test_fuzzed_differencing_child_only_typed_errors(tmp_path: Path, muts: list) -> None:
    (tmp_path / "parent.vhd").write_bytes(_BASE)
    buf = bytearray(_CHILD)
    for (lo, span), pos, val in muts:
        buf[lo + pos % span] = val
    struct.pack_into(">I", buf, 64, make_fixtures.checksum(buf[:512], 64))
    struct.pack_into(">I", buf, 512 + 36, make_fixtures.checksum(buf[512:1536], 36))
    buf[-512:] = buf[:512]
    p = tmp_path / "child.vhd"
    p.write_bytes(bytes(buf))
    try:
        with open_vhd(str(p)) as d:
            n = min(d.virtual_size, 1 << 20)
            assert len(d.read(0, n)) == n
            assert sum(e.length for e in d.extents()) == d.virtual_size
        event("opened")
    except ReplicationError as err:
        event(err.code)
