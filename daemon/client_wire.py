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
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, time as dtime, timedelta, timezone
from pathlib import Path
from typing import Any, Mapping

import grpc
import yaml
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from storyfarm.v1 import render_pb2

from storyfarm.story.fields import child
from storyfarm.story.references import REFERENCE_NAME
from storyfarm.story.numbering import shot_number

STORY_SUFFIXES = {".json": "story_json", ".yaml": "story_yaml", ".yml": "story_yaml"}


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


def _story_path(story: str | Path) -> Path | None:
    """The story file `story` names, None when it is story text; FileNotFoundError when it looks
    like a file name (one line, a story suffix) but names no file."""
    text = str(story)
    looks_like_path = isinstance(story, Path) or ("\n" not in text and Path(text).suffix.lower() in STORY_SUFFIXES)
    if looks_like_path or ("\n" not in text and len(text) < 4096 and Path(text).is_file()):
        path = Path(text)
        if not path.is_file():
            raise FileNotFoundError(f"story file {path}: no such file")
        return path
    return None


def story_fields(story: str | Path | Mapping[str, Any] | render_pb2.StorySpec) -> dict[str, Any]:
    """The `story` oneof of a SubmitStoryRequest, as keyword arguments: a StorySpec as is, a dict
    as JSON, a path read from disk (JSON or YAML by its suffix), any other string as story text
    (JSON when it starts with `{`, YAML otherwise). A file also sends its stem as `default_name`,
    so a story without a name of its own is called after its file, as `storyfarm render` does."""
    if isinstance(story, render_pb2.StorySpec):
        return {"story_spec": story}
    if isinstance(story, Mapping):
        return {"story_json": json.dumps(story)}
    path = _story_path(story)
    if path is not None:
        body = path.read_text(encoding="utf-8")
        return {_file_kind(path, body): body, "default_name": path.stem}
    text = str(story)
    return {"story_json" if text.lstrip().startswith("{") else "story_yaml": text}


def _file_kind(path: Path, body: str) -> str:
    kind = STORY_SUFFIXES.get(path.suffix.lower())
    return kind or ("story_json" if body.lstrip().startswith("{") else "story_yaml")


# --- story files and the images they name ------------------------------------------------------



class StoryFileError(ValueError):
    """A story file that cannot be submitted: `problems` are (field path, message) pairs, the
    path "" meaning the whole file. str() names the file and every problem, one per line."""

    def __init__(self, path: str | Path, problems: list[tuple[str, str]]):
        self.path, self.problems = str(path), list(problems)
        super().__init__("\n".join(f"{self.path}: {field}: {message}" if field else f"{self.path}: {message}"
                                   for field, message in self.problems))


@dataclass(frozen=True)
class StoryFile:
    """A story file made ready to submit, as `storyfarm render` would read it: `fields` is the
    request's story oneof and default_name; `references` maps upload names to image files, the
    images the story names first (read relative to the story's folder, unless an explicit
    reference of the same name replaces one), then the other explicit ones. When a story names an
    image by a path that is not a bare file name (`images/hero.png`), the text sent names it by
    its upload name instead (the daemon takes names, never paths)."""

    path: Path
    fields: dict[str, str]
    references: dict[str, Path]

    @property
    def text(self) -> str:
        return next(v for k, v in self.fields.items() if k != "default_name")


def _reference_slots(document: dict) -> Iterator[tuple[str, Any, Any]]:
    """(field path, container, key) of every image path a native or StoryMem document names:
    the story's `references`, and each shot's (under shots, or scenes[].shots); a references
    value is a list of paths or a mapping of character or place to a path or a list of them."""
    def walk_refs(value: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
        if isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, str):
                    yield child(path, i), value, i
        elif isinstance(value, dict):
            for label, images in value.items():
                if isinstance(images, str):
                    yield child(path, label), value, label
                elif isinstance(images, list):
                    yield from walk_refs(images, child(path, label))

    def walk_shots(shots: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
        for i, shot in enumerate(shots if isinstance(shots, list) else ()):
            if isinstance(shot, dict) and "references" in shot:
                yield from walk_refs(shot["references"], f"{child(path, i)}.references")

    if "references" in document:
        yield from walk_refs(document["references"], "references")
    yield from walk_shots(document.get("shots"), "shots")
    for s, scene in enumerate(document.get("scenes") if isinstance(document.get("scenes"), list) else ()):
        if isinstance(scene, dict):
            yield from walk_shots(scene.get("shots"), f"scenes[{s}].shots")


def _upload_name(written: str, taken: set[str]) -> str:
    """The name an image the story names is uploaded under: as written when that is a bare name
    the daemon accepts, else its file name made acceptable, made unique with -2, -3, ..."""
    normal = os.path.normpath(written)
    if REFERENCE_NAME.fullmatch(normal) and normal not in taken:
        return normal
    base = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(normal)) or "image"
    base = base if base[0].isalnum() else "r" + base
    stem, suffix = os.path.splitext(base)
    suffix = suffix[:20]
    for n in range(1, len(taken) + 2):
        name = f"{stem[:100 - len(suffix) - 6]}{'' if n == 1 else f'-{n}'}{suffix}"
        if name not in taken:
            return name
    raise AssertionError("unreachable: one of len(taken) + 1 names is free")


def read_story_file(path: str | Path, references: Mapping[str, str | Path] | None = None) -> StoryFile:
    """A story file and the images to upload with it (see StoryFile). Raises FileNotFoundError
    for a missing story file and StoryFileError naming the file, the field and the image path
    for an image it names that is not there (and no explicit reference of its name replaces).
    A file that does not parse is returned as it is: validation (or the daemon) says why."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"story file {path}: no such file")
    body = path.read_text(encoding="utf-8")
    kind = _file_kind(path, body)
    explicit = {name: Path(p) for name, p in (references or {}).items()}
    try:
        document = json.loads(body) if kind == "story_json" else yaml.safe_load(body)
    except (ValueError, yaml.YAMLError, RecursionError):
        document = None
    folder = os.path.dirname(os.path.abspath(path))
    names: dict[str, str] = {}  # absolute image path -> upload name
    own: dict[str, Path] = {}
    problems: list[tuple[str, str]] = []
    rewrite = []
    for field_path, container, key in _reference_slots(document) if isinstance(document, dict) else ():
        written = container[key]
        if not written.strip() or "\x00" in written:
            continue  # validation names it
        image = os.path.abspath(os.path.join(folder, written))
        name = names.get(image) or _upload_name(written, set(names.values()))
        names[image] = name
        if name not in explicit:
            if not os.path.isfile(image):
                problems.append((field_path, f"reference image {written}: no such file ({image})"))
            own[name] = Path(image)
        if os.path.normpath(written) != name:
            rewrite.append((container, key, name))
    if problems:
        raise StoryFileError(path, problems)
    if rewrite:
        for container, key, name in rewrite:
            container[key] = name
        body = (json.dumps(document, ensure_ascii=False, indent=2) if kind == "story_json"
                else yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    uploads = {name: explicit.get(name, own.get(name)) for name in names.values()}
    uploads.update((name, p) for name, p in explicit.items() if name not in uploads)
    return StoryFile(path, {kind: body, "default_name": path.stem}, uploads)


def check_story_file(story_file: StoryFile) -> list[str]:
    """Validates a story file as the daemon will (its format and fields; not the daemon's preset,
    limits or the images' content): returns the warnings, raises StoryFileError naming every
    problem with its field path."""
    from storyfarm.story.format import StoryValidationError, parse_story

    fmt = "json" if "story_json" in story_file.fields else "yaml"
    with tempfile.TemporaryDirectory(prefix="storyfarm-check-") as folder:
        for name in story_file.references:  # the names the daemon will have: stand-ins suffice here
            if REFERENCE_NAME.fullmatch(name):  # any other name the daemon refuses, naming it
                Path(folder, name).touch()
        try:
            story = parse_story(story_file.text, source=str(story_file.path), base_dir=folder, fmt=fmt,
                                name=story_file.path.stem)
        except StoryValidationError as exc:
            raise StoryFileError(story_file.path, [(e.path, e.message) for e in exc.errors]) from None
    return list(story.warnings)


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
    if not isinstance(story, (StoryFile, render_pb2.StorySpec, Mapping)) and _story_path(story) is not None:
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
