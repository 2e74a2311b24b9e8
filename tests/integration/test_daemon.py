"""The daemon over a real socket: real worker processes, a real SQLite file, real mp4s.

Stories here are small (64x32, 9 frames, 2 steps) so each shot takes a second or two on CPU.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import uuid

import grpc
import pytest
from PIL import Image

from helpers.daemon_inproc import running_daemon, submit, wait_final
from helpers.daemon_proc import violations
from storyfarm.daemon.server import Daemon
from storyfarm.story.numbering import keyframe_id
from storyfarm.v1 import render_pb2 as pb

SMALL = {"resolution": "64x32", "frames": 9, "steps": 2}


def story_yaml(n_shots=3, **over) -> str:
    doc = {"name": "harbour", "seed": 5, **SMALL, **over,
           "shots": [{"prompt": f"shot {i} of the harbour at dawn", **({"cut": False} if i == 1 else {})} for i in range(n_shots)]}
    return json.dumps(doc)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("data")) as (d, stub):
        yield d, stub


def download(stub, story_id, name, offset=0):
    chunks = list(stub.DownloadArtifact(pb.DownloadArtifactRequest(story_id=story_id, name=name, offset=offset)))
    return chunks[0], b"".join(c.data for c in chunks)


def test_submit_watch_download(daemon):
    d, stub = daemon
    request_id = uuid.uuid4().hex
    first = submit(stub, story_yaml(), request_id)
    again = submit(stub, story_yaml(), request_id)
    assert first.created and not again.created and again.story_id == first.story_id and first.shot_count == 3

    events = list(stub.WatchStory(pb.WatchStoryRequest(story_id=first.story_id, include_previews=True), timeout=180))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "snapshot"
    steps = {(e.progress.shot_index, e.progress.step) for e in events if e.HasField("progress") and e.progress.step}
    assert {(i, s) for i in range(3) for s in (1, 2)} <= steps  # every shot and every step seen
    finals = [e.story_state_changed.new_state for e in events if e.HasField("story_state_changed")]
    assert finals[-1] == pb.STORY_STATE_SUCCEEDED
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs)
    published = {e.artifact_published.artifact.name for e in events if e.HasField("artifact_published")}
    succeeded = [e.shot_state_changed for e in events if e.HasField("shot_state_changed")
                 and e.shot_state_changed.new_state == pb.SHOT_STATE_SUCCEEDED]
    assert [s.attempt for s in succeeded] == [1, 1, 1] and all(s.worker == "w0" for s in succeeded)
    previews = [e.keyframe_preview for e in events if e.HasField("keyframe_preview")]
    assert previews and all(p.image.startswith(b"\x89PNG") and p.width <= 160 for p in previews)
    # ids count shots and frames from 1, the message's indices from 0 (story/numbering.py)
    assert all(p.keyframe_id == keyframe_id(p.shot_index, p.frame_index) for p in previews), previews
    etas = [e.progress for e in events if e.HasField("progress") and e.progress.HasField("eta")]
    assert etas and all(p.eta.ToTimedelta().total_seconds() >= p.shot_eta.ToTimedelta().total_seconds() for p in etas)

    story = stub.GetStory(pb.GetStoryRequest(story_id=first.story_id))
    assert [s.state for s in story.shots] == [pb.SHOT_STATE_SUCCEEDED] * 3
    names = {a.name for a in story.artifacts}
    assert published == names  # every artifact was announced on the watch
    assert {"story.mp4", "manifest.json", "contact_sheet.png"} <= names
    assert sum(a.kind == pb.ARTIFACT_KIND_SHOT_VIDEO for a in story.artifacts) == 3
    for artifact in story.artifacts:
        head, data = download(stub, first.story_id, artifact.name)
        assert head.total_size == len(data) == artifact.size
        assert hashlib.sha256(data).hexdigest() == head.sha256 == artifact.sha256
    # resumable: a download from an offset returns the tail
    _, whole = download(stub, first.story_id, "story.mp4")
    _, tail = download(stub, first.story_id, "story.mp4", offset=1000)
    assert tail == whole[1000:]
    manifest = json.loads(download(stub, first.story_id, "manifest.json")[1])
    assert [s["transition"] for s in manifest["shots"]] == [None, "first_frame", None]


def test_bad_input_gets_field_errors_and_writes_nothing(daemon):
    d, stub = daemon
    before = stub.ListStories(pb.ListStoriesRequest(page_size=100)).stories
    with pytest.raises(grpc.RpcError) as err:
        submit(stub, json.dumps({"shots": [{"prompt": "a"}, {"promt": "typo"}]}))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields, reason = violations(err.value)
    assert reason == "INVALID_STORY" and {"story_json.shots[1].promt", "story_json.shots[1].prompt"} <= set(fields)
    with pytest.raises(grpc.RpcError) as err:
        submit(stub, json.dumps({"shots": [{"prompt": "a", "frames": 10}]}))
    assert "story_json.shots[0].frames" in violations(err.value)[0]
    huge = json.dumps({"shots": [{"prompt": "a", "resolution": "1920x1088", "frames": 321, "steps": 200}]})
    with pytest.raises(grpc.RpcError) as err:
        submit(stub, huge)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as err:
        submit(stub, story_yaml(), reference_images=[pb.ReferenceImage(name="../evil.png", data=b"x")])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bomb = io.BytesIO()  # 48 megapixels of black: a few hundred KB as PNG, refused from its header
    Image.new("L", (8000, 6000)).save(bomb, format="PNG")
    with pytest.raises(grpc.RpcError) as err:
        submit(stub, json.dumps({**SMALL, "references": ["bomb.png"], "shots": [{"prompt": "a"}]}),
               reference_images=[pb.ReferenceImage(name="bomb.png", data=bomb.getvalue())])
    fields, reason = violations(err.value)
    assert reason == "INVALID_REFERENCE_IMAGE" and "pixels" in fields["reference_images[0].data"]
    assert len(stub.ListStories(pb.ListStoriesRequest(page_size=100)).stories) == len(before)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetStory(pb.GetStoryRequest(story_id="st_0000000000000000"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_cancel_stops_a_running_shot_within_a_step(daemon):
    d, stub = daemon
    slow = story_yaml(2, steps=40, frames=17, resolution="160x96")
    sid = submit(stub, slow).story_id
    seen: list[tuple[float, int]] = []  # (time, step) of every progress event of shot 0

    def watch():
        for e in stub.WatchStory(pb.WatchStoryRequest(story_id=sid), timeout=120):
            if e.HasField("progress") and e.progress.shot_index == 0:
                # the daemon's timestamp (when the step's report reached it), not when this thread
                # got the event: a burst delivered after the cancel may hold steps made before it
                seen.append((e.time.ToNanoseconds() / 1e9, e.progress.step))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    deadline = time.monotonic() + 60
    while not any(step >= 3 for _, step in seen):
        assert time.monotonic() < deadline, "shot 0 never started denoising"
        time.sleep(0.01)
    stub.CancelStory(pb.CancelStoryRequest(story_id=sid))
    cancelled_at = time.time()
    while stub.GetStory(pb.GetStoryRequest(story_id=sid)).shots[0].state == pb.SHOT_STATE_RUNNING:
        assert time.time() - cancelled_at < 10, "the running shot did not stop"
        time.sleep(0.02)
    story = stub.GetStory(pb.GetStoryRequest(story_id=sid))
    assert story.state == pb.STORY_STATE_CANCELLED
    assert [s.state for s in story.shots] == [pb.SHOT_STATE_CANCELLED] * 2
    watcher.join(timeout=10)
    steps_after = [step for t, step in seen if t > cancelled_at]
    before = max(step for t, step in seen if t <= cancelled_at)
    # the worker checks cancel before every step: at most the step in flight completes
    assert not steps_after or max(steps_after) <= before + 2, (before, steps_after)
    assert max(step for _, step in seen) < 40
    # the worker is free again: a new story runs to the end
    assert wait_final(stub, submit(stub, story_yaml(1)).story_id).state == pb.STORY_STATE_SUCCEEDED


def test_a_second_daemon_on_the_same_data_dir_is_refused(daemon):
    d, _ = daemon
    with pytest.raises(RuntimeError, match="in use by another storyfarm daemon"):
        Daemon(d.config)


def test_batch_submit_watch_cancel(daemon):
    d, stub = daemon
    batch_id = f"overnight-{uuid.uuid4().hex[:6]}"
    stories = [pb.SubmitStoryRequest(request_id=f"{batch_id}-{i}", story_json=story_yaml(1)) for i in range(2)]
    bad = pb.SubmitBatchRequest(batch_id=batch_id, stories=[*stories, pb.SubmitStoryRequest(request_id="x", story_json="{}")])
    with pytest.raises(grpc.RpcError) as err:
        stub.SubmitBatch(bad)
    assert any(f.startswith("stories[2].") for f in violations(err.value)[0])  # all or nothing
    with pytest.raises(grpc.RpcError) as err:
        stub.GetBatch(pb.GetBatchRequest(batch_id=batch_id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    response = stub.SubmitBatch(pb.SubmitBatchRequest(batch_id=batch_id, stories=stories))
    assert response.batch.story_count == 2 and all(s.created for s in response.stories)
    again = stub.SubmitBatch(pb.SubmitBatchRequest(batch_id=batch_id, stories=stories))  # a retried batch
    assert [s.story_id for s in again.stories] == [s.story_id for s in response.stories] and not any(s.created for s in again.stories)
    events = list(stub.WatchBatch(pb.WatchBatchRequest(batch_id=batch_id), timeout=180))
    assert events[-1].batch_snapshot.done
    counts = {c.state: c.count for c in stub.GetBatch(pb.GetBatchRequest(batch_id=batch_id)).stories_by_state}
    assert counts == {pb.STORY_STATE_SUCCEEDED: 2}

    late = f"{batch_id}-late"
    stub.SubmitBatch(pb.SubmitBatchRequest(batch_id=late, stories=[pb.SubmitStoryRequest(request_id=f"{late}-0", story_json=story_yaml(3, steps=20))]))
    cancelled = stub.CancelBatch(pb.CancelBatchRequest(batch_id=late))
    assert cancelled.done or {c.state for c in cancelled.stories_by_state} == {pb.STORY_STATE_CANCELLED}
    story_id = stub.ListStories(pb.ListStoriesRequest(batch_id=late)).stories[0].story_id
    assert wait_final(stub, story_id).state == pb.STORY_STATE_CANCELLED


def test_pool_shows_workers_memory_residency_and_queue_depth(daemon):
    d, stub = daemon
    slow = stub.SubmitStory(pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=story_yaml(2, steps=30)))
    queued = stub.SubmitStory(pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=story_yaml(2)))
    deadline = time.monotonic() + 60
    while True:
        pool = stub.GetPool(pb.GetPoolRequest())
        shots = {c.state: c.count for c in pool.shots_by_state}
        if pool.workers[0].state == pb.WORKER_STATE_BUSY and shots.get(pb.SHOT_STATE_QUEUED):
            break
        assert time.monotonic() < deadline, pool
        time.sleep(0.05)
    assert pool.workers[0].current_shot.story_id == slow.story_id
    assert shots[pb.SHOT_STATE_QUEUED] >= 1 and shots[pb.SHOT_STATE_WAITING] >= 1  # the other story's shots
    # after shot 0 of the slow story the worker holds that story's memory latents
    while stub.GetStory(pb.GetStoryRequest(story_id=slow.story_id)).shots[0].state != pb.SHOT_STATE_SUCCEEDED:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert stub.GetPool(pb.GetPoolRequest()).workers[0].resident_story_count >= 1
    stub.CancelStory(pb.CancelStoryRequest(story_id=slow.story_id))
    stub.CancelStory(pb.CancelStoryRequest(story_id=queued.story_id))
