"""The daemon in the test's own process, on a real socket with real worker processes: for tests
that also look inside it (its store, its pool) while talking to it over gRPC."""

from __future__ import annotations

import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from storyfarm.daemon.config import load_config
from storyfarm.daemon.server import Daemon
from storyfarm.v1 import render_pb2 as pb
from storyfarm.v1 import render_pb2_grpc

FINAL = (pb.STORY_STATE_SUCCEEDED, pb.STORY_STATE_FAILED, pb.STORY_STATE_CANCELLED)


@contextmanager
def running_daemon(data: Path, *, workers: int = 1, ready_workers: int = 1, timeout: float = 180,
                   config_file: str | None = None, **overrides) -> Iterator[tuple[Daemon, render_pb2_grpc.RenderServiceStub]]:
    """A SERVING daemon on a free loopback port (tiny preset, CPU) with `ready_workers` idle
    workers, its other settings from `config_file` (a YAML path) when given; shut down gracefully
    afterwards."""
    config = load_config(config_file, {"listen": "127.0.0.1:0", "data_dir": str(data), "preset": "tiny", "workers": workers,
                                "device": "cpu", "grace_seconds": 5, **overrides})
    daemon = Daemon(config)
    daemon.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{daemon.port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                serving = health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                serving = False
            if serving and sum(w["state"] == "idle" for w in daemon.executor.snapshot()) >= ready_workers:
                break
            assert time.monotonic() < deadline, f"daemon never SERVING with {ready_workers} idle worker(s)"
            time.sleep(0.2)
        yield daemon, render_pb2_grpc.RenderServiceStub(channel)
    finally:
        daemon.shutdown()
        channel.close()


def submit(stub, text: str, request_id: str | None = None, **kw) -> pb.SubmitStoryResponse:
    return stub.SubmitStory(pb.SubmitStoryRequest(request_id=request_id or uuid.uuid4().hex, story_json=text, **kw))


def wait_final(stub, story_id: str, timeout: float = 180) -> pb.Story:
    deadline = time.monotonic() + timeout
    while True:
        story = stub.GetStory(pb.GetStoryRequest(story_id=story_id))
        if story.state in FINAL:
            return story
        assert time.monotonic() < deadline, f"story {story_id} still {pb.StoryState.Name(story.state)}"
        time.sleep(0.2)


def wait_for(predicate, what: str, timeout: float = 60.0):
    """The first truthy value of `predicate()`, polled every 50 ms; fails naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
