"""Fixtures for the unit tests: a job store on a real SQLite file (WAL only exists on disk).

Modules whose `store` is something else (an artifact store) or opened with other settings define
their own fixture of that name, which takes precedence over this one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from storyfarm.daemon.store import JobStore


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "jobs.db"


@pytest.fixture
def store(db_path: Path):
    with JobStore.open(db_path) as opened:
        yield opened
