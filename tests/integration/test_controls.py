"""The story controls as a TD uses them from the CLI, against a real daemon with fake workers (no
model): a cancel keeps its reason and `resume` brings a cancelled story back from its last succeeded
shot; exit codes follow the README (4: not allowed in the story's state); `priority` prints the new
value and refuses out-of-range values with INVALID_ARGUMENT naming the field; `retry-shot` on a
succeeded shot points at `--rerender`; a paused story has no ETA; a shot waiting to run again names
no worker; a client error's text carries its field violations."""

from __future__ import annotations

import json

import pytest

from helpers.daemon_inproc import running_daemon, submit, wait_for
from storyfarm.daemon import cli
from storyfarm.daemon.client import StoryfarmClient, StoryfarmError
from storyfarm.v1 import render_pb2 as pb


def story(name: str, prompts: list[str]) -> str:
    return json.dumps({"name": name, "resolution": "64x32", "frames": 9, "steps": 4,
                       "shots": [{"prompt": f"{name} shot {i} {p}"} for i, p in enumerate(prompts)]})


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("data"), **{"scheduler.worker": "fake", "max_attempts": 3}) as (d, stub):
        with StoryfarmClient(f"127.0.0.1:{d.port}") as client:
            yield d, stub, client


def run_cli(d, *argv) -> int:
    return cli.main([*argv, "--server", f"127.0.0.1:{d.port}"])


def get(stub, story_id: str) -> pb.Story:
    return stub.GetStory(pb.GetStoryRequest(story_id=story_id))


def test_cancel_keeps_its_reason_and_resume_continues_from_the_last_succeeded_shot(farm, capsys):
    d, stub, client = farm
    sid = submit(stub, story("keeper", ["", "", "fake:slow=0.3", "", ""])).story_id
    wait_for(lambda: get(stub, sid).shots[2].state == pb.SHOT_STATE_RUNNING, "shot 2 running")
    assert run_cli(d, "cancel", sid, "--reason", "wrong lens, re-shooting tomorrow") == 0
    assert "cancelled: wrong lens, re-shooting tomorrow" in capsys.readouterr().out
    record = wait_for(lambda: (r := get(stub, sid)).shots[2].state != pb.SHOT_STATE_RUNNING and r, "the cancel to land")
    assert record.state == pb.STORY_STATE_CANCELLED and record.error == "wrong lens, re-shooting tomorrow"
    kept = {a.name: a.sha256 for a in record.artifacts}
    assert [s.state for s in record.shots][:2] == [pb.SHOT_STATE_SUCCEEDED] * 2
    assert run_cli(d, "resume", sid) == 0
    record = get(stub, sid)
    assert record.state in (pb.STORY_STATE_RUNNING, pb.STORY_STATE_SUCCEEDED) and not record.error
    done = wait_for(lambda: (r := get(stub, sid)).state == pb.STORY_STATE_SUCCEEDED and r, "the resumed story")
    assert all(s.state == pb.SHOT_STATE_SUCCEEDED for s in done.shots)
    assert [s.attempts for s in done.shots][:2] == [1, 1]  # the shots that had succeeded never ran again
    assert all({a.name: a.sha256 for a in done.artifacts}[name] == sha for name, sha in kept.items()
               if not name.startswith(("story", "contact", "manifest")))


def test_exit_codes_priority_and_retry_messages(farm, capsys):
    d, stub, client = farm
    sid = submit(stub, story("gulls", [""])).story_id
    wait_for(lambda: get(stub, sid).state == pb.STORY_STATE_SUCCEEDED, "the story")
    capsys.readouterr()
    assert run_cli(d, "pause", sid) == 4
    assert run_cli(d, "retry-shot", sid, "1") == 4
    assert "--rerender" in capsys.readouterr().err  # SHOT counts from 1, as `get` shows
    assert run_cli(d, "retry-shot", sid, "0") == 2
    assert "SHOT 0: shot numbers count from 1" in capsys.readouterr().err
    assert run_cli(d, "retry-shot", sid, "2") == 3  # NOT_FOUND, in shot numbers and the API's index
    assert "has no shot_index 1 (shot 2); its shots are 1 to 1" in capsys.readouterr().err
    assert run_cli(d, "priority", sid, "500") == 2
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "priority: -100 to 100" in err
    with pytest.raises(StoryfarmError) as exc:
        client.set_priority(sid, -101)
    assert exc.value.reason == "INVALID_ARGUMENT" and "priority: -100 to 100" in str(exc.value)
    slow = submit(stub, story("storm", ["fake:slow=0.5", ""])).story_id
    assert run_cli(d, "priority", slow, "7") == 0
    assert f"{slow}: " in (out := capsys.readouterr().out) and "priority 7" in out


def test_a_paused_story_has_no_eta(farm):
    d, stub, client = farm
    sid = submit(stub, story("fog", ["fake:slow=0.3", "fake:slow=0.2", ""])).story_id
    wait_for(lambda: get(stub, sid).shots[0].state == pb.SHOT_STATE_RUNNING, "shot 0 running")
    wait_for(lambda: get(stub, sid).HasField("eta"), "an ETA while it runs")
    client.pause(sid)
    record = get(stub, sid)
    assert record.state == pb.STORY_STATE_PAUSED and not record.HasField("eta")
    client.resume(sid)
    done = wait_for(lambda: (r := get(stub, sid)).state == pb.STORY_STATE_SUCCEEDED and r, "the story")
    assert all(s.worker for s in done.shots)


def test_a_shot_waiting_to_run_again_names_no_worker(tmp_path):
    from helpers.job_store import run, submit as submit_to
    from storyfarm.daemon import convert
    from storyfarm.daemon.store import JobStore

    with JobStore.open(tmp_path / "jobs.db") as store:
        sid = submit_to(store, 2)
        run(store, sid, 0, "failed", worker="w3", error="boom", reason="content")
        record = store.get_story(sid)
        assert record.shots[0].state == "queued" and record.shots[0].worker == "w3"  # the store keeps history
        assert convert.story(record).shots[0].worker == ""  # the API shows no stale worker
        run(store, sid, 0, "succeeded", worker="w1")
        assert convert.story(store.get_story(sid)).shots[0].worker == "w1"


def test_get_says_why_a_story_waits(farm, capsys):
    d, stub, client = farm
    busy = submit(stub, story("lamp", ["fake:slow=0.4"])).story_id
    wait_for(lambda: get(stub, busy).shots[0].state == pb.SHOT_STATE_RUNNING, "the first story running")
    queued = submit(stub, story("harbour", [""])).story_id
    record = wait_for(lambda: (r := get(stub, queued)).waiting_reason and r, "a waiting reason")
    assert record.waiting_reason.startswith("every worker is busy; 0 runnable stories rank ahead")
    assert run_cli(d, "get", queued) == 0
    assert "waiting: every worker is busy" in capsys.readouterr().out
    client.pause(queued)
    assert get(stub, queued).waiting_reason == "paused"
    client.resume(queued)
    done = wait_for(lambda: (r := get(stub, queued)).state == pb.STORY_STATE_SUCCEEDED and r, "the story")
    assert done.waiting_reason == "" and get(stub, busy).waiting_reason == ""
