"""`storyfarm ls` through a pipe at 80 columns (a script's `| grep`, a narrow terminal): one line per
story, no line wider than the terminal, story ids whole (copyable); long names and projects are
cut with an ellipsis instead of folding into columns of 1-3 characters."""

from __future__ import annotations

import os
import subprocess

import pytest

from helpers.daemon_inproc import running_daemon
from helpers.daemon_proc import CLI
from storyfarm.daemon.client import StoryfarmClient

SMALL = "resolution: 64x32\nframes: 9\nsteps: 2\n"
LONG_NAME = "The lighthouse keeper's last night on the island before the storm, in six shots"
LONG_PROJECT = "lighthouse-feature-film-2025-second-unit-coastal-exteriors"


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("data"), **{"scheduler.worker": "fake"}) as (d, _):
        with StoryfarmClient(f"127.0.0.1:{d.port}") as client:
            yield d, client


def ls(d, columns: int, *argv) -> list[str]:
    env = {**os.environ, "COLUMNS": str(columns), "PYTHONIOENCODING": "utf-8"}
    env.pop("TERM", None)
    done = subprocess.run([CLI, "ls", *argv, "--server", f"127.0.0.1:{d.port}"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, encoding="utf-8", env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_ls_is_one_line_per_story_at_80_columns_through_a_pipe(farm):
    d, client = farm
    ids = [client.submit(f"name: {name}\n{SMALL}shots:\n  - prompt: p\n", project=project)["story_id"]
           for name, project in ((LONG_NAME, LONG_PROJECT), ("kite", "demo"), (LONG_NAME + " (take 2)", "demo"))]
    lines = ls(d, 80)
    assert len(lines) == 1 + len(ids), "\n".join(lines)  # the header, then one line per story
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    for story_id in ids:
        assert sum(story_id in line for line in lines) == 1  # whole, on exactly one line
    long_row = next(line for line in lines if ids[0] in line)
    assert "…" in long_row and LONG_NAME[:8] in long_row and LONG_PROJECT[:5] in long_row
    kite_row = next(line for line in lines if ids[1] in line)
    assert " kite " in kite_row and " demo " in kite_row and "…" not in kite_row  # short text stays whole

    wide = ls(d, 250)  # room enough: nothing is cut
    assert len(wide) == 1 + len(ids) and any(LONG_NAME in line and LONG_PROJECT in line for line in wide)
    narrow = ls(d, 40)  # narrower than the ids and counts need: the lines grow, the ids stay whole
    assert len(narrow) == 1 + len(ids) and all(any(i in line for line in narrow) for i in ids)
