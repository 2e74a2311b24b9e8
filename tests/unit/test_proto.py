"""The API contract (proto/storyfarm/v1/render.proto) and its checked-in generated Python.

Guards: the generated modules are exactly what proto/generate.sh makes from the .proto (nobody
edits generated code, nobody forgets to regenerate); they import as storyfarm.v1.* from the
installed package; the protobuf and grpcio runtimes accept them; the service keeps every RPC with
its streaming shape; enums follow the API design guide (<ENUM>_UNSPECIFIED = 0, prefixed
values); and every element of the .proto carries a comment, because the proto is user
documentation.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PROTO = PROTO_ROOT / "storyfarm" / "v1" / "render.proto"
GENERATED = ("render_pb2.py", "render_pb2.pyi", "render_pb2_grpc.py")
PYPROJECT_HINT = ("storyfarm.v1 is not importable: pyproject.toml must map the package "
                  '"storyfarm.v1" to the folder proto/storyfarm/v1 (see proto/README.md), '
                  "then reinstall (make test rebuilds the venv)")

# name -> (request type, response type, server streaming). No RPC streams from the client.
RPCS = {
    "SubmitStory": ("SubmitStoryRequest", "SubmitStoryResponse", False),
    "GetStory": ("GetStoryRequest", "Story", False),
    "ListStories": ("ListStoriesRequest", "ListStoriesResponse", False),
    "WatchStory": ("WatchStoryRequest", "StoryEvent", True),
    "CancelStory": ("CancelStoryRequest", "Story", False),
    "PauseStory": ("PauseStoryRequest", "Story", False),
    "ResumeStory": ("ResumeStoryRequest", "Story", False),
    "SetPriority": ("SetPriorityRequest", "Story", False),
    "RetryShot": ("RetryShotRequest", "Story", False),
    "ListArtifacts": ("ListArtifactsRequest", "ListArtifactsResponse", False),
    "DownloadArtifact": ("DownloadArtifactRequest", "ArtifactChunk", True),
    "GetPool": ("GetPoolRequest", "GetPoolResponse", False),
    "Drain": ("DrainRequest", "DrainResponse", False),
    "SubmitBatch": ("SubmitBatchRequest", "SubmitBatchResponse", False),
    "GetBatch": ("GetBatchRequest", "Batch", False),
    "CancelBatch": ("CancelBatchRequest", "Batch", False),
    "WatchBatch": ("WatchBatchRequest", "StoryEvent", True),
}
# Enums whose value names are wire strings used elsewhere, so they carry no prefix.
UNPREFIXED_ENUMS = {"ErrorReason"}


@pytest.fixture(scope="module")
def pb():
    try:
        from storyfarm.v1 import render_pb2
    except ImportError as exc:
        pytest.fail(f"{PYPROJECT_HINT}: {exc}")
    return render_pb2


@pytest.fixture(scope="module")
def pb_grpc(pb):
    from storyfarm.v1 import render_pb2_grpc

    return render_pb2_grpc


def _protoc(*args: str) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the API code")
    out = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", *args],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, f"protoc failed:\n{out.stderr}"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


# --- the generated code is what the .proto makes --------------------------------------------

def test_generated_modules_match_a_fresh_generation(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the API code")
    generated_with = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'",
                               (PROTO.parent / "render_pb2_grpc.py").read_text()).group(1)
    tools = importlib.metadata.version("grpcio-tools")
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(["sh", str(PROTO_ROOT / "generate.sh"), str(tmp_path)],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, f"proto/generate.sh failed:\n{out.stderr}"
    stale = [name for name in GENERATED
             if (tmp_path / "storyfarm" / "v1" / name).read_bytes() != (PROTO.parent / name).read_bytes()]
    if stale and tools != generated_with:
        pytest.fail(f"the checked-in code was generated with grpcio-tools {generated_with}, this "
                    f"environment has {tools}; install the dev extra's pinned grpcio-tools")
    assert not stale, (f"proto/storyfarm/v1/{', '.join(stale)} differ from what render.proto "
                       "generates: run proto/generate.sh (never edit generated code)")


def test_generation_writes_nothing_else(tmp_path):
    out = subprocess.run(["sh", str(PROTO_ROOT / "generate.sh"), str(tmp_path)],
                         capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    if out.returncode != 0 and "No module named grpc_tools" in out.stderr:
        pytest.skip("grpcio-tools (dev extra) regenerates the API code")
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted(f"storyfarm/v1/{name}" for name in GENERATED)


# --- it imports and runs with the installed runtimes ----------------------------------------

def test_modules_import_from_the_installed_package():
    """In a fresh interpreter, with no PYTHONPATH help: only the package mapping can find them."""
    code = ("import storyfarm.v1.render_pb2 as pb, storyfarm.v1.render_pb2_grpc as g; "
            "print(pb.__file__); print(g.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env)
    assert out.returncode == 0, f"{PYPROJECT_HINT}:\n{out.stderr[-2000:]}"
    for line in out.stdout.split():
        assert Path(line).resolve().parent == PROTO.parent


def test_runtimes_accept_the_generated_code(pb, pb_grpc):
    import google.protobuf
    import grpc

    header = (PROTO.parent / "render_pb2.py").read_text()
    gencode = _version(re.search(r"Protobuf Python Version: (\S+)", header).group(1))
    assert _version(google.protobuf.__version__) >= gencode  # what ValidateProtobufRuntimeVersion checks
    grpc_min = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", (PROTO.parent / "render_pb2_grpc.py").read_text())
    assert _version(grpc.__version__) >= _version(grpc_min.group(1))
    story = pb.Story(story_id="s1", state=pb.STORY_STATE_RUNNING, shots=[pb.Shot(index=0)])
    assert pb.Story.FromString(story.SerializeToString()) == story


def test_declared_minimums_cover_the_generated_code():
    """pyproject's protobuf and grpcio floors must be at least what the generated code checks."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for dep in deps:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(?:\[[^]]*\])?\s*(.*)", dep)
        floor = re.search(r">=\s*([0-9][0-9.]*)", match.group(2))
        floors[match.group(1).lower()] = _version(floor.group(1)) if floor else ()
    header = (PROTO.parent / "render_pb2.py").read_text()
    gencode = _version(re.search(r"Protobuf Python Version: (\S+)", header).group(1))
    grpc_min = _version(re.search(r"GRPC_GENERATED_VERSION = '([^']+)'",
                                  (PROTO.parent / "render_pb2_grpc.py").read_text()).group(1))
    assert floors.get("protobuf", ()) >= gencode, f"pyproject.toml needs protobuf>={'.'.join(map(str, gencode))}"
    assert floors.get("grpcio", ()) >= grpc_min, f"pyproject.toml needs grpcio>={'.'.join(map(str, grpc_min))}"


# --- the contract's shape -------------------------------------------------------------------

def test_service_has_every_rpc_with_its_streaming_shape(pb, pb_grpc):
    service = pb.DESCRIPTOR.services_by_name["RenderService"]
    assert service.full_name == "storyfarm.v1.RenderService"
    missing = set(RPCS) - set(service.methods_by_name)
    assert not missing, f"RPCs missing from RenderService: {sorted(missing)}"
    for name, (request, response, server_streaming) in RPCS.items():
        method = service.methods_by_name[name]
        assert method.input_type.full_name == f"storyfarm.v1.{request}", name
        assert method.output_type.full_name == f"storyfarm.v1.{response}", name
        assert method.server_streaming is server_streaming, name
        assert method.client_streaming is False, name
    # The grpc plugin made a stub and a servicer with one entry per RPC.
    assert all(hasattr(pb_grpc.RenderServiceServicer, name) for name in service.methods_by_name)
    assert callable(pb_grpc.add_RenderServiceServicer_to_server)


def _prefix(enum_name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum_name).upper()


def test_enums_start_with_unspecified_zero_and_prefix_their_values(pb):
    enums = list(pb.DESCRIPTOR.enum_types_by_name.values())
    for message in pb.DESCRIPTOR.message_types_by_name.values():
        enums.extend(message.enum_types)
    assert {"StoryState", "ShotState", "RenderStage", "ArtifactKind", "ErrorReason"} <= {e.name for e in enums}
    for enum in enums:
        prefix = _prefix(enum.name)
        assert enum.values[0].number == 0 and enum.values[0].name == f"{prefix}_UNSPECIFIED", enum.name
        if enum.name not in UNPREFIXED_ENUMS:
            unprefixed = [v.name for v in enum.values if not v.name.startswith(prefix + "_")]
            assert not unprefixed, f"{enum.name} values without the {prefix}_ prefix: {unprefixed}"


def test_states_the_cli_prints(pb):
    """The CLI prints enum values lower-case without their prefix; these are the issue's words."""
    story = [pb.StoryState.Name(n).removeprefix("STORY_STATE_").lower() for n in pb.StoryState.values()][1:]
    assert story == ["queued", "running", "succeeded", "failed", "cancelled", "paused"]
    shot = {pb.ShotState.Name(n).removeprefix("SHOT_STATE_").lower() for n in pb.ShotState.values()}
    assert {"waiting", "queued", "running", "succeeded", "failed", "cancelled", "paused"} <= shot
    stages = [pb.RenderStage.Name(n).removeprefix("RENDER_STAGE_") for n in pb.RenderStage.values()][1:]
    assert stages == ["TEXT_ENCODE", "MEMORY_ENCODE", "DENOISE", "VAE_DECODE", "KEYFRAMES", "MP4_ENCODE", "ASSEMBLE"]


def test_the_proto_enums_name_exactly_the_lifecycle_lists(pb):
    """States and stages have one home (storyfarm.story.lifecycle); the proto must name the same."""
    from storyfarm.story import lifecycle

    def names(enum, prefix):
        return {enum.Name(n).removeprefix(prefix).lower() for n in enum.values()} - {"unspecified"}

    assert names(pb.StoryState, "STORY_STATE_") == set(lifecycle.STORY_STATES)
    assert names(pb.ShotState, "SHOT_STATE_") == set(lifecycle.SHOT_STATES)
    assert names(pb.RenderStage, "RENDER_STAGE_") == set(lifecycle.RENDER_STAGES)


def test_error_reasons_are_valid_error_info_reasons(pb):
    # google.rpc.ErrorInfo.reason: UPPER_SNAKE_CASE, at most 63 characters.
    for name in pb.ErrorReason.keys():
        assert re.fullmatch(r"[A-Z][A-Z0-9_]{0,61}[A-Z0-9]", name), name
    for reason in ("IDEMPOTENCY_CONFLICT", "QUOTA_EXCEEDED", "INVALID_STORY", "STORY_NOT_FOUND"):
        assert reason in pb.ErrorReason.keys()


def test_story_has_one_form_and_download_chunks_are_self_describing(pb):
    request = pb.SubmitStoryRequest(story_yaml="shots: [{prompt: a}]")
    request.story_spec.shots.add(prompt="a")  # setting another member of the oneof replaces it
    assert request.WhichOneof("story") == "story_spec"
    assert [f.name for f in pb.SubmitStoryRequest.DESCRIPTOR.oneofs_by_name["story"].fields] == [
        "story_json", "story_yaml", "story_spec"]
    chunk_fields = set(pb.ArtifactChunk.DESCRIPTOR.fields_by_name)
    assert {"offset", "data", "total_size", "sha256"} <= chunk_fields
    assert {"story_id", "name", "offset"} <= set(pb.DownloadArtifactRequest.DESCRIPTOR.fields_by_name)
    assert pb.SubmitStoryRequest.DESCRIPTOR.fields_by_name["deadline_time"].message_type.full_name == \
        "google.protobuf.Timestamp"
    assert pb.Story.DESCRIPTOR.fields_by_name["eta"].message_type.full_name == "google.protobuf.Duration"


def test_list_methods_page_the_google_way(pb):
    service = pb.DESCRIPTOR.services_by_name["RenderService"]
    for method in service.methods:
        if method.name.startswith("List"):
            assert {"page_size", "page_token"} <= set(method.input_type.fields_by_name), method.name
            assert "next_page_token" in method.output_type.fields_by_name, method.name


# --- the proto is documentation ---------------------------------------------------------------

def _undocumented(file) -> list[str]:
    """Every service, method, message, field, oneof, enum and enum value without a leading comment."""
    comments = {tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location}
    missing: list[str] = []

    def need(path: tuple[int, ...], what: str) -> None:
        if not comments.get(path):
            missing.append(what)

    def enum(path, e, scope):
        need(path, f"enum {scope}{e.name}")
        for i, value in enumerate(e.value):
            need((*path, 2, i), f"enum value {scope}{e.name}.{value.name}")

    def message(path, m, scope):
        name = f"{scope}{m.name}"
        need(path, f"message {name}")
        for i, field in enumerate(m.field):
            need((*path, 2, i), f"field {name}.{field.name}")
        for i, oneof in enumerate(m.oneof_decl):
            if not oneof.name.startswith("_"):  # synthetic oneofs of proto3 `optional`
                need((*path, 8, i), f"oneof {name}.{oneof.name}")
        for i, nested in enumerate(m.nested_type):
            if not nested.options.map_entry:
                message((*path, 3, i), nested, f"{name}.")
        for i, e in enumerate(m.enum_type):
            enum((*path, 4, i), e, f"{name}.")

    for i, m in enumerate(file.message_type):
        message((4, i), m, "")
    for i, e in enumerate(file.enum_type):
        enum((5, i), e, "")
    for i, service in enumerate(file.service):
        need((6, i), f"service {service.name}")
        for j, method in enumerate(service.method):
            need((6, i, 2, j), f"rpc {service.name}.{method.name}")
    return missing


def test_every_element_of_the_proto_is_documented(tmp_path):
    from google.protobuf import descriptor_pb2

    out = tmp_path / "render.pb"
    _protoc("-Iproto", "--include_source_info", f"--descriptor_set_out={out}", "proto/storyfarm/v1/render.proto")
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    (render,) = [f for f in files if f.name == "storyfarm/v1/render.proto"]
    assert render.package == "storyfarm.v1"
    missing = _undocumented(render)
    assert not missing, "undocumented in render.proto:\n  " + "\n  ".join(missing)


def test_every_rpc_comment_names_its_role_and_errors(tmp_path):
    from google.protobuf import descriptor_pb2

    out = tmp_path / "render.pb"
    _protoc("-Iproto", "--include_source_info", f"--descriptor_set_out={out}", "proto/storyfarm/v1/render.proto")
    (render,) = [f for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
                 if f.name == "storyfarm/v1/render.proto"]
    comments = {tuple(loc.path): loc.leading_comments for loc in render.source_code_info.location}
    for j, method in enumerate(render.service[0].method):
        text = comments.get((6, 0, 2, j), "")
        assert "Role:" in text and "Errors:" in text, f"rpc {method.name}: say who may call it and what it raises"


# --- the generated stubs work over a real socket ----------------------------------------------

def test_stub_and_servicer_talk_over_a_socket_with_rich_errors(pb, pb_grpc):
    """A toy servicer: a server stream with resumable offsets, and an error carrying google.rpc details."""
    from concurrent import futures

    import grpc
    from google.protobuf import any_pb2
    from google.rpc import code_pb2, error_details_pb2, status_pb2
    from grpc_status import rpc_status

    blob = bytes(range(256)) * 10
    digest = hashlib.sha256(blob).hexdigest()

    class Servicer(pb_grpc.RenderServiceServicer):
        def DownloadArtifact(self, request, context):
            for offset in range(request.offset, len(blob), 1000):
                yield pb.ArtifactChunk(offset=offset, data=blob[offset:offset + 1000],
                                       total_size=len(blob), sha256=digest)

        def GetStory(self, request, context):
            info = error_details_pb2.ErrorInfo(reason=pb.ErrorReason.Name(pb.STORY_NOT_FOUND),
                                               domain="storyfarm", metadata={"story_id": request.story_id})
            resource = error_details_pb2.ResourceInfo(resource_type="storyfarm.v1.Story",
                                                      resource_name=request.story_id)
            details = []
            for detail in (info, resource):
                packed = any_pb2.Any()
                packed.Pack(detail)
                details.append(packed)
            context.abort_with_status(rpc_status.to_status(status_pb2.Status(
                code=code_pb2.NOT_FOUND, message=f"no story {request.story_id}", details=details)))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_RenderServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RenderServiceStub(channel)
            chunks = list(stub.DownloadArtifact(pb.DownloadArtifactRequest(story_id="s", name="a", offset=1500),
                                                timeout=10))
            assert chunks[0].offset == 1500 and {c.total_size for c in chunks} == {len(blob)}
            assert b"".join(c.data for c in chunks) == blob[1500:]

            with pytest.raises(grpc.RpcError) as caught:
                stub.GetStory(pb.GetStoryRequest(story_id="nope"), timeout=10)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            status = rpc_status.from_call(caught.value)
            info = error_details_pb2.ErrorInfo()
            assert status.details[0].Unpack(info) and info.reason == "STORY_NOT_FOUND"

            with pytest.raises(grpc.RpcError) as caught:  # RPCs a servicer leaves out
                stub.GetPool(pb.GetPoolRequest(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(grace=None)
