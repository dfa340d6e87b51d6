"""Golden frame fixtures (tests/testdata/frame): the frame layout is frozen.

``good-raw.frame`` involves no zstd, so rebuilding it must give the committed bytes
exactly: that freezes the header layout, key derivation, nonce rule, AEAD
associated data and digest placement. zstd output is deterministic for one libzstd
version and level but may change between versions, so ``good-compressed.frame`` (and
the corrupt frames derived from it) are compared byte for byte only under the
libzstd version recorded in ``cases.json``; under another version the test compares
every header field except the payload length, and the decoded plaintext.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

from replication.errors import ERRORS_BY_CODE, ReplicationError
from replication.frame import FrameDecoder, peek_header
from replication.keys import load_secret

DIR = Path(__file__).resolve().parents[1] / "testdata" / "frame"
CASES: dict[str, dict[str, object]] = json.loads((DIR / "cases.json").read_text())
GOOD = [name for name, case in CASES.items() if case["error_code"] is None]
BAD = [name for name, case in CASES.items() if case["error_code"] is not None]
REPO = Path(__file__).resolve().parents[2]


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("frame_fixtures", DIR / "make_fixtures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated() -> tuple[ModuleType, dict[str, bytes], dict[str, dict[str, object]]]:
    gen = load_generator()
    files, cases = gen.build()
    return gen, files, cases


def test_case_list_is_complete() -> None:
    frames = {p.name for p in DIR.glob("*.frame")}
    assert frames == set(CASES)
    assert {"good-compressed.frame", "good-raw.frame"} <= set(GOOD)
    assert len(BAD) == 7


def test_cases_json_is_reproducible(generated) -> None:
    _, files, _ = generated
    assert json.loads(files["cases.json"]) == CASES
    assert (DIR / "secret.key").read_bytes() == files["secret.key"]


def test_raw_frame_is_reproduced_byte_for_byte(generated) -> None:
    _, files, _ = generated
    assert files["good-raw.frame"] == (DIR / "good-raw.frame").read_bytes()


@pytest.mark.parametrize("other_zstd", [False, True], ids=["same-zstd", "other-zstd"])
def test_compressed_frames_are_reproduced(generated, other_zstd: bool) -> None:
    gen, files, _ = generated
    same = CASES["good-compressed.frame"]["zstd_version"] == gen.ZSTD_VERSION
    if same and not other_zstd:
        for name in CASES:
            assert files[name] == (DIR / name).read_bytes(), name
        return
    # Another libzstd: the header must match except for the compressed size.
    new = peek_header(files["good-compressed.frame"])
    old = peek_header((DIR / "good-compressed.frame").read_bytes())
    assert replace(new, payload_length=old.payload_length) == old
    dec = FrameDecoder(load_secret(DIR / "secret.key"))
    assert dec.decode(files["good-compressed.frame"]).data == gen.text_data()


@pytest.mark.parametrize("name", GOOD)
def test_good_fixture_decodes(name: str) -> None:
    case = CASES[name]
    dec = FrameDecoder(load_secret(DIR / str(case["secret"])))
    out = dec.decode((DIR / name).read_bytes())
    assert hashlib.sha256(out.data).hexdigest() == case["sha256"]
    assert len(out.data) == case["length"]
    assert out.seq == case["seq"] and out.offset == case["offset"]
    assert out.compressed is case["compressed"]


@pytest.mark.parametrize("name", BAD)
def test_bad_fixture_raises_its_error(name: str) -> None:
    case = CASES[name]
    error = ERRORS_BY_CODE[str(case["error_code"])]
    dec = FrameDecoder(load_secret(DIR / str(case["secret"])))
    with pytest.raises(ReplicationError) as info:
        dec.decode((DIR / name).read_bytes())
    assert type(info.value) is error


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "replication", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


@pytest.mark.parametrize("name", BAD)
def test_cli_inspect_bad_fixture(name: str) -> None:
    case = CASES[name]
    proc = run_cli("frame", "inspect", str(DIR / name), "--secret-file", str(DIR / "secret.key"))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"[{case['error_code']}]" in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", GOOD)
def test_cli_inspect_good_fixture(name: str) -> None:
    proc = run_cli(
        "frame", "inspect", str(DIR / name), "--secret-file", str(DIR / "secret.key"), "--json"
    )
    assert proc.returncode == 0, proc.stderr
    (record,) = json.loads(proc.stdout)["frames"]
    assert record["digest_ok"] is True
    assert record["plaintext_length"] == CASES[name]["length"]
    assert record["compressed"] is CASES[name]["compressed"]


def test_cli_encode_reproduces_raw_fixture(tmp_path: Path) -> None:
    gen = load_generator()
    src = tmp_path / "in.bin"
    src.write_bytes(gen.random_data())
    out = tmp_path / "out.frame"
    proc = run_cli(
        "frame",
        "encode",
        "--secret-file",
        str(DIR / "secret.key"),
        "--disk-id",
        gen.DISK_ID.hex(),
        "--seq",
        "2",
        "--offset",
        "131072",
        "--level",
        str(gen.LEVEL),
        "--salt",
        gen.SALT.hex(),
        str(src),
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == (DIR / "good-raw.frame").read_bytes()


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["frame", "inspect", "/nonexistent/x.frame"], "usage.invalid"),
        (["frame", "inspect", str(DIR / "good-raw.frame"), "--secret-file", "/nope"], "config"),
        (["frame", "inspect", str(DIR / "good-raw.frame"), "--secret-file", str(DIR)], "config"),
    ],
)
def test_cli_unreadable_files_are_one_line_errors(args: list[str], code: str) -> None:
    proc = run_cli(*args)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert code in proc.stderr
