"""storyfarm.m2v: the model runtime (StoryMem memory-to-video on the Wan2.2 architecture).

This package's __init__ imports nothing heavy: `storyfarm.m2v.story` (story files and their
validation) is pure Python so the daemon and the scheduler can use it without torch.
"""
