"""storyfarm API v1: the generated Python of render.proto (render_pb2, render_pb2_grpc).

Edit render.proto, never the generated modules, and regenerate with proto/generate.sh;
tests/unit/test_proto.py fails when the checked-in modules are stale.
"""
