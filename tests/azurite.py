"""Azurite, Microsoft's Azure Storage emulator, for tests: installed on demand, run on loopback.

``make install`` puts Azurite in ``.azurite/`` (``npm install --prefix .azurite azurite@3``).
When it is missing, :func:`azurite_blob_script` installs it the same way (under a file lock:
pytest-xdist workers may ask at once) or fails the test with the reason: never a skip.

:class:`Azurite` starts the blob service alone on 127.0.0.1 with port 0 (Azurite prints
the port it bound), in memory, without telemetry (it would try to reach the internet)
and accepting the SDK's newer API versions; start-up is bounded.

What Azurite can judge (shared/oracles.md §5): the page-blob data plane (Put Page,
Clear Page, Get Blob ranges, plain page-range lists, snapshots, properties, auth). What it
cannot: page-range *diffs* (answered wrongly), the 4 MiB Put Page limit (not enforced),
paging of page-range lists (one page whatever ``results_per_page`` says).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
AZURITE_DIR = ROOT / ".azurite"
ACCOUNT = "devstoreaccount1"
#: Azurite's well-known development account key (public, documented by Microsoft).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
LISTENING = re.compile(rb"listens on http://127\.0\.0\.1:(\d+)")
INSTALL_TIMEOUT = 600


def azurite_blob_script() -> Path:
    """Return Azurite's blob-service script, installing Azurite into ``.azurite/`` if needed."""
    script = AZURITE_DIR / "node_modules" / ".bin" / "azurite-blob"
    if script.exists():
        return script
    AZURITE_DIR.mkdir(exist_ok=True)
    with open(AZURITE_DIR / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not script.exists():
            _npm_install()
    if not script.exists():
        raise AssertionError(f"Azurite installed but {script} is missing: run `make install`")
    return script


def _npm_install() -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise AssertionError("Azurite is missing and npm is not installed: run `make install`")
    cmd = [npm, "install", "--prefix", str(AZURITE_DIR), "azurite@3", "--no-audit", "--no-fund"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise AssertionError(f"`{' '.join(cmd)}` failed rc={proc.returncode}: {tail}")


class Azurite:
    """One Azurite blob service on 127.0.0.1; use as a context manager."""

    def __init__(self, workdir: Path, *, timeout: float = 30.0) -> None:
        self.workdir = workdir
        self.timeout = timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint={self.endpoint};"
        )

    def spec(self, container: str, blob: str, query: str = "") -> str:
        """The engine's spec of a blob: ``pageblob+http://127.0.0.1:PORT/ACCOUNT/C/B[?q]``."""
        return f"pageblob+{self.endpoint}/{container}/{blob}" + (f"?{query}" if query else "")

    def env(self, key: str = KEY) -> dict[str, str]:
        """The environment for a CLI run that reaches this Azurite with ``key``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_STORAGE_")}
        return {**env, "AZURE_STORAGE_KEY": key}

    def service(self):
        """A ``BlobServiceClient`` with the development account's key."""
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient(
            self.endpoint, credential={"account_name": ACCOUNT, "account_key": KEY}
        )

    def start(self) -> Azurite:
        script = azurite_blob_script()
        node = shutil.which("node")
        if node is None:
            raise AssertionError("node is missing: Azurite needs Node.js (run `make install`)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / "azurite.log"
        self._log = open(log_path, "ab")  # noqa: SIM115 - the child writes until stop()
        args = [node, str(script), "--blobHost", "127.0.0.1", "--blobPort", "0"]
        args += ["--inMemoryPersistence", "--extentMemoryLimit", "512"]
        args += ["--disableTelemetry", "--skipApiVersionCheck", "--silent"]
        self._proc = subprocess.Popen(
            args, cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            m = LISTENING.search(log_path.read_bytes())
            if m:
                self.port = int(m.group(1))
                return self
            if self._proc.poll() is not None:
                break
            time.sleep(0.05)
        text = log_path.read_text(errors="replace")
        self.stop()
        raise AssertionError(f"Azurite did not start within {self.timeout} s: {text[-2000:]}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- blob helpers that do not go through the engine (test set-up and judging) -------------


def upload_sparse(blob, path: Path, chunk: int = 64 << 10) -> list[tuple[int, int]]:
    """Create page blob ``blob`` from the file at ``path``, skipping all-zero chunks.

    Runs of non-zero chunks go up in calls of at most 4 MiB. Return the uploaded
    [start, end) ranges, coalesced (what a page-range list must show).
    """
    size = path.stat().st_size
    blob.create_page_blob(size)
    runs: list[list[int]] = []  # [start, end) of non-zero chunks, at most 4 MiB each
    with open(path, "rb") as f:
        for off in range(0, size, chunk):
            data = f.read(chunk)
            if data.count(0) == len(data):
                continue
            if runs and runs[-1][1] == off and off - runs[-1][0] < (4 << 20):
                runs[-1][1] = off + len(data)
            else:
                runs.append([off, off + len(data)])
        for start, end in runs:
            f.seek(start)
            blob.upload_page(f.read(end - start), offset=start, length=end - start)
    ranges: list[tuple[int, int]] = []
    for start, end in runs:
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], end)
        else:
            ranges.append((start, end))
    return ranges


def download(blob, path: Path) -> Path:
    """Stream the whole blob into the file at ``path`` (4 MiB requests)."""
    with open(path, "wb") as f:
        blob.download_blob(max_concurrency=1).readinto(f)
    return path


def page_ranges(blob) -> list[tuple[int, int]]:
    """The blob's allocated [start, end) ranges from the service, coalesced."""
    out: list[tuple[int, int]] = []
    for r in blob.list_page_ranges():
        if out and out[-1][1] == r.start:
            out[-1] = (out[-1][0], r.end + 1)
        else:
            out.append((r.start, r.end + 1))
    return out
