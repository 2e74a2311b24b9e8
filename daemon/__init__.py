"""storyfarm.daemon: process entry points and the CLI.

The daemon layer talks to users (CLI, later gRPC) and to the store; it never imports torch's CUDA
side itself. Imports point one way: daemon -> scheduler -> m2v -> kernels.
"""
