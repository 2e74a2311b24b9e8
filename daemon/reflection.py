"""gRPC server reflection under both of its names: `grpc.reflection.v1` and `grpc.reflection.v1alpha`.

Why a module of its own: current clients (grpcurl, grpc_cli, Postman, Java's and Go's) ask for v1
first and v1alpha is deprecated upstream, but grpcio-reflection ships only a v1alpha servicer
(grpc/grpc#38576). The two protocols are the same messages with the same field numbers under
another package name, so one v1alpha `ReflectionServicer` answers both: requests on the v1 method
path are read with the v1alpha message classes and the answers written with them, which is byte
for byte what a v1 client expects. So that `describe grpc.reflection.v1.ServerReflection` works
too, the v1 file descriptor (the v1alpha one under the v1 package, file name and options, as
upstream's grpc/reflection/v1/reflection.proto declares them) is added once to the default
descriptor pool, which the servicer reads.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA_SERVICE = reflection.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"
METHOD = "ServerReflectionInfo"


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """v1alpha's file descriptor renamed to v1 (the messages and fields are the same)."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old = f".{proto.package}."

    def renamed(type_name: str) -> str:
        return type_name.replace(old, f".{V1_PACKAGE}.", 1) if type_name.startswith(old) else type_name

    proto.name, proto.package = V1_FILE, V1_PACKAGE
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # set on message fields only; "" would be a bad type
                field.type_name = renamed(field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type, method.output_type = renamed(method.input_type), renamed(method.output_type)
    proto.options.Clear()
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    proto.options.java_multiple_files = True
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    return proto


def _register_v1_file(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(V1_FILE)  # a second daemon in this process, or a library that added it
    except KeyError:
        pool.AddSerializedFile(_v1_file().SerializeToString())


def enable_reflection(server: grpc.Server, service_names: Iterable[str]) -> None:
    """Serve reflection on `server` as v1 and v1alpha, listing `service_names` and both reflection
    services."""
    _register_v1_file(descriptor_pool.Default())
    servicer = reflection.ReflectionServicer((*service_names, V1_SERVICE, V1ALPHA_SERVICE))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE, {METHOD: v1}),))
