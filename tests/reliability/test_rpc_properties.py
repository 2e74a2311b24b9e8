"""Property-based tests of every RPC's validation, over the real socket (hypothesis).

For every RenderService method, requests are generated from the method's own input descriptor
(any field set or not, hostile strings, boundary integers, NaN, unknown enum values, nested
messages), with ids biased toward real stories and batches, and sent to the shared
production-profile daemon with an admin token, so validation (not auth) is what answers. Whatever
comes in, the answer is either success or a documented client error carrying a rich status:
never UNKNOWN or INTERNAL (an exception escaping a handler), a field violation always names a
field the request has, and a refused call stores no story. A second property drives SubmitStory
with near-valid story documents, so the story validator's paths are exercised deeply: a
validate-only submit either counts the shots the document has or names fields inside it.
"""

from __future__ import annotations

import json
import re
import uuid

import grpc
import pytest
import yaml
from google.protobuf.message_factory import GetMessageClass
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from farm_profile import bearer
from helpers.daemon_proc import violations
from storyfarm.v1 import render_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["RenderService"]
CLIENT_ERRORS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.ABORTED, grpc.StatusCode.UNIMPLEMENTED}
HOSTILE = ["", " ", "..", "../../storyfarm.db", "/etc/passwd", "st_0123456789abcdef", "shots/000_scene01_shot01.mp4",
           "manifest.json", "\x00", "\x1b[2J", "a\u202eb", "%s%n", "' OR 1=1 --", "a" * 300, "☃", "\ud7ff"]


def _ints(bits: int, signed: bool = True):
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    edges = [v for v in (low, high, 0, 1, -1, 100, 101, -101, 1000) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


@st.composite
def message(draw, descriptor, ids: dict, depth: int = 0):
    """Any message of `descriptor`: each field set or left alone, values from hostile pools."""
    msg = GetMessageClass(descriptor)()
    for f in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            entries = draw(st.dictionaries(st.one_of(st.sampled_from(["team", "Team", "k-1", ""]), st.text(max_size=8)),
                                           st.text(max_size=70), max_size=3))
            getattr(msg, f.name).update(entries)
            continue
        count = draw(st.integers(0, 3)) if f.is_repeated else 1
        values = [draw(_value(f, ids, depth)) for _ in range(count)]
        if f.is_repeated:
            target = getattr(msg, f.name)
            for v in values:
                target.add().CopyFrom(v) if f.message_type is not None else target.append(v)
        elif f.message_type is not None:
            getattr(msg, f.name).CopyFrom(values[0])
        else:
            setattr(msg, f.name, values[0])
    return msg


def _value(f, ids: dict, depth: int):
    D = f.__class__
    if f.type == D.TYPE_STRING:
        real = [st.sampled_from(ids[f.name])] if f.name in ids else []
        return st.one_of(*real, st.sampled_from(HOSTILE), st.text(max_size=30))
    if f.type == D.TYPE_BOOL:
        return st.booleans()
    if f.type in (D.TYPE_INT32, D.TYPE_SINT32, D.TYPE_SFIXED32):
        return _ints(32)
    if f.type in (D.TYPE_INT64, D.TYPE_SINT64, D.TYPE_SFIXED64):
        return _ints(64)
    if f.type in (D.TYPE_UINT32, D.TYPE_FIXED32):
        return _ints(32, signed=False)
    if f.type in (D.TYPE_UINT64, D.TYPE_FIXED64):
        return _ints(64, signed=False)
    if f.type == D.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if f.type == D.TYPE_FLOAT:
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if f.type == D.TYPE_ENUM:
        return st.integers(-2, len(f.enum_type.values) + 2)  # unknown values too: proto3 enums are open
    if f.type == D.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.sampled_from([b"\x89PNG\r\n\x1a\n" + b"\0" * 40]))
    if f.message_type.full_name == "google.protobuf.Timestamp":
        return st.builds(lambda s, n: GetMessageClass(f.message_type)(seconds=s, nanos=n),
                         st.integers(-62135596800, 253402300799), st.integers(0, 999_999_999))
    if depth >= 2:
        return st.just(GetMessageClass(f.message_type)())
    return message(f.message_type, ids, depth + 1)


def top_fields(descriptor) -> set[str]:
    return {f.name for f in descriptor.fields} | {o.name for o in descriptor.oneofs}


def check_violation_paths(rpc_descriptor, fields: dict[str, str]) -> None:
    """Every violation names a field of the request (or, in a batch, of one of its stories)."""
    request = rpc_descriptor.input_type
    for path in fields:
        top = re.split(r"[.\[]", path, maxsplit=1)[0]
        assert top in top_fields(request), f"{rpc_descriptor.name}: violation of unknown field {path!r}"
        match = re.match(r"stories\[\d+\]\.([A-Za-z_]+)", path)
        if match:
            assert match.group(1) in top_fields(pb.SubmitStoryRequest.DESCRIPTOR), path


def send(shared, rpc: str, request):
    """(code, error or None); streams are read a few items deep, then cancelled."""
    method = getattr(shared.stub, rpc)
    try:
        result = method(request, metadata=bearer("admin"), timeout=30)
        if rpc.startswith(("Watch", "Download")):
            for n, _ in enumerate(result):
                if n >= 3:
                    break
            result.cancel()
        return grpc.StatusCode.OK, None
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED:  # our own cancel of a stream
            return grpc.StatusCode.OK, None
        return exc.code(), exc


@pytest.fixture(scope="module")
def real_ids(production_daemon):
    """Real targets: a cancelled story (writes cannot restart it), a finished one to read, a batch."""
    stub, metadata = production_daemon.stub, bearer("admin")
    story = json.dumps({"resolution": "64x32", "frames": 5, "steps": 2, "shots": [{"prompt": "a"}, {"prompt": "b"}]})
    batch = f"prop-{uuid.uuid4().hex[:8]}"
    cancelled = stub.SubmitBatch(pb.SubmitBatchRequest(batch_id=batch, stories=[
        pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=story)]), metadata=metadata).stories[0].story_id
    stub.CancelBatch(pb.CancelBatchRequest(batch_id=batch), metadata=metadata)
    return {"story_id": [cancelled], "batch_id": [batch], "name": ["manifest.json", "story.mp4"], "project": ["film", "ads"]}


def restore(shared) -> None:
    """Undo what a generated call may have done to the shared daemon: a drain, stories it accepted."""
    shared.daemon.dispatcher.draining = False
    for record in shared.daemon.store.list_stories(states=["queued", "running", "paused"], page_size=200)[0]:
        shared.daemon.store.request_cancel(record.id)
        shared.daemon.dispatcher.cancel_running(record.id)


@pytest.mark.parametrize("rpc", [m.name for m in SERVICE.methods])
def test_every_rpc_answers_any_request_with_a_documented_status(production_daemon, real_ids, rpc, scale, figures):
    rpc_descriptor = SERVICE.methods_by_name[rpc]
    seen: dict[str, int] = {}

    @settings(max_examples=scale.examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(request=message(rpc_descriptor.input_type, real_ids))
    def run(request):
        stories = sum(production_daemon.daemon.store.count_stories_by_state().values())
        code, error = send(production_daemon, rpc, request)
        seen[code.name] = seen.get(code.name, 0) + 1
        try:
            assert code in CLIENT_ERRORS, (code, error and error.details(), request)
            if error is not None:
                assert rpc_status.from_call(error) is not None or code == grpc.StatusCode.RESOURCE_EXHAUSTED, \
                    f"{code.name} without a rich status: {error.details()}"
                fields, reason = violations(error)
                assert reason, f"{code.name} without an ErrorInfo reason: {error.details()}"
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    assert fields, f"INVALID_ARGUMENT without field violations: {error.details()}"
                    check_violation_paths(rpc_descriptor, fields)
                assert sum(production_daemon.daemon.store.count_stories_by_state().values()) == stories, \
                    "a refused call stored a story"
        finally:
            restore(production_daemon)

    run()
    figures.setdefault("rpc_properties", {})[rpc] = seen


# -- story documents: near-valid, so the validator is exercised past the parse ----------------

VALUE = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=12),
                  st.sampled_from(["64x32", "832x480", "100x50", "first_frame", "motion_frames", "m2v", "fifo"]))
SHOT_KEYS = ["prompt", "negative_prompt", "seed", "cut", "transition", "duration", "frames", "mode", "references",
             "resolution", "steps", "guidance", "shift", "first_frame_prompt", "promt"]
STORY_KEYS = ["name", "overview", "seed", "resolution", "frames", "steps", "references", "shots", "scenes", "negative_prompt"]


@st.composite
def story_document(draw):
    def mapping(keys, extra):
        out = {k: draw(VALUE) for k in draw(st.lists(st.sampled_from(keys), max_size=4, unique=True))}
        out.update(extra)
        return out

    shots = [mapping(SHOT_KEYS, {"prompt": draw(st.text(min_size=1, max_size=20))} if draw(st.booleans()) else {})
             for _ in range(draw(st.integers(0, 3)))]
    if draw(st.booleans()):  # StoryMem's published format
        n = len(shots) or 1
        return {"story_name": draw(st.text(max_size=10)), "story_overview": "o",
                "scenes": [{"scene_num": draw(st.integers(-1, 3)), "video_prompts": [s.get("prompt", "p") for s in shots] or ["p"],
                            "first_frame_prompt": ["f"] * draw(st.sampled_from([n, n + 1])),
                            "cut": draw(st.lists(st.sampled_from([True, False, "yes"]), min_size=n, max_size=n))}]}
    return mapping(STORY_KEYS, {"resolution": "64x32", "frames": 5, "steps": 2, "shots": shots})


def test_validate_only_counts_shots_or_names_fields_inside_the_document(production_daemon, scale, figures):
    outcomes = {"accepted": 0, "refused": 0}

    @settings(max_examples=scale.examples * 3, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(doc=story_document(), as_yaml=st.booleans())
    def run(doc, as_yaml):
        form = "story_yaml" if as_yaml else "story_json"
        text = yaml.safe_dump(doc, allow_unicode=True) if as_yaml else json.dumps(doc)
        request = pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, validate_only=True, **{form: text})
        code, error = send(production_daemon, "SubmitStory", request)
        if error is None:
            outcomes["accepted"] += 1
            return
        outcomes["refused"] += 1
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (code, error.details())
        fields, reason = violations(error)
        assert reason in ("INVALID_STORY", "RENDER_BUDGET_EXCEEDED", "INVALID_REFERENCE_IMAGE"), reason
        assert fields and all(f == form or f.startswith(form + ".") for f in fields), fields
        assert all(d for d in fields.values()), fields

    run()
    assert outcomes["refused"] > 0
    figures.setdefault("rpc_properties", {})["SubmitStory documents"] = outcomes
