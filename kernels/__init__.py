"""storyfarm.kernels: the numeric building blocks under the model runtime (RoPE, attention).

Lowest layer: imports torch and nothing else of storyfarm.
"""
