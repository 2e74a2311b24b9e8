"""Acceleration: kernel runtime choices, expert placement, compile, FP8, warm-up, ONNX/TensorRT export."""
