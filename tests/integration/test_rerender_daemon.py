"""RerenderShot over a real socket: a real daemon, worker process, SQLite file and mp4s decoded back.

A four-shot tiny story renders; then its middle shot is re-rendered with an edited prompt (the
other shots' files keep their sha256, the new take differs, the story video is assembled again),
then re-rendered from its previous take with a strength and a cascade (every later shot changes,
the earlier one does not), and the refusals name the field or state that caused them.
"""

from __future__ import annotations

import contextlib
import io
import json
import uuid

import grpc
import pytest

from helpers.daemon_inproc import running_daemon, wait_final
from storyfarm.daemon.cli import main as cli_main
from storyfarm.daemon.client import StoryfarmClient
from storyfarm.daemon.client_wire import StoryfarmError
from storyfarm.m2v import video
from storyfarm.v1 import render_pb2 as pb

STORY = json.dumps({
    "name": "harbour", "seed": 5, "resolution": "64x32", "frames": 9, "steps": 2,
    "shots": [
        {"prompt": "a red boat leaves the harbour at dawn"},
        {"prompt": "the boat passes the lighthouse"},
        {"prompt": "the captain waves from the deck", "cut": False},
        {"prompt": "gulls circle over the open sea"},
    ],
})


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("data")) as (d, stub):
        yield d, stub


def download(stub, story_id, name) -> bytes:
    return b"".join(c.data for c in stub.DownloadArtifact(pb.DownloadArtifactRequest(story_id=story_id, name=name)))


def shas(story: pb.Story) -> dict[str, str]:
    return {a.name: a.sha256 for a in story.artifacts}


def shot_files(story: pb.Story) -> list[str]:
    return sorted(a.name for a in story.artifacts if a.kind == pb.ARTIFACT_KIND_SHOT_VIDEO)


def refused(call) -> StoryfarmError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return StoryfarmError.from_rpc_error(err.value)


def decoded_frames(stub, story_id, name, tmp_path) -> int:
    path = tmp_path / name.replace("/", "_")
    path.write_bytes(download(stub, story_id, name))
    return len(video.read_mp4(path))


def test_rerender_a_middle_shot_then_cascade(daemon, tmp_path):
    d, stub = daemon
    sid = stub.SubmitStory(pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=STORY)).story_id
    first = wait_final(stub, sid)
    assert first.state == pb.STORY_STATE_SUCCEEDED and [s.take for s in first.shots] == [1, 1, 1, 1]
    files = shot_files(first)
    assert len(files) == 4
    before = shas(first)

    # -- an edited prompt for shot 1, no cascade --------------------------------------------------
    request_id = uuid.uuid4().hex
    edited = "the boat passes the lighthouse in a storm"
    reply = stub.RerenderShot(pb.RerenderShotRequest(story_id=sid, shot_index=1, prompt=edited, request_id=request_id))
    assert reply.state == pb.STORY_STATE_RUNNING
    assert (reply.shots[1].state, reply.shots[1].take, reply.shots[1].prompt) == (pb.SHOT_STATE_QUEUED, 2, edited)
    assert [s.state for s in reply.shots[2:]] == [pb.SHOT_STATE_SUCCEEDED] * 2  # not cascaded
    # a repeat of the same request queues nothing more; the same id for another edit is refused
    again = stub.RerenderShot(pb.RerenderShotRequest(story_id=sid, shot_index=1, prompt=edited, request_id=request_id))
    assert again.shots[1].take == 2
    err = refused(lambda: stub.RerenderShot(pb.RerenderShotRequest(story_id=sid, shot_index=1, prompt="other",
                                                                      request_id=request_id)))
    assert (err.code, err.reason) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT")
    # while it renders, the story is busy
    err = refused(lambda: stub.RerenderShot(pb.RerenderShotRequest(story_id=sid, shot_index=3)))
    assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "STORY_BUSY")

    second = wait_final(stub, sid)
    assert second.state == pb.STORY_STATE_SUCCEEDED
    after = shas(second)
    assert shot_files(second) == files
    assert after[files[1]] != before[files[1]]  # the new take
    for name in (files[0], files[2], files[3]):
        assert after[name] == before[name], name  # the other shots' bytes are untouched
    for name in ("story.mp4", "manifest.json", "contact_sheet.png"):
        assert after[name] != before[name], name  # assembled again from the new take
    manifest = json.loads(download(stub, sid, "manifest.json"))
    assert manifest["shots"][1]["prompt"] == edited and manifest["shots"][1]["edit"]["prompt"] == edited
    assert manifest["story_sha256"] == after["story.mp4"]
    assert [s["sha256"] for s in manifest["shots"]] == [after[f] for f in files]
    assert decoded_frames(stub, sid, "story.mp4", tmp_path) == sum(s["frames"] for s in manifest["shots"])
    keyframes = {a.name for a in second.artifacts if a.kind == pb.ARTIFACT_KIND_KEYFRAME}
    assert keyframes == {k["file"] for k in manifest["keyframes"]}  # no stale keyframe of the old take

    # -- refusals name what is wrong ----------------------------------------------------------------
    err = refused(lambda: stub.RerenderShot(pb.RerenderShotRequest(story_id=sid, shot_index=1, strength=1.5)))
    assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_EDIT")
    assert "strength" in dict(err.field_violations)
    err = refused(lambda: stub.RerenderShot(pb.RerenderShotRequest(story_id=sid, shot_index=9)))
    assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "SHOT_NOT_FOUND")
    err = refused(lambda: stub.RetryShot(pb.RetryShotRequest(story_id=sid, shot_index=9)))
    assert (err.code, err.reason) == (grpc.StatusCode.NOT_FOUND, "SHOT_NOT_FOUND")
    assert dict(err.field_violations)["shot_index"] == "0 to 3 (shots 1 to 4)"
    assert "has no shot_index 9 (shot 10); its shots are 1 to 4" in str(err)

    # -- from the previous take with a strength, cascading to the later shots ------------------------
    client = StoryfarmClient(f"127.0.0.1:{d.port}")
    story = client.rerender_shot(sid, 1, strength=0.5, cascade=True)
    assert [s["state"] for s in story["shots"]] == ["succeeded", "queued", "waiting", "waiting"]
    third = wait_final(stub, sid)
    assert third.state == pb.STORY_STATE_SUCCEEDED and [s.take for s in third.shots] == [1, 3, 2, 2]
    cascaded = shas(third)
    assert cascaded[files[0]] == before[files[0]]
    for name in files[1:]:
        assert cascaded[name] != after[name], name  # every later shot rendered again
    manifest = json.loads(download(stub, sid, "manifest.json"))
    assert manifest["shots"][1]["prompt"] == edited  # the edit stays with the shot
    assert manifest["shots"][1]["edit"]["strength"] == 0.5 and manifest["shots"][1]["edit"]["start_step"] == 1

    # -- the CLI, and RetryShot's rerender option (the same path) -------------------------------------
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(["rerender", sid, "4", "--prompt", "gulls over a calm sea", "--server", f"127.0.0.1:{d.port}",
                         "--json"])
    assert code == 0 and json.loads(out.getvalue())["shots"][3]["take"] == 3
    assert wait_final(stub, sid).state == pb.STORY_STATE_SUCCEEDED
    retried = stub.RetryShot(pb.RetryShotRequest(story_id=sid, shot_index=0, rerender=True, seed=77))
    assert retried.shots[0].take == 2 and retried.shots[0].state == pb.SHOT_STATE_QUEUED
    final = wait_final(stub, sid)
    assert final.state == pb.STORY_STATE_SUCCEEDED
    assert shas(final)[files[0]] != before[files[0]] and shas(final)[files[1]] == cascaded[files[1]]
    assert json.loads(download(stub, sid, "manifest.json"))["shots"][0]["seed"] == 77


def test_a_strength_is_refused_for_a_fifo_shot(daemon):
    d, stub = daemon
    long = json.dumps({"resolution": "64x32", "steps": 2, "shots": [{"prompt": "a long take", "frames": 33}]})
    sid = stub.SubmitStory(pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=long)).story_id
    try:
        err = refused(lambda: stub.RerenderShot(pb.RerenderShotRequest(story_id=sid, shot_index=0, strength=0.5)))
        assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_EDIT")
        assert "FIFO" in dict(err.field_violations)["strength"]
    finally:
        stub.CancelStory(pb.CancelStoryRequest(story_id=sid))
