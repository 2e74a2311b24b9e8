"""Server reflection on a running daemon under both names, grpc.reflection.v1 (what grpcurl and
current clients ask for first, and what proto/README.md names) and grpc.reflection.v1alpha, with
auth required: reflection, like health, needs no token while the render service does."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from storyfarm.daemon.auth import hash_token
from storyfarm.v1 import render_pb2 as pb
from helpers.daemon_inproc import running_daemon

RENDER = "storyfarm.v1.RenderService"
SERVICES = {RENDER, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}


@pytest.fixture(scope="module")
def channel(tmp_path_factory):
    auth = {"require": True, "tokens": [{"name": "ci", "project": "film", "role": "viewer", "sha256": hash_token("t" * 20)}]}
    with running_daemon(tmp_path_factory.mktemp("data"), auth=auth, reflection=True) as (daemon, stub):
        with pytest.raises(grpc.RpcError) as refused:  # the render service still needs a token
            stub.GetPool(pb.GetPoolRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(f"127.0.0.1:{daemon.port}") as channel:
            yield channel


def reflect(channel, package: str, request_class, response_class, **request) -> list:
    """One ServerReflectionInfo exchange on `package`'s method path, as a generic client makes it."""
    call = channel.stream_stream(f"/{package}.ServerReflection/ServerReflectionInfo",
                                 request_serializer=request_class.SerializeToString,
                                 response_deserializer=response_class.FromString)
    return list(call(iter([request_class(**request)]), timeout=10))


def files(response) -> list[descriptor_pb2.FileDescriptorProto]:
    return [descriptor_pb2.FileDescriptorProto.FromString(b) for b in response.file_descriptor_response.file_descriptor_proto]


def test_v1alpha_reflection_client_lists_and_describes_the_services(channel):
    database = ProtoReflectionDescriptorDatabase(channel)  # grpcio-reflection's own client (v1alpha)
    assert set(database.get_services()) == SERVICES
    service = descriptor_pool.DescriptorPool(database).FindServiceByName(RENDER)
    assert {m.name for m in service.methods} == {m.name for m in pb.DESCRIPTOR.services_by_name["RenderService"].methods}


def test_v1_reflection_lists_and_describes_the_services_and_itself(channel):
    # v1's messages are v1alpha's under another package (same names, numbers, types): a v1 client's bytes
    [listed] = reflect(channel, "grpc.reflection.v1", reflection_pb2.ServerReflectionRequest,
                       reflection_pb2.ServerReflectionResponse, list_services="")
    assert {s.name for s in listed.list_services_response.service} == SERVICES
    [render] = reflect(channel, "grpc.reflection.v1", reflection_pb2.ServerReflectionRequest,
                       reflection_pb2.ServerReflectionResponse, file_containing_symbol=RENDER)
    assert RENDER.rsplit(".", 1)[1] in {s.name for f in files(render) for s in f.service}
    [itself] = reflect(channel, "grpc.reflection.v1", reflection_pb2.ServerReflectionRequest,
                       reflection_pb2.ServerReflectionResponse, file_containing_symbol="grpc.reflection.v1.ServerReflection")
    [v1_file] = files(itself)
    assert (v1_file.name, v1_file.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
    method = v1_file.service[0].method[0]
    assert (method.input_type, method.output_type) == (".grpc.reflection.v1.ServerReflectionRequest",
                                                       ".grpc.reflection.v1.ServerReflectionResponse")
    alpha = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(alpha)
    shape = lambda f: [(m.name, [(x.name, x.number, x.type, x.type_name.rsplit(".", 1)[-1]) for x in m.field]) for m in f.message_type]
    assert shape(v1_file) == shape(alpha)
    # a client that builds its v1 classes from what the server described (as grpcurl does) gets answers too
    pool = descriptor_pool.DescriptorPool()
    pool.Add(v1_file)
    request_class, response_class = (message_factory.GetMessageClass(pool.FindMessageTypeByName(f"grpc.reflection.v1.{n}"))
                                     for n in ("ServerReflectionRequest", "ServerReflectionResponse"))
    [again] = reflect(channel, "grpc.reflection.v1", request_class, response_class, list_services="")
    assert {s.name for s in again.list_services_response.service} == SERVICES
