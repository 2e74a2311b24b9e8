"""A story of 30 shots (three scenes of ten) through a real daemon and the command line, as long
stories are written: bugs that appear only past one page, one scene or shot 9 show here.

The fake worker renders nothing (the model's byte paths at real size are tests/reliability/
test_real_size.py's); what runs for real is the store, the scheduler's shot order, the event stream
`watch` follows, `get`, `ls` and `download` of 30 clips plus the story's files, and the shot numbers
of every one of them (shot 30 is `030_scene03_shot10.mp4`, "shot 30 of 30 (scene 3.10)").
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from helpers.daemon_inproc import running_daemon
from storyfarm.daemon.cli import main as cli_main

SCENES, PER_SCENE = 3, 10
SHOTS = SCENES * PER_SCENE


def cli(d, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main([*argv, "--server", f"127.0.0.1:{d.port}"])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("data"), **{"scheduler.worker": "fake"}) as (d, _):
        yield d


def test_a_thirty_shot_story_is_numbered_listed_watched_and_downloaded_whole(daemon, tmp_path):
    story = tmp_path / "voyage.yaml"
    story.write_text(json.dumps({"name": "The long voyage", "resolution": "64x32", "frames": 9, "steps": 2, "scenes": [
        {"name": f"leg {s + 1}", "shots": [{"prompt": f"the ship sails on, leg {s + 1}, moment {k + 1}"} for k in range(PER_SCENE)]}
        for s in range(SCENES)]}))
    code, out, err = cli(daemon, "submit", str(story), "--json")
    assert code == 0, err
    sid = json.loads(out)["story_id"]
    assert json.loads(out)["shot_count"] == SHOTS

    code, out, err = cli(daemon, "watch", sid)
    assert code == 0, out + err
    assert f"shot {SHOTS} of {SHOTS} (scene {SCENES}.{PER_SCENE}) succeeded" in out
    assert "shot 0 " not in out and f"shot {SHOTS + 1} " not in out

    code, out, _ = cli(daemon, "get", sid, "--json")
    shots = json.loads(out)["shots"]
    assert [(s["index"], s["number"], s["scene"], s["shot"]) for s in shots] == [
        (i, i + 1, i // PER_SCENE + 1, i % PER_SCENE + 1) for i in range(SHOTS)]
    assert all(s["state"] == "succeeded" and s["attempts"] == 1 for s in shots)
    code, out, _ = cli(daemon, "get", sid)
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(1, SHOTS + 1))  # the SHOT column counts from 1
    assert [r[1] for r in rows][-1] == f"{SCENES}.{PER_SCENE}"
    code, out, _ = cli(daemon, "ls", "--json")
    listed = {s["story_id"]: s for s in json.loads(out)}
    assert (listed[sid]["succeeded_shot_count"], listed[sid]["shot_count"]) == (SHOTS, SHOTS)

    code, out, err = cli(daemon, "download", sid, "--out", str(tmp_path / "out"), "--json")
    assert code == 0, err
    names = sorted(f["name"] for f in json.loads(out))
    clips = [n for n in names if n.startswith("shots/")]
    assert clips == [f"shots/{i + 1:03d}_scene{i // PER_SCENE + 1:02d}_shot{i % PER_SCENE + 1:02d}.mp4" for i in range(SHOTS)]
    assert clips[-1] == "shots/030_scene03_shot10.mp4"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [e["index"] for e in manifest["shots"]] == list(range(SHOTS))
    assert [e["file"] for e in manifest["shots"]] == clips

    # the last shot again, by the number people read: the daemon's index 29
    code, out, err = cli(daemon, "retry-shot", sid, str(SHOTS))
    assert code == 4 and "--rerender" in out + err
    code, out, err = cli(daemon, "rerender", sid, str(SHOTS), "--prompt", "the ship reaches the harbour")
    assert code == 0, err
    code, out, err = cli(daemon, "watch", sid)
    assert code == 0 and f"shot {SHOTS} of {SHOTS} (scene {SCENES}.{PER_SCENE}) succeeded" in out
    code, out, _ = cli(daemon, "get", sid, "--json")
    again = json.loads(out)["shots"]
    assert [s["attempts"] for s in again] == [1] * (SHOTS - 1) + [2]
    code, out, err = cli(daemon, "rerender", sid, str(SHOTS + 1))
    assert code in (2, 3) and f"shot {SHOTS + 1}" in out + err and f"1 to {SHOTS}" in out + err
