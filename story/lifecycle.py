"""The lifecycle of stories and shots: their states, how an attempt ends, and the render stages.

One home for these lists: the store's schema and checks, the gRPC translation, the metrics, the
CLI and the workers all import them from here, so a state or a stage cannot be known to one of
them and unknown to another. The proto's enums name the same values (`STORY_STATE_<NAME>`,
`SHOT_STATE_<NAME>`, `RENDER_STAGE_<NAME>`); a test checks the two agree.
"""

from __future__ import annotations

STORY_STATES = ("queued", "running", "succeeded", "failed", "cancelled", "paused")
# A shot is `waiting` while the shot before it in its story has not succeeded.
SHOT_STATES = ("queued", "waiting", "running", "succeeded", "failed", "cancelled", "paused")
FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})  # a story or shot never leaves these
OPEN_STORY_STATES = tuple(s for s in STORY_STATES if s not in FINAL_STATES)
OPEN_SHOT_STATES = tuple(s for s in SHOT_STATES if s not in FINAL_STATES)

# How one attempt at a shot ends: `failed` spends the shot's retry budget (an out-of-memory failure
# first spends its own allowance, see OOM_RETRIES), `lost` is the infrastructure's fault (a worker
# died, froze or hit a CUDA error) and spends nothing.
OUTCOMES = ("succeeded", "failed", "cancelled", "lost")
# Why an attempt failed, as the worker classifies it.
FAILURE_REASONS = ("content", "story", "out_of_memory", "cuda_error", "cancelled", "start_failed")
# Out-of-memory failures of one shot retried in low-memory mode (experts swapped, VAE tiled)
# before the shot fails; separate from `max_attempts`, which counts the other failures.
OOM_RETRIES = 1

# The stages of rendering one shot, in the order a worker reports them. Each is reported once per
# attempt, in this order, even when it has nothing to do (a first shot rendered text-to-video has
# no memory to encode); `denoise` is reported again at every step. A FIFO long shot decodes and
# encodes while it denoises: its `vae_decode` and `mp4_encode` are reported when the streaming ends.
# `assemble` (story video, contact sheet, manifest) runs only for the shot that completes a story.
RENDER_STAGES = ("text_encode", "memory_encode", "denoise", "vae_decode", "mp4_encode", "keyframes", "assemble")
SHOT_STAGES = RENDER_STAGES[:-1]  # what every shot runs


class StageSequence:
    """Turns the stages a render enters into what it reports: every stage of RENDER_STAGES once,
    in order, never going back. Entering a later stage first reports the ones skipped on the way;
    entering an earlier one again (FIFO's interleaved decoding) reports nothing new."""

    def __init__(self) -> None:
        self.current = -1

    def enter(self, stage: str) -> list[str]:
        """The stages to report, in order, on entering `stage` (empty if it is not new)."""
        try:
            target = RENDER_STAGES.index(stage)
        except ValueError:
            raise ValueError(f"unknown render stage {stage!r}; known: {', '.join(RENDER_STAGES)}") from None
        if target <= self.current:
            return []
        out = list(RENDER_STAGES[self.current + 1:target + 1])
        self.current = target
        return out

    @property
    def stage(self) -> str:
        return RENDER_STAGES[self.current] if self.current >= 0 else ""
