"""Shared fixtures, and the run's summary of what the proving-ground tests tried."""

from __future__ import annotations

import json

import pytest

from tests import ledger

#: the key under which a pytest-xdist worker hands its records to the controller
_WORKER_KEY = "proving_ledger"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Keep hash-map caches out of the user's home during tests."""
    monkeypatch.setenv("REPLICATION_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """On an xdist worker: hand this process's records to the controller."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        output[_WORKER_KEY] = json.dumps(ledger.dump())


@pytest.hookimpl(optionalhook=True)  # an xdist hook: absent without pytest-xdist
def pytest_testnodedown(node, error) -> None:
    """On the xdist controller: add a finished worker's records."""
    records = getattr(node, "workeroutput", {}).get(_WORKER_KEY)
    if records:
        ledger.merge(json.loads(records))


def pytest_terminal_summary(terminalreporter) -> None:
    """Trials and faults per class, and "lost: 0" only where the tests asserted it."""
    lines = ledger.summary()
    if lines:
        terminalreporter.section("proving ground: trials and faults")
        for line in lines:
            terminalreporter.write_line(line)
