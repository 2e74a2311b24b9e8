"""The Python client of the storyfarm daemon: one method per RenderService RPC, plain data back.

Pipelines and the `storyfarm` CLI drive the daemon through `StoryfarmClient`; requests and replies
are translated by client_wire.py, so this module is about the connection: the channel, retries,
and resuming the two long streams (watching a story, downloading an artifact). It must stay light
to import (the CLI starts with it): grpc and protobuf only, never torch or the render engine.

Invariants:
- a call is retried only when repeating it cannot do anything twice: reads, the idempotent
  controls (cancel, pause, resume, set_priority, drain, cancel_batch), and submits, because a
  submit carries a request id that is generated once per `submit()` call and reused on every
  retry of it, so a submit that went through before its reply was lost returns the same story
  (`created` false). `rerender_shot` is retried the same way (its request id is reused). A batch's
  request ids derive from the batch id and each story, so even the same batch command run again
  creates nothing twice.
  `retry_shot` is never retried. Retries happen on UNAVAILABLE,
  DEADLINE_EXCEEDED, ABORTED when the daemon attached a RetryInfo (nothing was done: a conflict
  that passes, such as an artifact whose new take is being recorded), and RESOURCE_EXHAUSTED when
  the daemon attached a short RetryInfo; the delay grows exponentially, bounded, and is never
  shorter than the daemon's RetryInfo;
- a broken watch reconnects with `after_seq` = the seq of the last event it yielded, so no
  durable event is lost or yielded twice; it gives up only after `reconnect_window` seconds
  without receiving anything;
- a download is written to `<dest>.part`, continued from that file's size after a break (with
  the sha256 the daemon announced, so two versions of an artifact are never spliced), checked
  against the sha256 once complete, and only then renamed onto `<dest>`: `<dest>` is either
  absent, the old file, or the whole verified artifact. When the daemon says the artifact was
  republished (ARTIFACT_CHANGED: a re-render), that file starts again from byte 0, at once or
  after the RetryInfo while the new take is being recorded. Which files of a folder a download
  may replace is client_download.py's business;
- every call carries `authorization: Bearer <token>` when a token is known (argument, else
  STORYFARM_TOKEN); the channel pings every minute so a silent dead connection breaks a stream
  instead of hanging it (the daemon must accept pings that often).
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc
from storyfarm.v1 import render_pb2, render_pb2_grpc

from storyfarm.daemon.client_download import DownloadConflict, download_story
from storyfarm.daemon.client_wire import (
    Event,
    StoryfarmError,
    batch_request_id,
    enum_value,
    parse_deadline,
    rerender_request,
    submit_request,
    timestamp,
    to_plain,
)
from storyfarm.story.files import sha256_file

__all__ = ["DEFAULT_SERVER", "TLS", "DownloadConflict", "Event", "RetryPolicy", "StoryfarmClient", "StoryfarmError",
           "parse_deadline"]

DEFAULT_SERVER = "127.0.0.1:50051"
MiB = 1 << 20
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.max_receive_message_length", 64 * MiB),  # a FULL story of 1000 shots exceeds gRPC's 4 MiB default
    ("grpc.primary_user_agent", "storyfarm-client/1"),
)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: `attempts` in all for one unary call; for streams, keep reconnecting until
    nothing has arrived for `reconnect_window` seconds. Delays: initial * multiplier^n, capped at
    `maximum`, with jitter, and at least the daemon's RetryInfo."""

    attempts: int = 5
    initial: float = 0.2
    multiplier: float = 2.0
    maximum: float = 5.0
    reconnect_window: float = 120.0

    def retryable(self, error: StoryfarmError) -> bool:
        if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return True
        if error.code == grpc.StatusCode.ABORTED:  # a conflict that passes, when the daemon says when
            return error.retry_after is not None
        return error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_after is not None \
            and error.retry_after <= self.maximum

    def delay(self, failures: int, hint: float | None = None) -> float:
        backoff = min(self.maximum, self.initial * self.multiplier ** max(0, failures - 1))
        return max(backoff * random.uniform(0.5, 1.0), hint or 0.0)


class _Backoff:
    """Paces the retries of one call or one resumable stream; `pause` sleeps or re-raises."""

    def __init__(self, policy: RetryPolicy, *, stream: bool):
        self.policy, self.stream = policy, stream
        self.failures, self.since = 0, None

    def progressed(self) -> None:
        self.failures, self.since = 0, None

    def pause(self, error: StoryfarmError) -> None:
        now = time.monotonic()
        self.since = self.since or now
        self.failures += 1
        exhausted = (now - self.since > self.policy.reconnect_window) if self.stream else self.failures >= self.policy.attempts
        if exhausted or not self.policy.retryable(error):
            raise error
        time.sleep(self.policy.delay(self.failures, error.retry_after))


@dataclass(frozen=True)
class TLS:
    """TLS to the daemon: `ca` the PEM roots to trust (None: the system's), `cert` and `key` the
    client certificate for mTLS, `server_name` to check instead of the address's host."""

    ca: str | Path | None = None
    cert: str | Path | None = None
    key: str | Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path):
            return Path(path).read_bytes() if path else None
        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


class StoryfarmClient:
    """A connection to one daemon. Use as a context manager, or call close()."""

    def __init__(self, server: str | None = None, token: str | None = None, *, timeout: float = 30.0,
                 tls: TLS | bool | None = None, retry: RetryPolicy | None = None):
        self.server = server or os.environ.get("STORYFARM_SERVER") or DEFAULT_SERVER
        token = (token if token is not None else os.environ.get("STORYFARM_TOKEN", "")).strip()
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        options = list(CHANNEL_OPTIONS)
        if tls:
            tls = TLS() if tls is True else tls
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            self._channel = grpc.secure_channel(self.server, tls.credentials(), options)
        else:
            self._channel = grpc.insecure_channel(self.server, options)
        self._stub = render_pb2_grpc.RenderServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> StoryfarmClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- plumbing ------------------------------------------------------------------------------

    def _unary(self, rpc: str, request, *, retry: bool = True, timeout: float | None = None):
        method = getattr(self._stub, rpc)
        backoff = _Backoff(self.retry, stream=False)
        while True:
            try:
                return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as err:
                error = StoryfarmError.from_rpc_error(err)
            if not retry:
                raise error
            backoff.pause(error)

    def _paged(self, rpc: str, request, items: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            reply = self._unary(rpc, request)
            out.extend(to_plain(m) for m in getattr(reply, items))
            if not reply.next_page_token:
                return out
            request.page_token = reply.next_page_token

    def _events(self, rpc: str, make_request: Callable[[int], Any], after_seq: int) -> Iterator[Event]:
        seq, backoff = after_seq, _Backoff(self.retry, stream=True)
        while True:
            stream = getattr(self._stub, rpc)(make_request(seq), metadata=self._metadata)
            try:
                for message in stream:
                    backoff.progressed()
                    seq = max(seq, message.seq)
                    yield Event.from_message(message)
                return  # the daemon ended the stream: the story (or batch) is finished
            except grpc.RpcError as err:
                error = StoryfarmError.from_rpc_error(err)
            finally:
                stream.cancel()  # no-op when finished; ends the RPC when the caller stops iterating
            backoff.pause(error)

    # --- stories -------------------------------------------------------------------------------

    def submit(self, story, *, request_id: str | None = None, project: str | None = None, priority: int = 0,
               labels: Mapping[str, str] | None = None, deadline=None, references: Mapping[str, str | Path] | None = None,
               validate_only: bool = False, preset: str | None = None) -> dict[str, Any]:
        """Submits a story: a file path (or a StoryFile from client_story.read_story_file), story
        text (JSON or YAML), a dict, or a StorySpec. A story file brings the images it names,
        read relative to its folder as `storyfarm render` reads them; `references` maps names to
        image files, added to those or replacing one of the same name. Returns story_id, created,
        shot_count, warnings and the request_id used."""
        request = submit_request(story, request_id=request_id or str(uuid.uuid4()), project=project, priority=priority,
                                 labels=labels, deadline=deadline, references=references,
                                 validate_only=validate_only, preset=preset)
        return {"request_id": request.request_id, **to_plain(self._unary("SubmitStory", request))}

    def get(self, story_id: str, *, full: bool = True) -> dict[str, Any]:
        view = render_pb2.STORY_VIEW_FULL if full else render_pb2.STORY_VIEW_BASIC
        return to_plain(self._unary("GetStory", render_pb2.GetStoryRequest(story_id=story_id, view=view)))

    def list(self, project: str | None = None, states: Iterable[str] | None = None, batch_id: str | None = None,
             label: Mapping[str, str] | None = None, page_size: int = 50, *, full: bool = False) -> list[dict[str, Any]]:
        """Every story matching the filters (all pages), in submission order. `states` are words
        such as "running"; `label` maps label keys to the values they must have."""
        request = render_pb2.ListStoriesRequest(
            project=project or "", states=[enum_value(render_pb2.StoryState, s) for s in states or ()],
            batch_id=batch_id or "", labels=dict(label or {}), page_size=page_size,
            view=render_pb2.STORY_VIEW_FULL if full else render_pb2.STORY_VIEW_BASIC)
        return self._paged("ListStories", request, "stories")

    def watch(self, story_id: str, after_seq: int = 0, previews: bool = False) -> Iterator[Event]:
        """The story's events until it finishes (the first is a snapshot when after_seq is 0);
        reconnects by itself after a broken connection."""
        return self._events("WatchStory", lambda seq: render_pb2.WatchStoryRequest(
            story_id=story_id, after_seq=seq, include_previews=previews), after_seq)

    def cancel(self, story_id: str, reason: str = "") -> dict[str, Any]:
        return to_plain(self._unary("CancelStory", render_pb2.CancelStoryRequest(story_id=story_id, reason=reason)))

    def pause(self, story_id: str) -> dict[str, Any]:
        return to_plain(self._unary("PauseStory", render_pb2.PauseStoryRequest(story_id=story_id)))

    def resume(self, story_id: str) -> dict[str, Any]:
        return to_plain(self._unary("ResumeStory", render_pb2.ResumeStoryRequest(story_id=story_id)))

    def set_priority(self, story_id: str, priority: int) -> dict[str, Any]:
        return to_plain(self._unary("SetPriority", render_pb2.SetPriorityRequest(story_id=story_id, priority=priority)))

    def retry_shot(self, story_id: str, index: int, *, rerender: bool = False, seed: int | None = None) -> dict[str, Any]:
        """Runs shot `index` again (a FAILED one; a SUCCEEDED one with rerender). Not retried."""
        request = render_pb2.RetryShotRequest(story_id=story_id, shot_index=index, rerender=rerender, seed=seed)
        return to_plain(self._unary("RetryShot", request, retry=False))

    def rerender_shot(self, story_id: str, index: int, *, prompt: str | None = None, strength: float | None = None,
                      seed: int | None = None, cascade: bool = False, request_id: str | None = None) -> dict[str, Any]:
        """Renders SUCCEEDED shot `index` of a finished story again as a new take: with an edited
        prompt, a strength (0 < s <= 1: start from the previous take) and/or a seed; `cascade`
        renders every later shot again too. Returns the story; retried with the same request id."""
        request = rerender_request(story_id, index, request_id=request_id or str(uuid.uuid4()), prompt=prompt,
                                   strength=strength, seed=seed, cascade=cascade)
        return to_plain(self._unary("RerenderShot", request))

    # --- artifacts -----------------------------------------------------------------------------

    def artifacts(self, story_id: str, *, shot_index: int | None = None, kinds: Iterable[str] | None = None) -> list[dict[str, Any]]:
        request = render_pb2.ListArtifactsRequest(
            story_id=story_id, shot_index=shot_index, kinds=[enum_value(render_pb2.ArtifactKind, k) for k in kinds or ()])
        return self._paged("ListArtifacts", request, "artifacts")

    def download(self, story_id: str, name: str, dest_path: str | Path, *, sha256: str | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
        """Downloads artifact `name` to `dest_path`, replacing what is there (see the module's
        invariants). `sha256`, from a listing, pins that version from the first request: if the
        daemon has another by now, the file starts over at once instead of after a wasted transfer.
        Returns name, path, size and sha256. `on_progress(received, total)` follows every chunk."""
        dest = Path(dest_path)
        part = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        part.touch()
        try:
            return self._download(story_id, name, dest, part, sha256 or "", on_progress)
        except BaseException:
            if part.exists() and part.stat().st_size == 0:
                part.unlink()  # nothing worth resuming: leave no litter
            raise

    def _download(self, story_id: str, name: str, dest: Path, part: Path, expected: str, on_progress) -> dict[str, Any]:
        # A part file left by an earlier run is of unknown version unless the caller pinned one:
        # resume it and let the final sha256 decide. Within this call, `expected` is the version the
        # first chunk named (every chunk names it; older daemons named it in the first chunk only).
        restarts, backoff = 0, _Backoff(self.retry, stream=True)
        while True:
            total, sha, error = None, None, None
            with open(part, "ab") as out:
                request = render_pb2.DownloadArtifactRequest(story_id=story_id, name=name, offset=out.tell(),
                                                             expected_sha256=expected)
                stream = self._stub.DownloadArtifact(request, metadata=self._metadata)
                try:
                    for chunk in stream:
                        if sha is None:
                            total, sha = chunk.total_size, chunk.sha256
                            expected = sha or expected
                        if chunk.offset != out.tell():
                            error = StoryfarmError(grpc.StatusCode.DATA_LOSS,
                                                   f"{name}: chunk at byte {chunk.offset}, expected {out.tell()}")
                            break
                        out.write(chunk.data)
                        backoff.progressed()
                        if on_progress:
                            on_progress(out.tell(), total)
                except grpc.RpcError as err:
                    error = StoryfarmError.from_rpc_error(err)
                finally:
                    stream.cancel()
                    out.flush()
                    os.fsync(out.fileno())
            if error is None and total is not None and part.stat().st_size >= total:
                if part.stat().st_size == total and sha256_file(part) == sha:
                    return _publish(part, dest, name, total, sha)
                error = StoryfarmError(grpc.StatusCode.DATA_LOSS, f"{name}: the downloaded bytes do not match sha256 {sha}")
            if error is None:  # ended early without a status: a broken connection by another name
                error = StoryfarmError(grpc.StatusCode.UNAVAILABLE, f"{name}: the stream ended before the last byte")
            if error.code in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.OUT_OF_RANGE) or error.reason == "ARTIFACT_CHANGED":
                expected = ""
                part.write_bytes(b"")  # start over from byte 0: what we hold is not the current artifact
                if error.retry_after is None:  # the current version is there to fetch: at once
                    restarts += 1
                    if restarts > 2:
                        raise error
                    continue
            backoff.pause(error)  # ARTIFACT_CHANGED with RetryInfo: a take still being recorded

    def download_all(self, story_id: str, out_dir: str | Path, *, names: Iterable[str] | None = None, force: bool = False,
                     on_progress: Callable[[str, int, int], None] | None = None) -> list[dict[str, Any]]:
        """Downloads every artifact (or those in `names`) under out_dir, keeping the daemon's
        names (e.g. out_dir/shots/0001.mp4); files already there with the right sha256 are kept.
        Refuses (DownloadConflict) to replace other files unless `force`: see client_download."""
        return download_story(self, story_id, out_dir, names=names, force=force, on_progress=on_progress).files

    # --- pool ----------------------------------------------------------------------------------

    def pool(self) -> dict[str, Any]:
        return to_plain(self._unary("GetPool", render_pb2.GetPoolRequest()))

    def drain(self, worker_ids: Iterable[str] | None = None, *, wait: bool = False, undrain: bool = False,
              timeout: float | None = None) -> dict[str, Any]:
        """Drains (or with undrain, un-drains) the daemon or some workers. With `wait`, replies
        once no drained worker renders, within `timeout`; a wait that times out is not repeated."""
        request = render_pb2.DrainRequest(worker_ids=list(worker_ids or ()), wait=wait, undrain=undrain)
        return to_plain(self._unary("Drain", request, retry=not wait, timeout=timeout))

    # --- batches -------------------------------------------------------------------------------

    def submit_batch(self, stories: Iterable, batch_id: str, deadline=None, *, project: str | None = None,
                     priority: int = 0, labels: Mapping[str, str] | None = None,
                     references: Mapping[str, str | Path] | None = None, validate_only: bool = False) -> dict[str, Any]:
        """Submits stories (paths, StoryFiles, texts, dicts or StorySpecs) as one batch, all or none.
        Each story's request id derives from the batch id and the story (client_wire.batch_request_id),
        so submitting the same batch again, or retrying it, creates nothing twice: those stories
        come back with `created` false. Returns the batch and one result per story."""
        requests = [submit_request(story, request_id="-", project=None, priority=priority, labels=None,
                                   deadline=None, references=references, validate_only=validate_only)
                    for story in stories]
        seen: dict[str, int] = {}
        for sent in requests:
            sent.request_id = batch_request_id(batch_id, sent, seen)
        request = render_pb2.SubmitBatchRequest(batch_id=batch_id, stories=requests, project=project or "",
                                                labels=dict(labels or {}), validate_only=validate_only)
        if deadline is not None:
            request.deadline_time.CopyFrom(timestamp(deadline))
        reply = to_plain(self._unary("SubmitBatch", request))
        for sent, result in zip(requests, reply["stories"]):
            result["request_id"] = sent.request_id
        return reply

    def batch(self, batch_id: str) -> dict[str, Any]:
        return to_plain(self._unary("GetBatch", render_pb2.GetBatchRequest(batch_id=batch_id)))

    def cancel_batch(self, batch_id: str, reason: str = "") -> dict[str, Any]:
        return to_plain(self._unary("CancelBatch", render_pb2.CancelBatchRequest(batch_id=batch_id, reason=reason)))

    def watch_batch(self, batch_id: str, after_seq: int = 0) -> Iterator[Event]:
        """The events of every story of the batch until all are finished, reconnecting as watch()."""
        return self._events("WatchBatch", lambda seq: render_pb2.WatchBatchRequest(batch_id=batch_id, after_seq=seq),
                            after_seq)


def _publish(part: Path, dest: Path, name: str, size: int, sha: str) -> dict[str, Any]:
    """Renames the verified part file onto dest and makes the rename durable."""
    os.replace(part, dest)
    try:
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # a platform without directory fds: the rename is still atomic
        pass
    return {"name": name, "path": str(dest), "size": size, "sha256": sha}
