"""storyfarm.scheduler: where shots run.

The top level is the pure part, no I/O and no torch, tested with fakes: the placement policy
(`policy`) and the simulator that plays it on a virtual clock (`simulate`). The GPU pool
(`gpu_pool`: executors, the worker loop, messages, device discovery) is the part that runs
processes; its parent side imports no torch either, and its workers load the model runtime.
"""
