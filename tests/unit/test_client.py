"""The Python client and the client CLI commands against a real gRPC server on 127.0.0.1.

The server runs `FakeDaemon`, an in-memory RenderService servicer that can misbehave on cue:
commit a submit and then answer UNAVAILABLE, drop a watch stream midway, break a download after
some chunks. It sits behind the real AuthInterceptor, so tokens and roles are checked as the
daemon checks them. CLI commands run in-process through cli.main with --server pointing at it.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import subprocess
import sys
import threading
import uuid
from concurrent import futures
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from rich.console import Console
from storyfarm.v1 import render_pb2 as pb
from storyfarm.v1 import render_pb2_grpc

from storyfarm.daemon import cli
from storyfarm.daemon.auth import AuthInterceptor, Authorizer, hash_token
from storyfarm.daemon.client import RetryPolicy, StoryfarmClient, StoryfarmError
from storyfarm.daemon.config import AuthConfig, TokenEntry

ADMIN, VIEWER = "sft_admin-token", "sft_viewer-token"
FAST = RetryPolicy(initial=0.01, maximum=0.05, reconnect_window=5.0)
CHUNK = 256 * 1024
STORY_YAML = "name: kite\nshots:\n  - prompt: a kite over the sea\n  - prompt: the kite lands\n"


def abort(context, code: grpc.StatusCode, message: str, *details) -> None:
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    for detail in details:
        status.details.add().Pack(detail)
    context.abort_with_status(rpc_status.to_status(status))


def info(reason: str, **metadata) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain="storyfarm", metadata=metadata)


class FakeDaemon(render_pb2_grpc.RenderServiceServicer):
    """Stories, events and artifacts in memory; every request recorded with its metadata."""

    def __init__(self):
        self.lock = threading.Lock()
        self.stories: dict[str, pb.Story] = {}
        self.by_request_id: dict[str, str] = {}
        self.requests: list[tuple[str, object, dict]] = []
        self.artifacts: dict[tuple[str, str], bytes] = {}
        self.unavailable_after_commit = 0  # SubmitStory: store the story, then fail this many times
        self.drop_watch = True  # the first WatchStory breaks after the first shot
        self.download_breaks = 0  # DownloadArtifact: break this many streams after 3 chunks
        self.meta_in_first_chunk_only = False  # DownloadArtifact: size and sha256 only in the first chunk (older daemons)
        self.final_state = pb.STORY_STATE_SUCCEEDED

    def seen(self, rpc: str) -> list:
        return [request for name, request, _ in self.requests if name == rpc]

    def _record(self, rpc, request, context):
        with self.lock:
            self.requests.append((rpc, type(request).FromString(request.SerializeToString()),
                                  dict(context.invocation_metadata())))

    def add_story(self, name="kite", project="demo", state=pb.STORY_STATE_QUEUED, batch_id="", request_id="") -> pb.Story:
        story_id = f"st_{len(self.stories):04d}"
        story = pb.Story(story_id=story_id, name=name, project=project, state=state, batch_id=batch_id,
                         request_id=request_id, shot_count=2, preset="tiny")
        story.create_time.FromDatetime(datetime(2025, 4, 12, 22, 0, tzinfo=timezone.utc) + timedelta(minutes=len(self.stories)))
        for i in range(2):
            story.shots.add(index=i, scene=1, shot=i + 1, prompt=f"shot {i}", cut=True, state=pb.SHOT_STATE_QUEUED)
        self.stories[story_id] = story
        return story

    def add_artifact(self, story_id: str, name: str, data: bytes) -> None:
        self.artifacts[(story_id, name)] = data
        self.stories[story_id].artifacts.add(name=name, kind=pb.ARTIFACT_KIND_STORY_VIDEO, size=len(data),
                                             sha256=hashlib.sha256(data).hexdigest(), content_type="video/mp4")

    def _story(self, story_id, context) -> pb.Story:
        if story_id not in self.stories:
            abort(context, grpc.StatusCode.NOT_FOUND, f"no story {story_id}", info("STORY_NOT_FOUND", story_id=story_id),
                  error_details_pb2.ResourceInfo(resource_type="storyfarm.v1.Story", resource_name=story_id))
        return self.stories[story_id]

    def SubmitStory(self, request, context):
        self._record("SubmitStory", request, context)
        if "bad" in request.story_yaml:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "the story does not validate", info("INVALID_STORY"),
                  error_details_pb2.BadRequest(field_violations=[
                      error_details_pb2.BadRequest.FieldViolation(field="story_yaml.shots[0].prompt", description="must not be empty"),
                      error_details_pb2.BadRequest.FieldViolation(field="story_yaml.shots[1].seed", description="must be 0 to 2^63-1"),
                  ]))
        with self.lock:
            known = self.by_request_id.get(request.request_id)
            if known is None:
                known = self.add_story(project=request.project or "demo", request_id=request.request_id).story_id
                self.by_request_id[request.request_id] = known
                created = True
            else:
                created = False
            fail = self.unavailable_after_commit > 0
            self.unavailable_after_commit -= fail
        if fail:  # committed, but the reply is lost
            abort(context, grpc.StatusCode.UNAVAILABLE, "connection reset",
                  error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=10_000_000)))
        return pb.SubmitStoryResponse(story_id=known, created=created, shot_count=2, warnings=["shots[0].cut: read as cut: true"])

    def SubmitBatch(self, request, context):
        self._record("SubmitBatch", request, context)
        batch = pb.Batch(batch_id=request.batch_id, deadline_time=request.deadline_time, story_count=len(request.stories))
        replies = [pb.SubmitStoryResponse(story_id=self.add_story(batch_id=request.batch_id, request_id=s.request_id).story_id,
                                          created=True, shot_count=2) for s in request.stories]
        return pb.SubmitBatchResponse(batch=batch, stories=replies)

    def GetStory(self, request, context):
        self._record("GetStory", request, context)
        return self._story(request.story_id, context)

    def ListStories(self, request, context):
        self._record("ListStories", request, context)
        hits = [s for s in self.stories.values()
                if (not request.states or s.state in request.states) and (not request.batch_id or s.batch_id == request.batch_id)]
        start = int(request.page_token or 0)
        end = start + (request.page_size or 50)
        page = [pb.Story(story_id=s.story_id, name=s.name, project=s.project, state=s.state, shot_count=s.shot_count,
                         create_time=s.create_time) for s in hits[start:end]]
        return pb.ListStoriesResponse(stories=page, next_page_token=str(end) if end < len(hits) else "")

    def CancelStory(self, request, context):
        self._record("CancelStory", request, context)
        story = self._story(request.story_id, context)
        story.state = pb.STORY_STATE_CANCELLED
        return story

    def RetryShot(self, request, context):
        self._record("RetryShot", request, context)
        abort(context, grpc.StatusCode.UNAVAILABLE, "connection reset")

    def RerenderShot(self, request, context):
        self._record("RerenderShot", request, context)
        return self._story(request.story_id, context)

    def GetPool(self, request, context):
        self._record("GetPool", request, context)
        worker = pb.Worker(worker_id="gpu0-1", devices=["cuda:0"], state=pb.WORKER_STATE_BUSY, resident_story_count=1,
                           current_shot=pb.ShotRef(story_id="st_0000", shot_index=1),
                           progress=pb.ShotProgress(stage=pb.RENDER_STAGE_DENOISE, step=3, total_steps=8))
        return pb.GetPoolResponse(workers=[worker], stories_by_state=[pb.StoryStateCount(state=pb.STORY_STATE_QUEUED, count=2)])

    def Drain(self, request, context):
        self._record("Drain", request, context)
        return pb.DrainResponse(draining=not request.undrain, running_shot_count=1)

    def _events(self, story_id: str) -> list[pb.StoryEvent]:
        """Shot 0 runs and succeeds (seqs 11-13), shot 1 runs (15), then the story finishes (17-19).
        Progress events carry the seq of the last durable event, as the contract says."""
        def ev(seq, **kw):
            return pb.StoryEvent(seq=seq, story_id=story_id, **kw)
        done = pb.SHOT_STATE_SUCCEEDED if self.final_state == pb.STORY_STATE_SUCCEEDED else pb.SHOT_STATE_FAILED
        return [
            ev(11, story_state_changed=pb.StoryStateChanged(old_state=pb.STORY_STATE_QUEUED, new_state=pb.STORY_STATE_RUNNING)),
            ev(11, progress=pb.Progress(shot_index=0, stage=pb.RENDER_STAGE_DENOISE, step=1, total_steps=2,
                                        eta=duration_pb2.Duration(seconds=30))),
            ev(11, progress=pb.Progress(shot_index=0, stage=pb.RENDER_STAGE_DENOISE, step=2, total_steps=2)),
            ev(13, shot_state_changed=pb.ShotStateChanged(shot_index=0, old_state=pb.SHOT_STATE_RUNNING,
                                                          new_state=pb.SHOT_STATE_SUCCEEDED, attempt=1, worker="gpu0-1")),
            ev(15, shot_state_changed=pb.ShotStateChanged(shot_index=1, old_state=pb.SHOT_STATE_QUEUED,
                                                          new_state=pb.SHOT_STATE_RUNNING, attempt=1, worker="gpu0-1")),
            ev(15, heartbeat=pb.Heartbeat()),
            ev(17, shot_state_changed=pb.ShotStateChanged(shot_index=1, old_state=pb.SHOT_STATE_RUNNING, new_state=done,
                                                          attempt=1, worker="gpu0-1", reason="" if done == pb.SHOT_STATE_SUCCEEDED else "out of memory")),
            ev(19, story_state_changed=pb.StoryStateChanged(old_state=pb.STORY_STATE_RUNNING, new_state=self.final_state)),
        ]

    def WatchStory(self, request, context):
        self._record("WatchStory", request, context)
        story = self._story(request.story_id, context)
        if request.after_seq == 0:
            yield pb.StoryEvent(seq=10, story_id=story.story_id, snapshot=pb.Snapshot(story=story))
        for event in self._events(story.story_id):
            if event.seq <= request.after_seq:
                continue  # already delivered (durable) or gone (ephemeral)
            if event.seq > 13 and self.drop_watch:
                self.drop_watch = False
                abort(context, grpc.StatusCode.UNAVAILABLE, "daemon restarting")
            yield event
        story.state = self.final_state

    def ListArtifacts(self, request, context):
        self._record("ListArtifacts", request, context)
        return pb.ListArtifactsResponse(artifacts=self._story(request.story_id, context).artifacts)

    def DownloadArtifact(self, request, context):
        self._record("DownloadArtifact", request, context)
        self._story(request.story_id, context)
        data = self.artifacts.get((request.story_id, request.name))
        if data is None:
            abort(context, grpc.StatusCode.NOT_FOUND, "no such artifact", info("ARTIFACT_NOT_FOUND", name=request.name))
        sha = hashlib.sha256(data).hexdigest()
        if request.expected_sha256 and request.expected_sha256 != sha:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, "artifact changed", info("ARTIFACT_CHANGED", sha256=sha))
        if not 0 <= request.offset <= len(data):
            abort(context, grpc.StatusCode.OUT_OF_RANGE, "offset past the end", info("OFFSET_OUT_OF_RANGE", size=str(len(data))))
        for n, offset in enumerate(range(request.offset, max(len(data), request.offset + 1), CHUNK)):
            if n == 3 and self.download_breaks:
                self.download_breaks -= 1
                abort(context, grpc.StatusCode.UNAVAILABLE, "connection reset")
            meta = {} if n and self.meta_in_first_chunk_only else {"total_size": len(data), "sha256": sha}
            yield pb.ArtifactChunk(offset=offset, data=data[offset:offset + CHUNK], **meta)


@pytest.fixture
def daemon():
    """(fake, address): a real server on an ephemeral loopback port, tokens required."""
    fake = FakeDaemon()
    authorizer = Authorizer(AuthConfig(require=True, tokens=[
        TokenEntry(name="ci-admin", project="*", role="admin", sha256=hash_token(ADMIN)),
        TokenEntry(name="ci-viewer", project="demo", role="viewer", sha256=hash_token(VIEWER)),
    ]))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[AuthInterceptor(authorizer)])
    render_pb2_grpc.add_RenderServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def client(daemon):
    with StoryfarmClient(daemon[1], ADMIN, timeout=5, retry=FAST) as c:
        yield c


def run_cli(capsys, address, *argv, token=ADMIN):
    code = cli.main([*argv, "--server", address, "--token", token])
    out, err = capsys.readouterr()
    return code, out, err


# --- the client --------------------------------------------------------------------------------

def test_submit_retries_with_the_same_request_id(daemon, client, tmp_path):
    fake, _ = daemon
    story = tmp_path / "kite.yaml"
    story.write_text(STORY_YAML)
    fake.unavailable_after_commit = 1  # the first call commits, then its reply is lost
    result = client.submit(story, project="demo", priority=5, labels={"show": "kite"})
    sent = fake.seen("SubmitStory")
    assert len(sent) == 2 and sent[0].request_id == sent[1].request_id == result["request_id"]
    assert uuid.UUID(result["request_id"]).version == 4
    assert result["created"] is False and len(fake.stories) == 1 and result["story_id"] in fake.stories
    assert sent[0].story_yaml == STORY_YAML and sent[0].priority == 5 and dict(sent[0].labels) == {"show": "kite"}
    again = client.submit(story, request_id=result["request_id"])
    assert again["story_id"] == result["story_id"] and not again["created"]


def test_submit_reads_files_texts_references_and_deadlines(daemon, client, tmp_path):
    fake, _ = daemon
    (tmp_path / "s.json").write_text('{"name": "x", "shots": [{"prompt": "p"}]}')
    (tmp_path / "lena.png").write_bytes(b"\x89PNG fake")
    client.submit(tmp_path / "s.json", references={"lena.png": tmp_path / "lena.png"}, deadline="07:00")
    client.submit(STORY_YAML)
    first, second = fake.seen("SubmitStory")
    assert first.WhichOneof("story") == "story_json" and second.WhichOneof("story") == "story_yaml"
    assert [(r.name, r.data) for r in first.reference_images] == [("lena.png", b"\x89PNG fake")]
    deadline = first.deadline_time.ToDatetime(tzinfo=timezone.utc) - datetime.now(timezone.utc)
    assert timedelta(0) < deadline <= timedelta(hours=24)
    with pytest.raises(FileNotFoundError, match="no such file"):
        client.submit(tmp_path / "missing.yaml")
    with pytest.raises(FileNotFoundError):
        client.submit("typo.yaml")  # looks like a file name: never sent as a one-line story


def test_list_iterates_every_page_and_maps_states(daemon, client):
    fake, _ = daemon
    for i in range(7):
        fake.add_story(state=pb.STORY_STATE_RUNNING if i % 2 else pb.STORY_STATE_QUEUED)
    stories = client.list(page_size=3)
    assert [s["story_id"] for s in stories] == sorted(fake.stories)
    assert [r.page_token for r in fake.seen("ListStories")] == ["", "3", "6"]
    assert {s["state"] for s in stories} == {"queued", "running"}
    assert stories[0]["create_time"] == datetime(2025, 4, 12, 22, 0, tzinfo=timezone.utc)
    running = client.list(states=["running"], page_size=100)
    assert len(running) == 3 and list(fake.seen("ListStories")[-1].states) == [pb.STORY_STATE_RUNNING]
    with pytest.raises(ValueError, match="expected one of queued, running"):
        client.list(states=["runing"])


def test_watch_reconnects_after_the_last_seq_seen(daemon, client):
    fake, _ = daemon
    story_id = fake.add_story().story_id
    events = list(client.watch(story_id))
    assert [r.after_seq for r in fake.seen("WatchStory")] == [0, 13]
    assert [(e.seq, e.kind) for e in events] == [
        (10, "snapshot"), (11, "story_state_changed"), (11, "progress"), (11, "progress"), (13, "shot_state_changed"),
        (15, "shot_state_changed"), (15, "heartbeat"), (17, "shot_state_changed"), (19, "story_state_changed")]
    assert events[2].data["stage"] == "denoise" and events[2].data["eta"] == 30.0 and events[3].data["eta"] is None
    assert events[-1].data["new_state"] == "succeeded"


def test_download_resumes_from_the_part_file_and_checks_sha256(daemon, client, tmp_path):
    fake, _ = daemon
    story_id = fake.add_story().story_id
    data = random.Random(1).randbytes(5 * CHUNK + 1234)
    fake.add_artifact(story_id, "story.mp4", data)
    fake.download_breaks = 1
    seen = []
    result = client.download(story_id, "story.mp4", tmp_path / "out" / "story.mp4", on_progress=lambda got, total: seen.append(got))
    sha = hashlib.sha256(data).hexdigest()
    assert result["sha256"] == sha and (tmp_path / "out" / "story.mp4").read_bytes() == data
    assert [(r.offset, r.expected_sha256) for r in fake.seen("DownloadArtifact")] == [(0, ""), (3 * CHUNK, sha)]
    assert seen[-1] == len(data) and not (tmp_path / "out" / "story.mp4.part").exists()
    fake.add_artifact(story_id, "../escape.mp4", b"x")
    with pytest.raises(StoryfarmError, match="unsafe artifact name"):
        client.download_all(story_id, tmp_path / "all")


def test_download_keeps_the_size_and_sha256_of_the_first_chunk(daemon, client, tmp_path):
    fake, _ = daemon
    story_id = fake.add_story().story_id
    data = random.Random(4).randbytes(4 * CHUNK + 7)
    fake.add_artifact(story_id, "story.mp4", data)
    fake.meta_in_first_chunk_only, fake.download_breaks = True, 1
    assert client.download(story_id, "story.mp4", tmp_path / "story.mp4")["sha256"] == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "story.mp4").read_bytes() == data
    assert [r.expected_sha256 for r in fake.seen("DownloadArtifact")] == ["", hashlib.sha256(data).hexdigest()]


def test_download_starts_over_when_a_leftover_part_does_not_match(daemon, client, tmp_path):
    fake, _ = daemon
    story_id = fake.add_story().story_id
    data = random.Random(2).randbytes(2 * CHUNK)
    fake.add_artifact(story_id, "story.mp4", data)
    (tmp_path / "story.mp4.part").write_bytes(b"junk from an older take")
    client.download(story_id, "story.mp4", tmp_path / "story.mp4")
    assert (tmp_path / "story.mp4").read_bytes() == data
    assert [r.offset for r in fake.seen("DownloadArtifact")] == [len(b"junk from an older take"), 0]


def test_errors_carry_the_rich_status_details(daemon, client):
    fake, _ = daemon
    with pytest.raises(StoryfarmError) as caught:
        client.submit("name: bad\nshots: []\n")
    err = caught.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.reason == "INVALID_STORY"
    assert err.field_violations == [("story_yaml.shots[0].prompt", "must not be empty"),
                                    ("story_yaml.shots[1].seed", "must be 0 to 2^63-1")]
    with pytest.raises(StoryfarmError) as caught:
        client.get("st_nope")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND and caught.value.resource == ("storyfarm.v1.Story", "st_nope")
    with pytest.raises(StoryfarmError, match="UNAVAILABLE"):
        client.retry_shot(fake.add_story().story_id, 1)
    assert len(fake.seen("RetryShot")) == 1  # not idempotent: never retried


def test_token_and_server_come_from_the_environment(daemon, monkeypatch):
    fake, address = daemon
    monkeypatch.setenv("STORYFARM_SERVER", address)
    monkeypatch.setenv("STORYFARM_TOKEN", VIEWER)
    story_id = fake.add_story().story_id
    with StoryfarmClient(retry=FAST) as c:
        assert c.get(story_id)["story_id"] == story_id
        with pytest.raises(StoryfarmError) as caught:
            c.cancel(story_id)
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert fake.requests[0][2]["authorization"] == f"Bearer {VIEWER}"


def test_client_imports_neither_torch_nor_the_engine():
    code = ("import sys, storyfarm.daemon.cli, storyfarm.daemon.client; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('storyfarm.m2v')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the CLI -----------------------------------------------------------------------------------

def test_cli_get_json_shape_and_exit_codes(daemon, capsys):
    fake, address = daemon
    story = fake.add_story(state=pb.STORY_STATE_RUNNING)
    story.shots[0].state, story.shots[0].attempts, story.shots[0].worker = pb.SHOT_STATE_SUCCEEDED, 1, "gpu0-1"
    fake.add_artifact(story.story_id, "shots/0000.mp4", b"mp4 bytes")
    code, out, _ = run_cli(capsys, address, "get", story.story_id, "--json")
    got = json.loads(out)
    assert code == 0 and got["state"] == "running" and got["create_time"] == "2025-04-12T22:00:00Z"
    assert [{k: s[k] for k in ("index", "state", "attempts", "worker")} for s in got["shots"]] == [
        {"index": 0, "state": "succeeded", "attempts": 1, "worker": "gpu0-1"},
        {"index": 1, "state": "queued", "attempts": 0, "worker": ""}]
    assert {k: got["artifacts"][0][k] for k in ("name", "size", "sha256")} == {
        "name": "shots/0000.mp4", "size": 9, "sha256": hashlib.sha256(b"mp4 bytes").hexdigest()}
    assert run_cli(capsys, address, "get", "st_nope")[0] == 3
    assert run_cli(capsys, address, "get", story.story_id, token="sft_wrong")[0] == 4
    assert run_cli(capsys, address, "cancel", story.story_id, token=VIEWER)[0] == 4
    assert run_cli(capsys, address, "ls", "--state", "runing")[0] == 2
    code, out, _ = run_cli(capsys, address, "cancel", story.story_id)
    assert code == 0 and out.strip() == f"{story.story_id}: cancelled"


def test_cli_numbers_shots_from_1_and_the_wire_keeps_the_index(daemon, capsys):
    """What people read and type counts shots from 1 (story/numbering.py); requests and --json keep
    the API's 0-based index, and --json adds the number beside it."""
    fake, address = daemon
    story = fake.add_story(state=pb.STORY_STATE_SUCCEEDED)
    code, out, _ = run_cli(capsys, address, "get", story.story_id)
    rows = [line.split()[:2] for line in out.splitlines() if re.match(r"\s*\d+\s+1\.\d\s", line)]
    assert code == 0 and rows == [["1", "1.1"], ["2", "1.2"]], out
    code, out, _ = run_cli(capsys, address, "get", story.story_id, "--json")
    assert [(s["index"], s["number"]) for s in json.loads(out)["shots"]] == [(0, 1), (1, 2)]
    before = len(fake.seen("RetryShot"))
    code, _, err = run_cli(capsys, address, "retry-shot", story.story_id, "0")
    assert code == 2 and "SHOT 0: shot numbers count from 1" in err and len(fake.seen("RetryShot")) == before
    run_cli(capsys, address, "retry-shot", story.story_id, "2")  # the fake answers UNAVAILABLE
    assert fake.seen("RetryShot")[-1].shot_index == 1
    assert run_cli(capsys, address, "rerender", story.story_id, "2", "--prompt", "a red kite")[0] == 0
    assert (fake.seen("RerenderShot")[-1].shot_index, fake.seen("RerenderShot")[-1].prompt) == (1, "a red kite")
    assert run_cli(capsys, address, "rerender", story.story_id, "0")[0] == 2


def test_watch_names_shots_by_number_with_their_scene():
    from storyfarm.daemon.cli_client import WatchView

    text = io.StringIO()
    view = WatchView(Console(file=text, width=200), "st_1")
    shots = [{"index": i, "scene": 1, "shot": i + 1, "state": "queued", "progress": None} for i in range(3)]
    view.handle(SimpleNamespace(kind="snapshot", data={"story": {"state": "running", "shot_count": 3, "eta": None,
                                                                 "shots": shots}}))
    view.handle(SimpleNamespace(kind="progress", data={"shot_index": 2, "stage": "denoise", "step": 1, "total_steps": 4,
                                                       "shot_eta": None, "eta": None}))
    assert view.bars.tasks[view.shot_bar].description == "shot 3 of 3 (scene 1.3) denoise"
    view.handle(SimpleNamespace(kind="shot_state_changed", data={"shot_index": 2, "new_state": "succeeded",
                                                                 "worker": "w0", "reason": "", "attempt": 1}))
    assert "shot 3 of 3 (scene 1.3) succeeded on w0 (attempt 1)" in text.getvalue()


def test_cli_prints_field_violations_with_exit_code_2(daemon, capsys, tmp_path):
    _, address = daemon
    (tmp_path / "bad.yaml").write_text("name: bad\nshots:\n  - prompt: p\n")  # valid here: the (fake) daemon refuses it
    code, out, err = run_cli(capsys, address, "submit", str(tmp_path / "bad.yaml"), "--json")
    assert code == 2 and out == ""
    assert "INVALID_ARGUMENT (INVALID_STORY)" in err
    assert "story_yaml.shots[0].prompt: must not be empty" in err and "story_yaml.shots[1].seed: must be 0 to 2^63-1" in err
    assert run_cli(capsys, address, "submit", str(tmp_path / "absent.yaml"))[0] == 2
    assert run_cli(capsys, address, "submit", str(tmp_path / "bad.yaml"), "--label", "oops")[0] == 2


@pytest.mark.parametrize("final, exit_code", [(pb.STORY_STATE_SUCCEEDED, 0), (pb.STORY_STATE_FAILED, 1)])
def test_cli_submit_wait_and_watch(daemon, capsys, tmp_path, final, exit_code):
    fake, address = daemon
    fake.final_state = final
    (tmp_path / "kite.yaml").write_text(STORY_YAML)
    code, out, err = run_cli(capsys, address, "submit", str(tmp_path / "kite.yaml"), "--wait", "--json",
                             "--request-id", "kite-1")
    result = json.loads(out)
    assert code == exit_code and result["story_id"] in fake.stories and result["created"] is True
    assert result["state"] == pb.StoryState.Name(final).removeprefix("STORY_STATE_").lower()
    assert "warning:" in err and fake.seen("SubmitStory")[0].request_id == "kite-1"
    fake.drop_watch = True
    code, out, _ = run_cli(capsys, address, "watch", result["story_id"])
    assert code == exit_code and "shot 1 of 2 (scene 1.1) succeeded on gpu0-1" in out  # numbered from 1
    assert [r.after_seq for r in fake.seen("WatchStory")][-2:] == [0, 13]
    assert run_cli(capsys, address, "watch", result["story_id"], "--after-seq", "15")[0] == exit_code
    assert fake.seen("WatchStory")[-1].after_seq == 15


def test_cli_batch_submit_and_download(daemon, capsys, tmp_path):
    fake, address = daemon
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text(STORY_YAML)
    code, out, _ = run_cli(capsys, address, "submit", str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml"),
                           "--batch", "overnight-0412", "--deadline", "2030-04-13T07:00:00Z", "--json")
    reply = json.loads(out)
    batch = fake.seen("SubmitBatch")[0]
    assert code == 0 and reply["batch"]["batch_id"] == "overnight-0412" and len(reply["stories"]) == 2
    assert len({s.request_id for s in batch.stories}) == 2
    assert batch.deadline_time.ToDatetime(tzinfo=timezone.utc) == datetime(2030, 4, 13, 7, tzinfo=timezone.utc)
    story_id = reply["stories"][0]["story_id"]
    fake.add_artifact(story_id, "story.mp4", random.Random(3).randbytes(4 * CHUNK))
    fake.add_artifact(story_id, "shots/0000.mp4", b"shot zero")
    fake.download_breaks = 1
    code, out, _ = run_cli(capsys, address, "download", story_id, "--out", str(tmp_path / "dl"))
    assert code == 0 and (tmp_path / "dl" / "shots" / "0000.mp4").read_bytes() == b"shot zero"
    assert (tmp_path / "dl" / "story.mp4").read_bytes() == fake.artifacts[(story_id, "story.mp4")]
    before = len(fake.seen("DownloadArtifact"))
    assert run_cli(capsys, address, "download", story_id, "--out", str(tmp_path / "dl"))[0] == 0
    assert len(fake.seen("DownloadArtifact")) == before  # verified files are kept, not fetched again


def test_cli_pool_drain_and_interrupt(daemon, capsys, monkeypatch):
    fake, address = daemon
    code, out, _ = run_cli(capsys, address, "pool", "--json")
    worker = json.loads(out)["workers"][0]
    assert code == 0 and worker["state"] == "busy" and worker["progress"] == {"stage": "denoise", "step": 3, "total_steps": 8, "eta": None}
    code, out, _ = run_cli(capsys, address, "pool")
    assert code == 0 and "gpu0-1" in out and "2 queued" in out and "st_0000 shot 2" in out  # shot_index 1
    code, out, _ = run_cli(capsys, address, "drain", "--worker", "gpu0-1", "--wait", "--json")
    assert code == 0 and json.loads(out)["draining"] is True
    assert list(fake.seen("Drain")[0].worker_ids) == ["gpu0-1"] and fake.seen("Drain")[0].wait

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
        yield
    monkeypatch.setattr(StoryfarmClient, "watch", interrupted)
    assert run_cli(capsys, address, "watch", fake.add_story().story_id)[0] == 130
