"""A load generator for a storyfarm daemon on loopback: submits and polls at full speed while
stories render, and times health checks meanwhile. Also the suite's load benchmark:

    .venv/bin/python tests/reliability/loadgen.py --server 127.0.0.1:50051 --seconds 60 --clients 16

prints JSON: accepted submits per second, SubmitStory / GetStory / health latencies (p50, p99,
max) measured idle first and then under load, and each under-load figure as a ratio to its idle
one (the ratios are what RELIABILITY.md reports as performance; absolute times depend on the
machine). Half the clients submit one-shot stories (each with a fresh request id), half poll
GetStory on stories already acknowledged; one more thread checks health every 50 ms.

Why threads in one process: on loopback a gRPC call is mostly wait; the point is many calls in
flight against the daemon, not client CPU. The client's own overhead is included in the times,
idle and loaded alike, which is why the ratios are the figures to compare.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from storyfarm.v1 import render_pb2 as pb
from storyfarm.v1 import render_pb2_grpc

TINY_STORY = json.dumps({"name": "load", "resolution": "64x32", "frames": 5, "steps": 2,
                         "shots": [{"prompt": "a gull over the harbour at noon"}]})
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_ms(values: list[float]) -> dict:
    return {"n": len(values), "p50_ms": _ms(percentile(values, 0.50)), "p99_ms": _ms(percentile(values, 0.99)),
            "max_ms": _ms(max(values) if values else None)}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


@dataclass
class Tally:
    submit: list[float] = field(default_factory=list)
    get: list[float] = field(default_factory=list)
    health: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)  # "RPC CODE" -> count
    health_states: Counter = field(default_factory=Counter)


class LoadGenerator:
    """Run `clients` threads against `address` until stopped; everything observed is kept.

    `sent` holds every request id sent (with the wall time it was sent), `acknowledged` request id
    -> story id for those answered OK, so a caller can check afterwards that nothing acknowledged
    was lost, and that nothing sent after a shutdown began was accepted."""

    def __init__(self, address: str, *, clients: int = 6, token: str | None = None, story: str = TINY_STORY,
                 health_every: float = 0.05):
        self.address, self.clients, self.story, self.health_every = address, max(2, clients), story, health_every
        self.metadata = [("authorization", f"Bearer {token}")] if token else None
        self.sent: dict[str, float] = {}  # request id -> time.time() when sent
        self.acknowledged: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.tally = Tally()
        self.started_at = self.stopped_at = 0.0

    # -- phases ---------------------------------------------------------------------------------
    def idle_baseline(self, seconds: float = 2.0, known_story: str | None = None) -> dict:
        """Health and GetStory latencies with nothing else going on (the ratios' denominators)."""
        with grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS) as channel:
            health, stub = health_pb2_grpc.HealthStub(channel), render_pb2_grpc.RenderServiceStub(channel)
            h, g, end = [], [], time.monotonic() + seconds
            while time.monotonic() < end:
                t0 = time.perf_counter()
                health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                h.append(time.perf_counter() - t0)
                if known_story:
                    t0 = time.perf_counter()
                    stub.GetStory(pb.GetStoryRequest(story_id=known_story), metadata=self.metadata, timeout=5)
                    g.append(time.perf_counter() - t0)
                time.sleep(0.02)
        return {"health": latency_ms(h), "get_story": latency_ms(g)}

    def start(self) -> LoadGenerator:
        self.started_at = time.monotonic()
        roles = ["submit" if i % 2 == 0 else "poll" for i in range(self.clients)] + ["health"]
        for n, role in enumerate(roles):
            thread = threading.Thread(target=self._run, args=(role,), name=f"load-{role}-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> dict:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self.stopped_at = time.monotonic()
        return self.report()

    def run(self, seconds: float) -> dict:
        self.start()
        self._stop.wait(seconds)
        return self.stop()

    # -- the clients ----------------------------------------------------------------------------
    def _run(self, role: str) -> None:
        with grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS) as channel:
            stub, health = render_pb2_grpc.RenderServiceStub(channel), health_pb2_grpc.HealthStub(channel)
            while not self._stop.is_set():
                try:
                    {"submit": self._submit, "poll": self._poll, "health": self._health}[role](stub, health)
                except grpc.RpcError as exc:
                    with self._lock:
                        self.tally.errors[f"{role} {exc.code().name}"] += 1
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        self._stop.wait(0.05)  # a daemon going away: do not spin

    def _submit(self, stub, health) -> None:
        request_id = uuid.uuid4().hex
        with self._lock:
            self.sent[request_id] = time.time()
        t0 = time.perf_counter()
        reply = stub.SubmitStory(pb.SubmitStoryRequest(request_id=request_id, story_json=self.story),
                                 metadata=self.metadata, timeout=10)
        elapsed = time.perf_counter() - t0
        with self._lock:
            self.tally.submit.append(elapsed)
            self.acknowledged[request_id] = reply.story_id

    def _poll(self, stub, health) -> None:
        with self._lock:
            ids = list(self.acknowledged.values())[-200:]
        if not ids:
            self._stop.wait(0.01)
            return
        t0 = time.perf_counter()
        stub.GetStory(pb.GetStoryRequest(story_id=random.choice(ids)), metadata=self.metadata, timeout=10)
        with self._lock:
            self.tally.get.append(time.perf_counter() - t0)

    def _health(self, stub, health) -> None:
        t0 = time.perf_counter()
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        with self._lock:
            self.tally.health.append(time.perf_counter() - t0)
            self.tally.health_states[health_pb2.HealthCheckResponse.ServingStatus.Name(status)] += 1
        self._stop.wait(self.health_every)

    # -- results --------------------------------------------------------------------------------
    def report(self, idle: dict | None = None) -> dict:
        seconds = (self.stopped_at or time.monotonic()) - self.started_at
        out = {
            "seconds": round(seconds, 2), "clients": self.clients,
            "accepted_submits": len(self.acknowledged),
            "accepted_submits_per_s": round(len(self.acknowledged) / seconds, 1) if seconds else None,
            "submit": latency_ms(self.tally.submit), "get_story": latency_ms(self.tally.get),
            "health": latency_ms(self.tally.health), "errors": dict(self.tally.errors),
            "health_states": dict(self.tally.health_states),
        }
        if idle:
            out["idle"] = idle
            out["ratios_to_idle"] = {
                f"{rpc}_{q}": round(out[rpc][q] / idle[rpc][q], 2)
                for rpc in ("health", "get_story") for q in ("p50_ms", "p99_ms")
                if out[rpc][q] is not None and idle[rpc][q]}
        return out


def finished_story(address: str, metadata=None, timeout: float = 300) -> str:
    """Submit one tiny story and wait until it has rendered: the daemon is idle again after."""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = render_pb2_grpc.RenderServiceStub(channel)
        story_id = stub.SubmitStory(pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=TINY_STORY),
                                    metadata=metadata, timeout=30).story_id
        deadline = time.monotonic() + timeout
        while stub.GetStory(pb.GetStoryRequest(story_id=story_id), metadata=metadata, timeout=10).state != \
                pb.STORY_STATE_SUCCEEDED:
            if time.monotonic() > deadline:
                raise TimeoutError(f"story {story_id} did not render within {timeout} s")
            time.sleep(0.1)
    return story_id


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--token", default=None)
    args = parser.parse_args(argv)
    generator = LoadGenerator(args.server, clients=args.clients, token=args.token)
    idle = generator.idle_baseline(known_story=finished_story(args.server, generator.metadata))
    generator.run(args.seconds)
    json.dump(generator.report(idle), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
