"""How the story driver renders one shot in each mode: one pass, FIFO long shot, CSA, edit strength.

Why apart from the driver: the driver owns the story (memory, references, manifest); this module
owns the choice of sampler for one shot and the delivery of its frames. Both paths end the same
way: the published mp4 written atomically (a FIFO shot frame by frame as the queue pops, so it is
never held whole) and every published frame fed to the shot's keyframe scan (m2v.memory.keyframes
`ShotScan`: a FIFO shot's frames as they stream to the encoder, so what it keeps is bounded
whatever the shot's length: embeddings, and the images of frames that can still be chosen).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from storyfarm.m2v import video
from storyfarm.m2v.render.csa import CsaBank, CsaSession, consistent_self_attention
from storyfarm.m2v.render.engine import Engine, ShotPlan
from storyfarm.m2v.render.fifo import FifoSettings
from storyfarm.m2v.render.fifo_shot import render_fifo_shot
from storyfarm.m2v.render.observe import ShotFeed
from storyfarm.m2v.memory.keyframes import ShotScan
from storyfarm.m2v.accel.placement import experts_of
from storyfarm.story.format import ShotSpec, Story
from storyfarm.story.modes import renders_fifo

CSA_BANK = Path("csa") / "bank.safetensors"


@dataclass
class RenderedShot:
    model: str
    published: int  # frames in the published clip (all of them fed to the keyframe scan)
    memory_ids: list[str]
    time_positions: list[int]
    seconds: dict[str, float]
    stats: dict = field(default_factory=dict)


def fifo_settings(shot: ShotSpec, plan: ShotPlan, engine: Engine) -> FifoSettings | None:
    """FIFO for `mode: fifo`, and for `mode: auto` when the shot is longer than the native length."""
    render = engine.preset.render
    if not renders_fifo(shot.mode, plan.frames, render.frames):
        return None
    options = shot.fifo
    return FifoSettings(
        window=engine.vae.latent_frames(render.frames),
        partitions=options.partitions if options and options.partitions is not None else render.fifo_partitions,
        lookahead=options.lookahead if options and options.lookahead is not None else render.fifo_lookahead,
    )


def edit_start(strength: float, plan: ShotPlan, previous_take: Path) -> tuple[int, np.ndarray | None]:
    """(first step, the previous take's frames as rendered) for an edit with `strength`: 1 starts
    from pure noise; lower keeps more of the previous take (strength x steps steps run)."""
    steps = plan.sampler.steps
    start = steps - max(1, round(strength * steps))
    if start == 0:
        return 0, None
    if not previous_take.is_file():
        raise FileNotFoundError(f"edit.strength: the shot has no previous take at {previous_take} to start from")
    frames = video.read_mp4(previous_take)
    if plan.known_frames is not None and len(plan.known_frames):  # a continuation's published clip drops them
        frames = np.concatenate([plan.known_frames, frames])
    return start, frames


def render_frames(engine: Engine, plan: ShotPlan, fifo: FifoSettings | None, path: Path, repeated: int,
                  scan: ShotScan, feed: ShotFeed, on_step) -> RenderedShot:
    """Render the shot, publish its mp4 at `path` (dropping the `repeated` leading frames of a
    continuation), and feed every published frame to `scan` (frame indices of the published clip).
    `feed` hears the stages as they begin; `on_step` is the sampler's step callback (the feed's,
    possibly wrapped by CSA)."""
    published = plan.frames - repeated
    if fifo is None:
        result = engine.render_shot(plan, on_step=on_step, on_stage=feed.enter)
        frames = result.frames[repeated:]
        seconds = dict(result.seconds)
        feed.enter("mp4_encode")
        with _timed(seconds, "mp4_encode"):
            video.write_mp4(path, frames, engine.preset.render.fps)
        feed.enter("keyframes")
        scan.add(frames)
        return RenderedShot(result.model, len(frames), result.memory_ids, result.time_positions, seconds)
    result = render_fifo_shot(engine, plan, fifo, on_step, on_stage=feed.enter)

    def published_frames() -> Iterator[np.ndarray]:
        for n, frame in enumerate(result.frames):
            if n >= repeated:
                scan.add(frame[None])  # embedded in batches as they pass; the frame is not kept
                yield frame

    written = video.write_mp4_stream(path, published_frames(), engine.preset.render.fps)
    if written != published:
        raise RuntimeError(f"FIFO produced {written} frames for a shot of {published}")
    return RenderedShot(result.model, written, result.memory_ids, result.time_positions, dict(result.seconds),
                        dict(result.stats))


@contextlib.contextmanager
def _timed(seconds: dict, name: str):
    t0 = time.perf_counter()
    yield
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0


@dataclass
class CsaShot:
    session: CsaSession
    bound_bytes: int

    def report(self) -> dict:
        s = self.session
        return {"rate": s.options.rate, "identity": s.writes, "blocks": sorted(s.blocks), "steps": s.steps,
                "extra_keys": s.stats["extra_keys"], "banked_tokens": s.stats["banked_tokens"],
                "bank_bytes": s.bank.nbytes, "bank_bound_bytes": self.bound_bytes}


@contextlib.contextmanager
def csa_for_shot(engine: Engine, story: Story, shot: ShotSpec, plan: ShotPlan, out: Path, fifo):
    """Consistent Self-Attention around one shot of a `csa` story: yields (CsaShot or None, a wrapper
    for the step callback that keeps the session's step current); saves the bank it wrote."""
    options = story.csa
    if options is None:
        yield None, lambda on_step: on_step
        return
    if fifo is not None:
        raise ValueError(f"{shot.path}: csa is not available for FIFO (long) shots; render them without csa")
    experts = experts_of(engine)
    model = engine.m2v_experts[0].model
    bank = CsaBank.load(out / CSA_BANK)
    bank.drop_from(shot.index)  # a retry or re-render banks its own tokens again
    session = CsaSession(options, bank, shot.index, min(len(e.model.blocks) for e in experts), plan.sampler.steps,
                         seed=plan.seed, step=plan.start_step)
    batch = 1 if set(plan.sampler.guidance) == {1.0} else 2
    bound = session.bound_bytes(batch, model.config.num_attention_heads, model.config.attention_head_dim,
                                model.patch_embedding.weight.element_size())

    def step_hook(on_step):
        def advance(step, total, timestep, expert):
            session.step += 1
            if on_step is not None:
                on_step(step, total, timestep, expert)
        return advance

    with consistent_self_attention(experts, session):
        yield CsaShot(session, bound), step_hook
    if session.writes:
        (out / CSA_BANK).parent.mkdir(exist_ok=True)
        bank.save(out / CSA_BANK)
