"""Downloads through a real daemon at real size: many 1 MiB chunks, resumed, refused, raced.

A real daemon (tiny preset, CPU worker) renders small stories; a real 832x480 mp4 of 81 frames
(several MB, written by storyfarm.m2v.video) is then published as a story's `story.mp4` the way a
worker publishes a take: the file first (atomically, through the ArtifactStore), then the job
store's record, as the dispatcher does when the worker reports. Publishing the file without the
record is the window a download can race during a re-render.

The client's stub is tapped (`Tap`) to see each DownloadArtifact request (its offset and pinned
sha256), to count chunks, and to drop a stream after N chunks the way a broken connection does.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from helpers.daemon_inproc import running_daemon, wait_final
from storyfarm.daemon.artifacts import ArtifactInfo
from storyfarm.daemon.cli import main as cli_main
from storyfarm.daemon.client import RetryPolicy, StoryfarmClient, StoryfarmError
from storyfarm.m2v.video import probe_mp4, write_mp4
from storyfarm.v1 import render_pb2 as pb

MiB = 1 << 20
RECORD = ".storyfarm-download.json"
FAST = RetryPolicy(attempts=3, initial=0.01, maximum=0.05, reconnect_window=30)
STORY = {"name": "harbour", "seed": 5, "resolution": "64x32", "frames": 9, "steps": 2,
         "shots": [{"prompt": "a red boat leaves the harbour"}, {"prompt": "the boat passes the lighthouse"},
                   {"prompt": "gulls circle over the open sea"}]}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("data")) as (d, stub):
        yield d, stub


@pytest.fixture(scope="module")
def big_mp4(tmp_path_factory) -> Path:
    """A real H.264 mp4 at the model's size, 832x480 and 81 frames: moving gradients under noise,
    so it encodes to several MB, not a few KB."""
    path = tmp_path_factory.mktemp("video") / "take.mp4"
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:832].astype(np.int16)
    frames = np.empty((81, 480, 832, 3), np.uint8)
    for i in range(81):
        frames[i, ..., 0] = (x + 4 * i) % 256 // 2
        frames[i, ..., 1] = ((x + 4 * i) % 256 + (y + 2 * i) % 256) // 4
        frames[i, ..., 2] = (y + 2 * i) % 256 * 3 // 8
        frames[i] += rng.integers(0, 24, (480, 832, 3), dtype=np.uint8)
    write_mp4(path, frames, 16)
    return path


def render(stub, **over) -> str:
    story = stub.SubmitStory(pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=json.dumps({**STORY, **over})))
    assert wait_final(stub, story.story_id).state == pb.STORY_STATE_SUCCEEDED
    return story.story_id


def record(d, story_id: str, info: ArtifactInfo) -> None:
    """What the dispatcher does once a worker reports a take: the job store now names this version."""
    db = sqlite3.connect(d.config.data_dir / "storyfarm.db", timeout=30)
    try:
        with db:
            changed = db.execute("UPDATE artifacts SET size = ?, sha256 = ? WHERE story_id = ? AND name = ?",
                                 (info.size, info.sha256, story_id, info.name)).rowcount
    finally:
        db.close()
    assert changed == 1


def republish(d, story_id: str, name: str, source, *, recorded: bool = True) -> ArtifactInfo:
    info = d.artifacts.publish(story_id, name, source)
    if recorded:
        record(d, story_id, info)
    return info


class Dropped(grpc.RpcError):
    """A stream broken the way a dead connection breaks it."""

    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "connection dropped by the test"


class Tap:
    """Wraps a client's DownloadArtifact: records (offset, expected_sha256) per request, counts the
    chunks, drops the stream after `drops[0]` chunks (one entry per stream to break), and calls
    `at_chunk(n)` after the n-th chunk of all."""

    def __init__(self, client: StoryfarmClient, drops=(), at_chunk=None):
        self.real, self.drops, self.at_chunk = client._stub.DownloadArtifact, list(drops), at_chunk
        self.requests: list[tuple[int, str]] = []
        self.chunks = 0
        client._stub.DownloadArtifact = self

    def __call__(self, request, **kw):
        self.requests.append((request.offset, request.expected_sha256))
        stream, drop = self.real(request, **kw), self.drops.pop(0) if self.drops else None
        tap = self

        class Stream:
            def __iter__(self):
                for n, chunk in enumerate(stream, 1):
                    tap.chunks += 1
                    yield chunk
                    if tap.at_chunk:
                        tap.at_chunk(tap.chunks)
                    if n == drop:
                        stream.cancel()
                        raise Dropped()

            def cancel(self):
                stream.cancel()
        return Stream()


def client_of(d, retry=FAST) -> StoryfarmClient:
    return StoryfarmClient(f"127.0.0.1:{d.port}", timeout=30, retry=retry)


def cli(d, *argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main([*argv, "--server", f"127.0.0.1:{d.port}"])
    return code, out.getvalue(), err.getvalue()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha(p) for p in folder.rglob("*") if p.is_file() and p.name != RECORD}


class Interrupted(Exception):
    """Stands for Ctrl-C or a killed job: the download call ends, its .part stays."""


def stop_after(limit: int):
    def progress(got: int, total: int) -> None:
        if got >= limit:
            raise Interrupted()
    return progress


# --- many chunks, resumed ------------------------------------------------------------------------

def test_a_multi_megabyte_mp4_downloads_in_many_chunks_and_resumes_mid_way(daemon, big_mp4, tmp_path):
    d, stub = daemon
    sid = render(stub)
    take = republish(d, sid, "story.mp4", big_mp4)
    chunks = -(-take.size // MiB)
    assert take.size > 5 * MiB and chunks >= 6
    with client_of(d) as client:
        tap = Tap(client)
        started = time.monotonic()
        result = client.download(sid, "story.mp4", tmp_path / "whole" / "story.mp4")
        took = time.monotonic() - started
        assert result["sha256"] == take.sha256 == sha(tmp_path / "whole" / "story.mp4")
        assert tap.chunks == chunks and tap.requests == [(0, "")]
        assert probe_mp4(tmp_path / "whole" / "story.mp4")["width"] == 832
        print(f"\n{take.size} bytes in {chunks} chunks: {took:.2f} s")

        # interrupted after 3 chunks: the .part keeps them, and the next call resumes there
        dest = tmp_path / "resumed" / "story.mp4"
        with pytest.raises(Interrupted):
            client.download(sid, "story.mp4", dest, on_progress=stop_after(3 * MiB))
        assert Path(f"{dest}.part").stat().st_size == 3 * MiB and not dest.exists()
        tap = Tap(client)
        assert client.download(sid, "story.mp4", dest)["sha256"] == take.sha256
        assert tap.requests == [(3 * MiB, "")] and tap.chunks == chunks - 3
        assert dest.read_bytes() == big_mp4.read_bytes() and not Path(f"{dest}.part").exists()

        # a connection dropped mid-way inside one call: resumed with the version pinned by the first chunk
        tap = Tap(client, drops=[2, 3])
        client.download(sid, "story.mp4", tmp_path / "dropped" / "story.mp4")
        assert tap.requests == [(0, ""), (2 * MiB, take.sha256), (5 * MiB, take.sha256)]
        assert sha(tmp_path / "dropped" / "story.mp4") == take.sha256


def test_the_cli_downloads_a_multi_chunk_story_and_resumes_a_part(daemon, big_mp4, tmp_path):
    d, stub = daemon
    sid = render(stub)
    take = republish(d, sid, "story.mp4", big_mp4)
    out = tmp_path / "out"
    with client_of(d) as client, pytest.raises(Interrupted):  # an earlier run stopped after two chunks
        client.download(sid, "story.mp4", out / "story.mp4", on_progress=stop_after(2 * MiB))
    assert (out / "story.mp4.part").stat().st_size == 2 * MiB
    code, stdout, stderr = cli(d, "download", sid, "--out", str(out), "--json")
    assert code == 0, stderr
    files = {f["name"]: f for f in json.loads(stdout)}
    listed = {a.name: a.sha256 for a in stub.ListArtifacts(pb.ListArtifactsRequest(story_id=sid)).artifacts}
    assert {n: f["sha256"] for n, f in files.items()} == listed == folder_files(out)
    assert (out / "story.mp4").read_bytes() == big_mp4.read_bytes() and files["story.mp4"]["size"] == take.size
    assert json.loads((out / RECORD).read_text()) == {"story_id": sid, "files": listed}
    assert not list(out.rglob("*.part"))
    # again: everything is already there and verified, nothing is rewritten
    inode = (out / "story.mp4").stat().st_ino
    assert cli(d, "download", sid, "--out", str(out))[0] == 0
    assert (out / "story.mp4").stat().st_ino == inode


# --- what is already in the folder ----------------------------------------------------------------

def test_a_file_that_is_not_an_earlier_download_is_not_overwritten_without_force(daemon, tmp_path):
    d, stub = daemon
    sid = render(stub)
    out = tmp_path / "local-render"
    (out / "shots").mkdir(parents=True)
    (out / "story.mp4").write_bytes(b"a local render's take")
    (out / "notes.txt").write_text("mine")
    code, stdout, stderr = cli(d, "download", sid, "--out", str(out))
    assert code == 2 and stdout == ""
    assert str(out / "story.mp4") in stderr and "--force" in stderr
    assert (out / "story.mp4").read_bytes() == b"a local render's take"
    assert sorted(p.name for p in out.rglob("*")) == ["notes.txt", "shots", "story.mp4"]  # nothing written
    code, _, stderr = cli(d, "download", sid, "--out", str(out), "--force")
    assert code == 0, stderr
    listed = {a.name: a.sha256 for a in stub.ListArtifacts(pb.ListArtifactsRequest(story_id=sid)).artifacts}
    assert folder_files(out) == {**listed, "notes.txt": sha(out / "notes.txt")}


def test_a_re_rendered_story_replaces_only_its_own_earlier_download_and_only_with_force(daemon, tmp_path):
    d, stub = daemon
    sid = render(stub, name="rerendered")
    out = tmp_path / "out"
    assert cli(d, "download", sid, "--out", str(out))[0] == 0
    first = folder_files(out)
    old_keyframes = {n for n in first if n.startswith("keyframes/")}
    assert old_keyframes
    (out / "keyframes" / "mine.png").write_bytes(b"a keyframe the user put here")

    stub.RerenderShot(pb.RerenderShotRequest(story_id=sid, shot_index=0, prompt="a blue boat leaves at dusk",
                                             cascade=True, request_id=uuid.uuid4().hex))
    assert wait_final(stub, sid).state == pb.STORY_STATE_SUCCEEDED
    listed = {a.name: a.sha256 for a in stub.ListArtifacts(pb.ListArtifactsRequest(story_id=sid)).artifacts}
    gone = old_keyframes - set(listed)
    assert gone, "the new take has other keyframes"

    code, stdout, stderr = cli(d, "download", sid, "--out", str(out))
    assert code == 2 and "--force" in stderr
    assert str(out / "story.mp4") in stderr and str(out / sorted(gone)[0]) in stderr
    assert str(out / "keyframes" / "mine.png") in stderr
    assert folder_files(out) == {**first, "keyframes/mine.png": sha(out / "keyframes" / "mine.png")}  # untouched

    code, stdout, stderr = cli(d, "download", sid, "--out", str(out), "--force")
    assert code == 0, stderr
    # exactly the current take, plus the one file no download of this story wrote (named on stderr)
    assert folder_files(out) == {**listed, "keyframes/mine.png": sha(out / "keyframes" / "mine.png")}
    assert "keyframes/mine.png" in stderr
    assert json.loads((out / RECORD).read_text()) == {"story_id": sid, "files": listed}
    code, _, stderr = cli(d, "download", sid, "--out", str(out))  # nothing left to write: nothing to mix in
    assert code == 0 and "left alone" in stderr and "keyframes/mine.png" in stderr


def test_an_unknown_name_is_not_found_and_lists_what_exists(daemon, tmp_path):
    d, stub = daemon
    sid = render(stub, name="named")
    code, stdout, stderr = cli(d, "download", sid, "--out", str(tmp_path / "o"), "--name", "nosuch.mp4")
    assert code == 3 and stdout.strip() == ""
    assert "nosuch.mp4" in stderr and "story.mp4" in stderr and "manifest.json" in stderr
    assert not (tmp_path / "o").exists()
    code, stdout, _ = cli(d, "download", sid, "--out", str(tmp_path / "o"), "--name", "manifest.json", "--json")
    assert code == 0 and [f["name"] for f in json.loads(stdout)] == ["manifest.json"]


# --- racing a re-render ---------------------------------------------------------------------------

def test_a_download_racing_a_re_render_returns_one_whole_take(daemon, big_mp4, tmp_path):
    d, stub = daemon
    sid = render(stub, name="raced")
    old = republish(d, sid, "story.mp4", big_mp4)
    new_bytes = random.Random(7).randbytes(3 * MiB + 12345)
    with client_of(d) as client:
        # the take is republished while a stream is open: that stream finishes the version it started
        Tap(client, at_chunk=lambda n: n == 2 and republish(d, sid, "story.mp4", new_bytes))
        got = client.download(sid, "story.mp4", tmp_path / "a.mp4")
        assert got["sha256"] == old.sha256 == sha(tmp_path / "a.mp4")

        # republished while the connection is down: the resume is refused, the client starts over
        republish(d, sid, "story.mp4", big_mp4)
        tap = Tap(client, drops=[2], at_chunk=lambda n: n == 2 and republish(d, sid, "story.mp4", new_bytes))
        got = client.download(sid, "story.mp4", tmp_path / "b.mp4")
        new_sha = hashlib.sha256(new_bytes).hexdigest()
        assert got["sha256"] == new_sha and (tmp_path / "b.mp4").read_bytes() == new_bytes
        assert tap.requests == [(0, ""), (2 * MiB, old.sha256), (0, "")]

        # the worker has written the new file, the job store does not name it yet: wait, then the new one
        republish(d, sid, "story.mp4", big_mp4)
        pending = republish(d, sid, "story.mp4", new_bytes, recorded=False)
        later = threading.Timer(0.5, record, (d, sid, pending))
        later.start()
        tap = Tap(client)
        try:
            got = client.download(sid, "story.mp4", tmp_path / "c.mp4")
        finally:
            later.join()
        assert got["sha256"] == new_sha and (tmp_path / "c.mp4").read_bytes() == new_bytes
        assert len(tap.requests) >= 2 and all(r == (0, "") for r in tap.requests)

    # a file that never matches its record: a clear, retryable refusal once the window is spent, no DATA_LOSS
    republish(d, sid, "story.mp4", big_mp4, recorded=False)
    with client_of(d, RetryPolicy(initial=0.05, maximum=0.1, reconnect_window=1.0)) as client:
        with pytest.raises(StoryfarmError) as caught:
            client.download(sid, "story.mp4", tmp_path / "d.mp4")
    error = caught.value
    assert (error.code, error.reason) == (grpc.StatusCode.ABORTED, "ARTIFACT_CHANGED")
    assert error.retry_after is not None and "republished" in error.message
    assert not (tmp_path / "d.mp4").exists()
