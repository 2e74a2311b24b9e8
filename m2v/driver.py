"""The story driver: a story's shots in order, each conditioned on the story's memory so far.

Per shot: merge its settings (shot > story > operator > preset), take the memory window (the first
`long_term` keyframes of the story plus the most recent, `max_size` in all), add the previous
shot's last frame(s) for a continuation (MI2V / MM2V), render, publish the mp4 atomically, pick new
keyframes into the memory bank, and record everything in manifest.json. Fixes over the official
StoryMem pipeline: seeds derive from the shot's index in the whole story (never repeat per scene),
an empty memory is a valid state, the story video is assembled from an explicit list of this run's
shot files (never a glob), and models (reward model included) load once per story, not per shot.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from storyfarm.m2v import video
from storyfarm.m2v.engine import Engine, ShotPlan
from storyfarm.m2v.keyframes import KeyframeSelector
from storyfarm.m2v.memory import MemoryBank
from storyfarm.m2v.references import load_reference_image
from storyfarm.m2v.sampler import SamplerSettings
from storyfarm.m2v.story import ShotSpec, Story, check_against_model

MANIFEST_VERSION = 1
OWNED = ("shots", "keyframes", "story.mp4", "contact_sheet.png", "manifest.json")


class Cancelled(Exception):
    """Raised from a step callback to stop a render between denoising steps."""


class Progress(Protocol):
    def story_start(self, story: Story, total_shots: int) -> None: ...
    def shot_start(self, shot: ShotSpec, plan: ShotPlan) -> None: ...
    def step(self, step: int, total: int, timestep: float, expert: str) -> None: ...
    def shot_done(self, shot: ShotSpec, entry: dict) -> None: ...


@dataclass
class RenderSettings:
    """Operator-level overrides between the story and the preset (None = not set)."""

    seed: int | None = None
    steps: int | None = None
    frames: int | None = None
    resolution: tuple[int, int] | None = None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_output(out_dir: str | os.PathLike) -> None:
    """Refuse, before any work, a folder that is neither new, empty, nor an earlier render."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise FileExistsError(f"--out {out}: folder is not empty and holds no storyfarm manifest; choose an empty folder")


def prepare_output(out_dir: Path) -> None:
    """Make `out_dir` ready: new or empty, or an earlier storyfarm render (its files are replaced)."""
    check_output(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in OWNED:
        p = out_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    (out_dir / "shots").mkdir()
    (out_dir / "keyframes").mkdir()


class StoryRenderer:
    def __init__(self, engine: Engine, settings: RenderSettings | None = None):
        self.engine = engine
        self.preset = engine.preset
        self.settings = settings or RenderSettings()
        k = self.preset.keyframes
        self.selector = KeyframeSelector(
            engine.components.embedder,
            engine.components.gate,
            threshold=k.threshold,
            max_keyframes=k.max_per_shot,
            step=k.step,
            dedupe_threshold=k.dedupe_threshold,
            max_candidates=k.candidates,
        )

    def _add_references(self, bank: MemoryBank, paths, field: str) -> None:
        """Reference images join the memory with their CLIP embeddings, so shot keyframes that
        merely repeat a reference are de-duplicated against it."""
        images = [load_reference_image(p, f"{field}[{i}]") for i, p in enumerate(paths)]
        embeddings = [self.selector.embedder.embed(img[None])[0] for img in images]
        bank.add_references(images, embeddings=embeddings)

    def base_seed(self, story: Story) -> int:
        if self.settings.seed is not None:
            return self.settings.seed
        return story.seed if story.seed is not None else 0

    def plan(self, story: Story, shot: ShotSpec, story_key: str, base_seed: int) -> ShotPlan:
        r, o = self.preset.render, self.settings
        width, height = shot.resolution or o.resolution or r.resolution
        guidance = shot.guidance or r.guidance
        return ShotPlan(
            story_key=story_key,
            prompt=shot.prompt,
            negative_prompt=shot.negative_prompt if shot.negative_prompt is not None else r.negative_prompt,
            seed=shot.seed if shot.seed is not None else base_seed + shot.index,
            width=width,
            height=height,
            frames=shot.frames or o.frames or r.frames,
            sampler=SamplerSettings(
                steps=shot.steps or o.steps or r.steps,
                shift=shot.shift or r.shift,
                guidance=tuple(guidance),
                boundary=r.boundary,
                solver=r.solver,
            ),
        )

    def render(
        self,
        story: Story,
        out_dir: str | os.PathLike,
        progress: Progress | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> dict:
        story = check_against_model(story, self.preset.model_limits())
        out = Path(out_dir)
        prepare_output(out)
        started = time.perf_counter()
        story_key = f"story:{out.resolve()}"
        bank = MemoryBank(out / "keyframes")
        if story.references:
            self._add_references(bank, story.references, "references")
        base_seed = self.base_seed(story)
        mem = self.preset.memory
        shots_meta: list[dict] = []
        shot_files: list[Path] = []
        middles: list[tuple[str, np.ndarray]] = []  # contact-sheet tiles, kept instead of re-decoding
        previous: np.ndarray | None = None
        if progress:
            progress.story_start(story, len(story.shots))

        def on_step(step, total, t, expert):
            if cancel is not None and cancel():
                raise Cancelled()
            if progress:
                progress.step(step, total, t, expert)

        try:
            for shot in story.shots:
                if shot.references:
                    self._add_references(bank, shot.references, f"{shot.path}.references")
                plan = self.plan(story, shot, story_key, base_seed)
                window = bank.window_ids(mem.long_term, mem.max_size)
                plan.memory = list(zip(window, bank.images(window)))
                transition = None
                if not shot.cut and previous is not None:
                    transition = shot.transition or self.preset.render.continuation
                    count = 1 if transition == "first_frame" else self.preset.render.motion_frames
                    plan.known_frames = previous[-count:]
                plan.use_t2v = shot.index == 0 and self.preset.render.first_shot == "t2v"
                if progress:
                    progress.shot_start(shot, plan)
                result = self.engine.render_shot(plan, on_step=on_step)
                seconds = dict(result.seconds)
                name = f"{shot.index + 1:03d}_scene{shot.scene:02d}_shot{shot.shot:02d}.mp4"
                path = out / "shots" / name
                t0 = time.perf_counter()
                video.write_mp4(path, result.frames, self.preset.render.fps)
                seconds["mp4_encode"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                picked = self.selector.select(result.frames, bank.embeddings())
                new = bank.add_shot_keyframes(shot.index, [(i, result.frames[i], emb) for i, emb in picked])
                seconds["keyframes"] = time.perf_counter() - t0
                entry = {
                    "index": shot.index,
                    "scene": shot.scene,
                    "shot": shot.shot,
                    "prompt": shot.prompt,
                    "first_frame_prompt": shot.first_frame_prompt,
                    "seed": plan.seed,
                    "cut": shot.cut,
                    "transition": transition,
                    "model": result.model,
                    "file": f"shots/{name}",
                    "sha256": video.sha256_file(path),
                    "frames": int(result.frames.shape[0]),
                    "width": plan.width,
                    "height": plan.height,
                    "fps": self.preset.render.fps,
                    "steps": plan.sampler.steps,
                    "guidance": list(plan.sampler.guidance),
                    "shift": plan.sampler.shift,
                    "memory_keyframes": result.memory_ids,
                    "rope_time_positions": result.time_positions,
                    "new_keyframes": [k.id for k in new],
                    "seconds": {k: round(v, 4) for k, v in seconds.items()},
                }
                shots_meta.append(entry)
                shot_files.append(path)
                middles.append((f"shot {shot.index + 1} (scene {shot.scene}.{shot.shot})", result.frames[len(result.frames) // 2]))
                previous = result.frames
                if progress:
                    progress.shot_done(shot, entry)
        finally:
            self.engine.pool.release(story_key)

        video.concat_mp4(out / "story.mp4", shot_files, self.preset.render.fps)
        keyframe_tiles = list(zip([k.id for k in bank.keyframes], bank.images([k.id for k in bank.keyframes])))
        video.contact_sheet(middles + keyframe_tiles, out / "contact_sheet.png")
        manifest = {
            "version": MANIFEST_VERSION,
            "story": {"name": story.name, "source": story.source, "format": story.format, "warnings": list(story.warnings)},
            "preset": self.preset.name,
            "seed": base_seed,
            "story_file": "story.mp4",
            "story_sha256": video.sha256_file(out / "story.mp4"),
            "contact_sheet": "contact_sheet.png",
            "keyframes": [
                {"id": k.id, "source": k.source, "shot_index": k.shot_index, "frame_index": k.frame_index, "file": f"keyframes/{Path(k.image_path).name}"}
                for k in bank.keyframes
            ],
            "shots": shots_meta,
            "latent_pool": self.engine.pool.stats.as_dict(),
            "seconds_total": round(time.perf_counter() - started, 3),
        }
        _write_json(out / "manifest.json", manifest)
        return manifest
