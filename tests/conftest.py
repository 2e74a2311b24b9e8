"""Shared fixtures: tiny random-weight models, example stories, the optional ../shared bench."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO / "configs" / "stories"
STBENCH = Path(os.environ.get("STORYFARM_STBENCH", REPO.parent / "shared" / "stbench"))


def pytest_addoption(parser):
    parser.addoption("--reliability-long", action="store_true", default=False,
                     help="tests/reliability: the long mode (more stories, kills and load; see RELIABILITY.md); "
                          "also set by STORYFARM_RELIABILITY_LONG=1")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def stbench() -> Path:
    if not (STBENCH / "cat.json").is_file():
        pytest.skip(f"ST-Bench scripts not found at {STBENCH} (they live in ../shared, absent from a clean clone)")
    return STBENCH


@pytest.fixture
def default_attention():
    """The process-default attention backend and a clean record of the backends that ran (the
    registry is process-global); kernel test modules use it on every test."""
    from storyfarm.kernels import attention

    attention.configure("auto")
    attention.reset_record()
    yield
    attention.configure("auto")


@pytest.fixture(scope="session")
def tiny_preset():
    from storyfarm.story.presets import load_preset

    return load_preset("tiny")


@pytest.fixture(scope="session")
def tiny_engine(tiny_preset):
    from storyfarm.m2v.render.engine import Engine

    return Engine(tiny_preset)
