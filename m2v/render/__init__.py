"""Rendering: the engine, the story driver's shot loop, shot modes, samplers (UniPC/Euler, FIFO), CSA."""
