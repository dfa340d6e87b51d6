"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Keep hash-map caches out of the user's home during tests."""
    monkeypatch.setenv("REPLICATION_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
