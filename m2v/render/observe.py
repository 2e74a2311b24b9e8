"""What a render tells whoever watches it: one observer, one stage callback, one cancel check.

The command line's progress bars and a farm worker's reports to the daemon watch the same thing, so
they implement the same `RenderObserver`; a denoising step is one `stage("denoise", step, total)`
call for both. `ShotFeed` sits between the engine and the observer for one shot: it turns what the
engine enters (its stopwatch's stages, the sampler's steps) into every stage of
`lifecycle.RENDER_STAGES` once and in order (lifecycle.StageSequence), and checks the cancel
callable at every stage and step (raising `Cancelled`, so a cancelled shot stops between steps).
"""

from __future__ import annotations

from typing import Callable

from storyfarm.story.lifecycle import StageSequence


class Cancelled(Exception):
    """Raised between denoising steps (or stages) when the render was asked to stop."""


class RenderObserver:
    """Hooks of a render, all optional: override what you watch."""

    def story_start(self, story, total_shots: int) -> None:
        """A render of `total_shots` shots of `story` begins."""

    def shot_start(self, shot, plan) -> None:
        """A shot's plan is made (its seed, size, memory window); its stages follow."""

    def stage(self, name: str, step: int = 0, total: int = 0, detail: str = "") -> None:
        """The shot entered stage `name` (lifecycle.RENDER_STAGES, each once, in order), or, for
        `denoise`, finished denoising step `step` of `total`; `detail` says which expert at which
        timestep."""

    def shot_done(self, shot, entry: dict) -> None:
        """The shot is published; `entry` is its manifest entry."""


class ShotFeed:
    """One shot's stages and steps, forwarded to an observer in order, with cancel checks."""

    def __init__(self, observer: RenderObserver | None = None, cancel: Callable[[], bool] | None = None):
        self.observer = observer or RenderObserver()
        self.cancel = cancel
        self.sequence = StageSequence()

    def _check(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled()

    def enter(self, stage: str) -> None:
        """The render reached `stage`: report it (and any stage skipped on the way)."""
        self._check()
        for name in self.sequence.enter(stage):
            self.observer.stage(name)

    def step(self, step: int, total: int, timestep: float, expert: str) -> None:
        """The sampler's per-step callback (engine-level signature)."""
        self._check()
        if self.sequence.stage != "denoise":
            self.enter("denoise")
        self.observer.stage("denoise", step, total, f"{expert} t={timestep:.0f}")
