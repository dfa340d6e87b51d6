"""``replication sync`` against the tools an operator would otherwise use, in one run.

Run with ``make bench`` (``make test`` skips benchmarks). Image size:
``BENCH_SIZE_MIB`` (default 4096); rounds: ``BENCH_ROUNDS`` (default 5).

Setup: image A (realistic mix), image B = A with 1 % of its 64 KiB blocks rewritten
with random bytes. Each round runs every command once, interleaved, all with warm
page cache (every image was read once before the first round; the machine has RAM
for all of them):

* ``sync-warm``: ``replication sync B T`` where T holds A and its hash map was kept
  by the previous sync (the repeated-failback case: only B is read);
* ``sync-cold``: the same with ``--verify`` (both B and T are read and hashed);
* ``rsync``: ``rsync --inplace --no-whole-file -I B rsync://127.0.0.1:PORT/m/T2``
  through an rsync daemon on loopback (and with ``--compress``, and ``-B 65536``);
* ``qemu-img convert -n``: a full copy of B over T (writes every byte; T is then
  put back to A with ``replication sync --verify``, which also renews its map);
* ``xxh128sum A B``: hashing both images one after the other.

Between commands each target is put back to A with a delta sync of the same tool
(untimed), and every image is read once more (``cat``), so each timed command
starts with all four images (A, B, T, T2) in the page cache: at the default size
they take 16 GiB of this machine's 24 GiB. Results: a table on stdout,
``bench-out/sync.json``, and the ratios in pytest-benchmark's ``extra_info``.
Nothing here asserts on time.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from images import mutate_image, write_image

SIZE = int(os.environ.get("BENCH_SIZE_MIB", "4096")) << 20
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
REPLICATION = str(Path(sys.executable).parent / "replication")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {proc.stderr}")
    return elapsed, proc.stdout


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    a, b = d / "A.raw", d / "B.raw"
    write_image(str(a), SIZE)
    mutate_image(str(a), str(b), 0.01)
    return d, a, b


@pytest.fixture(scope="module")
def rsync_daemon(images):
    d, _, _ = images
    root = d / "rsync"
    root.mkdir()
    conf = d / "rsyncd.conf"
    conf.write_text(
        f"use chroot = no\n[m]\npath = {root}\nread only = no\nuid = root\ngid = root\n"
    )
    port = _free_port()
    proc = subprocess.Popen(
        [
            "rsync",
            "--daemon",
            "--no-detach",
            f"--config={conf}",
            f"--port={port}",
            "--address=127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    yield root, f"rsync://127.0.0.1:{port}/m"
    proc.terminate()
    proc.wait(timeout=10)


def _missing(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def test_sync_versus_rsync_and_full_copy(benchmark, images, rsync_daemon, tmp_path):
    d, a, b = images
    root, url = rsync_daemon
    env = dict(os.environ, REPLICATION_CACHE_DIR=str(tmp_path / "cache"))
    t, t2 = d / "T.raw", root / "T2.raw"
    for target in (t, t2):
        subprocess.run(["cp", "--sparse=always", str(a), str(target)], check=True)
    missing = _missing("rsync", "xxh128sum", "qemu-img")
    # warm the page cache and record T's map (T holds A)
    files = [str(a), str(b), str(t), str(t2)]
    _timed([REPLICATION, "sync", str(a), str(t)], env)

    def sync_cmd(src: Path, *extra: str) -> list[str]:
        return [REPLICATION, "sync", "--json", *extra, str(src), str(t)]

    rsync = ["rsync", "--inplace", "--no-whole-file", "-I", "--stats"]
    cases = {
        "sync-warm": (sync_cmd(b), sync_cmd(a)),
        "sync-cold": (sync_cmd(b, "--verify"), sync_cmd(a, "--verify")),
        "rsync": ([*rsync, str(b), f"{url}/T2.raw"], [*rsync, str(a), f"{url}/T2.raw"]),
        "rsync-compress": (
            [*rsync, "-z", str(b), f"{url}/T2.raw"],
            [*rsync, str(a), f"{url}/T2.raw"],
        ),
        "rsync-B64K": (
            [*rsync, "-B", "65536", str(b), f"{url}/T2.raw"],
            [*rsync, str(a), f"{url}/T2.raw"],
        ),
        "qemu-img-convert": (
            ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(b), str(t)],
            sync_cmd(a, "--verify"),
        ),
        "xxh128sum-both": (["xxh128sum", str(a), str(b)], None),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    outputs: dict[str, str] = {}
    for _ in range(ROUNDS):
        for name, (cmd, reset) in cases.items():
            if cmd[0] in missing:
                continue
            # same start for every tool: all images cached, no writeback in flight
            subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
            os.sync()
            elapsed, out = _timed(cmd, env)
            times[name].append(elapsed)
            outputs[name] = out
            if reset:
                _timed(reset, env)
    result = _summarise(times, outputs, missing)
    benchmark.extra_info.update(result)

    def reset() -> None:  # pedantic's setup must return None
        _timed(sync_cmd(a), env)

    benchmark.pedantic(lambda: _timed(sync_cmd(b), env), setup=reset, rounds=1, iterations=1)
    out_dir = Path("bench-out")
    out_dir.mkdir(exist_ok=True)
    (out_dir / "sync.json").write_text(json.dumps(result, indent=2))
    _print_table(result)


def _summarise(times, outputs, missing) -> dict[str, object]:
    med = {k: statistics.median(v) for k, v in times.items() if v}
    res: dict[str, object] = {
        "size_bytes": SIZE,
        "rounds": ROUNDS,
        "cache": "warm: every image read (cat), then sync(2), right before each timed command",
        "missing_tools": missing,
        "median_seconds": med,
        "all_seconds": times,
    }
    warm = med.get("sync-warm")
    if warm:
        for k in ("rsync", "rsync-B64K", "qemu-img-convert", "xxh128sum-both", "sync-cold"):
            if k in med:
                res[f"speedup_vs_{k}"] = round(med[k] / warm, 2)
    if "sync-warm" in outputs:
        rep = json.loads(outputs["sync-warm"])
        res["sync_bytes_wire"] = rep["bytes_wire"]
        res["sync_bytes_written"] = rep["bytes_written"]
    # both directions count: rsync's receiver sends block checksums, ours its hash map
    for k in ("rsync", "rsync-compress", "rsync-B64K"):
        if k in outputs:
            sent = _rsync_stat(outputs[k], "Total bytes sent:")
            received = _rsync_stat(outputs[k], "Total bytes received:")
            res[f"{k}_bytes_both_ways"] = (sent or 0) + (received or 0)
    return res


def _rsync_stat(stats: str, label: str) -> int | None:
    for line in stats.splitlines():
        if line.startswith(label):
            return int(line.split(":")[1].strip().replace(",", ""))
    return None


def _print_table(res: dict[str, object]) -> None:
    print(
        f"\nsync benchmark, {res['size_bytes'] >> 20} MiB, {res['rounds']} rounds, {res['cache']}"
    )
    for k, v in res["median_seconds"].items():  # type: ignore[union-attr]
        print(f"  {k:<18} {v:8.3f} s")
    for k, v in res.items():
        if k.startswith(("speedup", "sync_bytes", "rsync")):
            print(f"  {k:<28} {v}")
