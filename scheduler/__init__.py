"""storyfarm.scheduler: scheduling policy, GPU pool and workers.

The policy part stays pure (no I/O, no torch) so it can be tested with fakes.
"""
