"""The client's translation layer between storyfarm.v1 messages and plain Python.

`StoryfarmClient` (client.py) owns channels, retries and resumption; this module owns what goes
over the wire and what comes back: requests built from story files and reference-image paths,
replies turned into dicts, gRPC failures turned into `StoryfarmError`. It has no I/O beyond
reading the files a caller names, and no state.

Invariants:
- replies become plain data by one generic walk over the message descriptor, so a field added to
  render.proto shows up in `get --json` without a change here. Enums become the lower-case word
  without the enum's prefix (STORY_STATE_QUEUED -> "queued"), Timestamps aware UTC datetimes,
  Durations float seconds; a field with presence that is unset (a message, an `optional` scalar)
  is None, so "no ETA" and "ETA 0 s" differ. One addition: a Shot carries `number` (its 1-based
  number, story/numbering.py) beside the API's 0-based `index`;
- state words go back to enum values only through `enum_value`, which refuses unknown words with
  the list of allowed ones (never a silent UNSPECIFIED, which the daemon would refuse anyway);
- a story argument is read as a file when it names one, and only then; a one-line string that
  looks like a story file name but names nothing is an error, not a one-line YAML story;
- `StoryfarmError` is built from the google.rpc.Status in the trailers when the daemon sent one,
  from the bare status code otherwise; it never loses the code.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, time as dtime, timedelta, timezone
from pathlib import Path
from typing import Any, Mapping

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from storyfarm.v1 import render_pb2

from storyfarm.daemon.client_story import StoryFile, file_kind, read_story_file, story_path
from storyfarm.story.numbering import shot_number



# --- errors ------------------------------------------------------------------------------------

@dataclass(eq=False)
class StoryfarmError(Exception):
    """A failed call: the gRPC code plus what the daemon's google.rpc.Status details said.

    `field_violations` are (field path, description) pairs from BadRequest; `reason` is the
    ErrorInfo reason (an ErrorReason name such as "INVALID_STORY"); `retry_after` is RetryInfo's
    delay in seconds (None: the daemon did not say retrying helps); `metadata` is ErrorInfo's;
    `resource` is ResourceInfo's (type, name) for NOT_FOUND."""

    code: grpc.StatusCode
    message: str
    field_violations: list[tuple[str, str]] = field(default_factory=list)
    reason: str | None = None
    retry_after: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    resource: tuple[str, str] | None = None

    def __post_init__(self):
        super().__init__(self.message)

    def __str__(self) -> str:
        reason = f" ({self.reason})" if self.reason else ""
        fields = "".join(f"\n  {name}: {description}" for name, description in self.field_violations)
        return f"{self.code.name}{reason}: {self.message}{fields}"

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> StoryfarmError:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        message = (err.details() if hasattr(err, "details") else None) or str(err)
        error = cls(code=code or grpc.StatusCode.UNKNOWN, message=message)
        try:
            status = rpc_status.from_call(err) if hasattr(err, "trailing_metadata") else None
        except ValueError:  # details whose code or message disagree with the call's: keep the call's
            status = None
        for detail in status.details if status else ():
            error._absorb(detail)
        return error

    def _absorb(self, detail) -> None:
        for kind in (error_details_pb2.BadRequest, error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo,
                     error_details_pb2.ResourceInfo):
            if not detail.Is(kind.DESCRIPTOR):
                continue
            msg = kind()
            detail.Unpack(msg)
            if isinstance(msg, error_details_pb2.BadRequest):
                self.field_violations.extend((v.field, v.description) for v in msg.field_violations)
            elif isinstance(msg, error_details_pb2.ErrorInfo):
                self.reason, self.metadata = msg.reason, dict(msg.metadata)
            elif isinstance(msg, error_details_pb2.RetryInfo):
                self.retry_after = msg.retry_delay.ToTimedelta().total_seconds()
            else:
                self.resource = (msg.resource_type, msg.resource_name)


# --- replies: messages to plain data -----------------------------------------------------------

def _enum_prefix(enum_descriptor) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum_descriptor.name).upper() + "_"


def enum_word(enum_descriptor, number: int) -> str:
    """STORY_STATE_QUEUED -> "queued"; a number this client does not know -> "unknown(N)"."""
    value = enum_descriptor.values_by_number.get(number)
    if value is None:
        return f"unknown({number})"
    prefix = _enum_prefix(enum_descriptor)
    name = value.name[len(prefix):] if value.name.startswith(prefix) else value.name
    return name.lower()


def enum_value(enum_type, word: str) -> int:
    """"queued" (or "QUEUED", "STORY_STATE_QUEUED") -> the enum number; ValueError naming the
    allowed words otherwise."""
    prefix = _enum_prefix(enum_type.DESCRIPTOR)
    name = word.strip().upper()
    name = name if name.startswith(prefix) else prefix + name
    allowed = [enum_word(enum_type.DESCRIPTOR, v.number) for v in enum_type.DESCRIPTOR.values if v.number]
    if name == prefix + "UNSPECIFIED" or name not in enum_type.DESCRIPTOR.values_by_name:
        raise ValueError(f"{word!r} is not a {enum_type.DESCRIPTOR.name}; expected one of {', '.join(allowed)}")
    return enum_type.Value(name)


def _scalar(fd: FieldDescriptor, value: Any) -> Any:
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return enum_word(fd.enum_type, value)
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return to_plain(value)
    return value


def to_plain(msg) -> Any:
    """A message as plain Python (see the module's invariants)."""
    if isinstance(msg, timestamp_pb2.Timestamp):
        return msg.ToDatetime(tzinfo=timezone.utc)
    if isinstance(msg, duration_pb2.Duration):
        return msg.ToTimedelta().total_seconds()
    out: dict[str, Any] = {}
    for fd in msg.DESCRIPTOR.fields:
        value = getattr(msg, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            value_fd = fd.message_type.fields_by_name["value"]
            out[fd.name] = {k: _scalar(value_fd, v) for k, v in value.items()}
        elif fd.is_repeated:
            out[fd.name] = [_scalar(fd, v) for v in value]
        elif fd.has_presence and not msg.HasField(fd.name):
            oneof = fd.containing_oneof
            if oneof is None or oneof.name == f"_{fd.name}":  # a real oneof shows only its set member
                out[fd.name] = None
        else:
            out[fd.name] = _scalar(fd, value)
    if msg.DESCRIPTOR is render_pb2.Shot.DESCRIPTOR:
        out["number"] = shot_number(msg.index)  # beside the 0-based index: what people call the shot
    return out


@dataclass(frozen=True)
class Event:
    """One StoryEvent: `kind` is the name of the event set (snapshot, story_state_changed,
    shot_state_changed, progress, keyframe_preview, artifact_published, heartbeat, batch_snapshot)
    and `data` that event as plain data. `seq` is what to resume after."""

    seq: int
    time: datetime | None
    story_id: str
    kind: str
    data: dict[str, Any]

    @classmethod
    def from_message(cls, msg: render_pb2.StoryEvent) -> Event:
        kind = msg.WhichOneof("event") or "unknown"
        data = to_plain(getattr(msg, kind)) if kind != "unknown" else {}
        when = msg.time.ToDatetime(tzinfo=timezone.utc) if msg.HasField("time") else None
        return cls(seq=msg.seq, time=when, story_id=msg.story_id, kind=kind, data=data)


# --- requests: Python values to messages -------------------------------------------------------

def parse_deadline(value: datetime | str, now: datetime | None = None) -> datetime:
    """A deadline as an aware datetime: a datetime (naive = local time), an ISO 8601 string
    ("2025-04-13T07:00", "2025-04-13T07:00:00Z") or "HH:MM", the next such local time (07:00
    typed at 22:00 is tomorrow morning)."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.astimezone()
    text = value.strip()
    if re.fullmatch(r"\d{1,2}:\d{2}", text):
        hour, minute = map(int, text.split(":"))
        now = (now or datetime.now()).astimezone()
        try:
            at = datetime.combine(now.date(), dtime(hour, minute), now.tzinfo)
        except ValueError:
            raise ValueError(f"deadline {value!r}: expected HH:MM with hours 0-23 and minutes 0-59") from None
        return at if at > now else at + timedelta(days=1)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"deadline {value!r}: expected HH:MM or an ISO 8601 time such as 2025-04-13T07:00") from None
    return parsed if parsed.tzinfo else parsed.astimezone()


def timestamp(value: datetime | str) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(parse_deadline(value).astimezone(timezone.utc))
    return ts


def parse_pairs(items: list[str] | None, what: str) -> dict[str, str]:
    """["k=v", ...] -> {k: v}; ValueError naming `what` and the bad item."""
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def story_fields(story: str | Path | Mapping[str, Any] | render_pb2.StorySpec) -> dict[str, Any]:
    """The `story` oneof of a SubmitStoryRequest, as keyword arguments: a StorySpec as is, a dict
    as JSON, a path read from disk (JSON or YAML by its suffix), any other string as story text
    (JSON when it starts with `{`, YAML otherwise). A file also sends its stem as `default_name`,
    so a story without a name of its own is called after its file, as `storyfarm render` does."""
    if isinstance(story, render_pb2.StorySpec):
        return {"story_spec": story}
    if isinstance(story, Mapping):
        return {"story_json": json.dumps(story)}
    path = story_path(story)
    if path is not None:
        body = path.read_text(encoding="utf-8")
        return {file_kind(path, body): body, "default_name": path.stem}
    text = str(story)
    return {"story_json" if text.lstrip().startswith("{") else "story_yaml": text}


def reference_images(references: Mapping[str, str | Path] | None) -> list[render_pb2.ReferenceImage]:
    """{name: path} -> ReferenceImage messages with the files' bytes (content type: the daemon
    detects it), in the mapping's order (a StoryMem story's initial memory follows it)."""
    images = []
    for name, path in (references or {}).items():
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise FileNotFoundError(f"reference {name}={path}: {exc.strerror or exc}") from None
        images.append(render_pb2.ReferenceImage(name=name, data=data))
    return images


def submit_request(story, *, request_id: str, project: str | None, priority: int, labels: Mapping[str, str] | None,
                   deadline: datetime | str | None, references: Mapping[str, str | Path] | None,
                   validate_only: bool, preset: str | None = None) -> render_pb2.SubmitStoryRequest:
    """A SubmitStory request. A story file (a path, or a StoryFile from read_story_file) brings the
    images it names, as `storyfarm render` reads them; `references` add to them or replace them
    by name."""
    if not isinstance(story, (StoryFile, render_pb2.StorySpec, Mapping)) and story_path(story) is not None:
        story = read_story_file(story, references)
    if isinstance(story, StoryFile):
        fields, references = story.fields, story.references
    else:
        fields = story_fields(story)
    request = render_pb2.SubmitStoryRequest(
        request_id=request_id, project=project or "", priority=priority, labels=dict(labels or {}),
        reference_images=reference_images(references), validate_only=validate_only, preset=preset or "",
        **fields,
    )
    if deadline is not None:
        request.deadline_time.CopyFrom(timestamp(deadline))
    return request


def batch_request_id(batch_id: str, request: render_pb2.SubmitStoryRequest, seen: dict[str, int]) -> str:
    """The request id of one story of a batch, derived from the batch id and what the story is
    (its text, the file name it is called after, its preset, its images' names and bytes), so the
    same batch command run again names the same stories and the daemon creates none twice.
    Scheduling options (priority, labels, deadline) are left out: a re-run that changes them is
    refused (IDEMPOTENCY_CONFLICT) rather than rendering the story again. `seen` counts identical
    stories within one batch, so the same file given twice still makes two stories."""
    content = hashlib.sha256()
    form = request.WhichOneof("story") or ""
    story = request.story_spec.SerializeToString(deterministic=True) if form == "story_spec" else \
        getattr(request, form, "").encode("utf-8") if form else b""
    for part in (form.encode(), story, request.default_name.encode(), request.preset.encode()):
        content.update(len(part).to_bytes(8, "big") + part)
    for image in request.reference_images:
        name = image.name.encode("utf-8")
        content.update(len(name).to_bytes(8, "big") + name + hashlib.sha256(image.data).digest())
    key = content.hexdigest()
    ordinal = seen[key] = seen.get(key, -1) + 1
    return hashlib.sha256(f"storyfarm-batch-v1\0{batch_id}\0{key}\0{ordinal}".encode()).hexdigest()


def rerender_request(story_id: str, index: int, *, request_id: str, prompt: str | None = None,
                     strength: float | None = None, seed: int | None = None,
                     cascade: bool = False) -> render_pb2.RerenderShotRequest:
    """A RerenderShot request; unset edit fields keep the shot's own values."""
    return render_pb2.RerenderShotRequest(story_id=story_id, shot_index=index, prompt=prompt, strength=strength,
                                          seed=seed, cascade=cascade, request_id=request_id)
