"""The story driver: a story's shots in order, each conditioned on the story's memory so far.

Per shot: merge its settings (shot > story > operator > preset), take the memory window (the first
`long_term` keyframes of the story plus the most recent, `max_size` in all), add the previous
shot's last frame(s) for a continuation (MI2V / MM2V), render, publish the mp4 atomically, pick new
keyframes into the memory bank, and record everything in manifest.json. Fixes over the official
StoryMem pipeline: seeds derive from the shot's index in the whole story (never repeat per scene),
an empty memory is a valid state, the story video is assembled from an explicit list of this run's
shot files (never a glob), and models (reward model included) load once per story, not per shot.

Render modes (m2v.shot_modes): a shot longer than the preset's native length is rendered by
FIFO-Diffusion and streamed to its mp4 (never held whole); a story with `csa` renders with
Consistent Self-Attention; a re-render may carry an edit (prompt, strength, seed) and sees the memory
snapshot of its shot, replacing only its own keyframes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from safetensors.torch import load_file, save_file

from storyfarm.m2v import video
from storyfarm.m2v.render.engine import Engine, ShotPlan
from storyfarm.m2v.render.folder import earlier_render, prepare_output, record_shots, render_identity
from storyfarm.m2v.render.observe import RenderObserver, ShotFeed
from storyfarm.story.files import atomic_output, sha256_file, write_json
from storyfarm.m2v.memory.keyframes import KeyframeSelector
from storyfarm.m2v.memory.bank import MemoryBank
from storyfarm.m2v.render.sampler import SamplerSettings
from storyfarm.m2v.render.shot_modes import csa_for_shot, edit_start, fifo_settings, render_frames
from storyfarm.story.format import ShotSpec, Story, check_against_model
from storyfarm.story.modes import ShotEdit, read_edit
from storyfarm.story.numbering import shot_label

MANIFEST_VERSION = 1


@dataclass
class RenderSettings:
    """Operator-level overrides between the story and the preset (None = not set)."""

    seed: int | None = None
    steps: int | None = None
    frames: int | None = None
    resolution: tuple[int, int] | None = None


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
        )

    def _add_references(self, bank: MemoryBank, paths, labels, field: str, for_shot: int | None) -> None:
        """Reference images join the memory with their CLIP embeddings, so shot keyframes that
        merely repeat a reference are de-duplicated against it."""
        images = [video.load_reference_image(p, f"{field}[{i}]") for i, p in enumerate(paths)]
        embeddings = [self.selector.embedder.embed(img[None])[0] for img in images]
        bank.add_references(images, embeddings=embeddings, for_shot=for_shot, labels=list(labels) or None)

    def _join_references(self, bank: MemoryBank, story: Story, shot: ShotSpec) -> None:
        """The story's references before its first shot, a shot's own just before it: once each
        (a retried or re-rendered shot finds them already in the memory)."""
        have = {k.shot_index for k in bank.keyframes if k.source == "reference"}
        if shot.index == 0 and story.references and None not in have:
            self._add_references(bank, story.references, story.reference_labels, "references", None)
        if shot.references and shot.index not in have:
            self._add_references(bank, shot.references, shot.reference_labels, f"{shot.path}.references", shot.index)

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
            seed=story.shot_seed(shot, base_seed),
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

    def _continuation_frames(self, story: Story, shot: ShotSpec, out: Path) -> tuple[str | None, np.ndarray | None]:
        """MI2V / MM2V: the last frame(s) of the previous shot as published (as the official
        pipeline reads them from the saved clip), so a shot renders the same in any process."""
        if shot.cut or shot.index == 0:
            return None, None
        transition = shot.transition or self.preset.render.continuation
        count = 1 if transition == "first_frame" else self.preset.render.motion_frames
        previous = out / story.shots[shot.index - 1].clip_file
        if not previous.is_file():
            raise FileNotFoundError(f"{shot.path}: continues {shot_label(shot.index - 1)} but {previous} is missing")
        return transition, video.read_last_frames(previous, count)

    def render_shot(self, story: Story, shot: ShotSpec, out_dir: str | os.PathLike,
                    observer: RenderObserver | None = None, edit: ShotEdit | dict | None = None,
                    cancel: Callable[[], bool] | None = None) -> dict:
        """Render one shot into a story folder and return its manifest entry.

        Needs only the folder: the memory bank on disk (the shot sees its snapshot, the memory as
        it stood before it, so a retried or re-rendered shot sees exactly the memory it saw the
        first time) and, for a continuation, the previous shot's clip. Safe to call in a fresh
        process for any shot whose predecessors are published. `edit` (a re-render) changes the
        prompt, seed, or starts from the previous take with a strength below 1. `observer` hears
        every stage once, in order, and every denoising step; `cancel` is checked at each of them.
        """
        feed = ShotFeed(observer, cancel)
        out = Path(out_dir)
        edit = read_edit(edit)
        if edit is not None:
            shot = replace(shot, prompt=edit.prompt or shot.prompt, seed=shot.seed if edit.seed is None else edit.seed)
        bank = MemoryBank.open(out / "keyframes")
        self._join_references(bank, story, shot)
        plan = self.plan(story, shot, f"story:{out.resolve()}", self.base_seed(story))
        mem, csa_options = self.preset.memory, story.csa
        use_memory = csa_options is None or csa_options.memory
        window = bank.window_ids(mem.long_term, mem.max_size, shot_index=shot.index) if use_memory else []
        plan.memory = list(zip(window, bank.images(window)))
        transition, plan.known_frames = self._continuation_frames(story, shot, out)
        plan.use_t2v = (shot.index == 0 and self.preset.render.first_shot == "t2v") or (not use_memory and shot.cut)
        fifo = fifo_settings(shot, plan, self.engine)
        if edit is not None and edit.strength is not None:
            plan.start_step, plan.init_frames = edit_start(edit.strength, plan, out / shot.clip_file)
        latent_file = out / "keyframes" / f"latents-{self.preset.name}-{plan.width}x{plan.height}.safetensors"
        persisted = load_file(str(latent_file)) if latent_file.is_file() else {}
        self.engine.import_memory_latents(plan, persisted)
        feed.observer.shot_start(shot, plan)
        name = shot.clip_file
        # A continuation's leading frames re-create the previous shot's last frame(s) it was
        # conditioned on; as in StoryMem, they are dropped so joins neither repeat nor stutter
        # (and keyframe selection cannot pick a copy of the previous shot).
        repeated = 0 if plan.known_frames is None else len(plan.known_frames)
        scan = self.selector.scan()  # sees every published frame (a FIFO shot's as it streams)
        with csa_for_shot(self.engine, story, shot, plan, out, fifo) as (csa, step_hook):
            rendered = render_frames(self.engine, plan, fifo, out / name, repeated, scan, feed, step_hook(feed.step))
        fresh = {k: v for k, v in self.engine.export_memory_latents(plan).items() if k not in persisted}
        if fresh:  # the story's memory keeps its latents too: a restarted worker does not re-encode
            with atomic_output(latent_file) as tmp:
                save_file({**persisted, **fresh}, str(tmp))
        seconds = dict(rendered.seconds)
        feed.enter("keyframes")
        picked = scan.finish(bank.embeddings(bank.before(shot.index)))
        t0 = time.perf_counter()
        # frame indices in the manifest and keyframe ids count frames of the published clip
        new = bank.add_shot_keyframes(shot.index, picked)
        seconds["keyframes"] = scan.seconds + time.perf_counter() - t0  # a FIFO shot's scan ran as it streamed
        entry = {
            "index": shot.index,
            "scene": shot.scene,
            "shot": shot.shot,
            "prompt": shot.prompt,
            "first_frame_prompt": shot.first_frame_prompt,
            "seed": plan.seed,
            "cut": shot.cut,
            "transition": transition,
            "model": rendered.model,
            "mode": "fifo" if fifo else "m2v",
            "file": name,
            "sha256": sha256_file(out / name),
            "frames": rendered.published,
            "rendered_frames": rendered.published + repeated,
            "width": plan.width,
            "height": plan.height,
            "fps": self.preset.render.fps,
            "steps": plan.sampler.steps,
            "guidance": list(plan.sampler.guidance),
            "shift": plan.sampler.shift,
            "memory_keyframes": rendered.memory_ids,
            "rope_time_positions": rendered.time_positions,
            "new_keyframes": [k.id for k in new],
            "seconds": {k: round(v, 4) for k, v in seconds.items()},
        }
        if fifo:
            entry["fifo"] = rendered.stats
        if csa is not None:
            entry["csa"] = csa.report()
        if edit is not None:
            entry["edit"] = {**edit.as_dict(), "start_step": plan.start_step}
        return entry

    def finish(self, story: Story, out_dir: str | os.PathLike, entries: list[dict], seconds_total: float | None = None) -> dict:
        """Assemble the story video (from the explicit list of shot files), the contact sheet and
        manifest.json once every shot is published; returns the manifest."""
        out = Path(out_dir)
        bank = MemoryBank.load(out / "keyframes")
        video.concat_mp4(out / "story.mp4", [out / e["file"] for e in entries], self.preset.render.fps)
        tiles = [(shot_label(e["index"], scene=e["scene"], shot=e["shot"]), video.read_frame(out / e["file"], e["frames"] // 2))
                 for e in entries]
        ids = bank.snapshot()
        tiles += list(zip(ids, bank.images(ids)))
        video.contact_sheet(tiles, out / "contact_sheet.png")
        manifest = {
            "version": MANIFEST_VERSION,
            "story": {"name": story.name, "source": story.source, "format": story.format, "warnings": list(story.warnings)},
            "preset": self.preset.name,
            "seed": self.base_seed(story),
            "story_file": "story.mp4",
            "story_sha256": sha256_file(out / "story.mp4"),
            "contact_sheet": "contact_sheet.png",
            "keyframes": [
                {"id": k.id, "source": k.source, "shot_index": k.shot_index, "frame_index": k.frame_index,
                 "file": f"keyframes/{Path(k.image_path).name}", **({"label": k.label} if k.label else {})}
                for k in bank.keyframes
            ],
            "shots": entries,
            "latent_pool": self.engine.latent_pool.stats.as_dict(),
        }
        if seconds_total is not None:
            manifest["seconds_total"] = round(seconds_total, 3)
        write_json(out / "manifest.json", manifest)
        return manifest

    def render(
        self,
        story: Story,
        out_dir: str | os.PathLike,
        observer: RenderObserver | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> dict:
        """The whole story, shot after shot, into `out_dir` (new, empty or an earlier render); an
        interrupted render of the same story, preset and settings there is resumed after its last
        published shot (see m2v.render.folder). `observer` hears of the shots rendered now."""
        observer = observer or RenderObserver()
        story = check_against_model(story, self.preset.model_limits())
        out = Path(out_dir)
        identity = render_identity(story, self.preset, self.settings)
        entries = prepare_output(out, identity)
        started = time.perf_counter()
        observer.story_start(story, len(story.shots) - len(entries))
        try:
            for shot in story.shots[len(entries):]:
                entries.append(self.render_shot(story, shot, out, observer, cancel=cancel))
                record_shots(out, identity, entries)  # published: a resumed render starts after it
                observer.shot_done(shot, entries[-1])
        finally:
            self.engine.latent_pool.release(f"story:{out.resolve()}")
        return self.finish(story, out, entries, time.perf_counter() - started)

    def rerender(
        self,
        story: Story,
        out_dir: str | os.PathLike,
        index: int,
        edit: ShotEdit | dict | None = None,
        *,
        cascade: bool = False,
        observer: RenderObserver | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> dict:
        """A new take of shot `index` of an earlier render of `story` in `out_dir` (optionally
        edited), and of every later shot with `cascade`; then the story is assembled again. Shots not
        rendered again keep their files byte for byte. A shot keeps its earlier edits (prompt, seed)
        when a cascade renders it again."""
        story = check_against_model(story, self.preset.model_limits())
        out = Path(out_dir)
        entries = earlier_render(out, story, index)
        edit = read_edit(edit)
        observer = observer or RenderObserver()
        started = time.perf_counter()
        try:
            for i in range(index, len(story.shots) if cascade else index + 1):
                kept = {k: v for k, v in (entries[i].get("edit") or {}).items() if k in ("prompt", "seed")}
                this = {**kept, **(edit.as_dict() if i == index and edit else {})}
                shot = story.shots[i]
                entries[i] = self.render_shot(story, shot, out, observer, edit=this or None, cancel=cancel)
                observer.shot_done(shot, entries[i])
        finally:
            self.engine.latent_pool.release(f"story:{out.resolve()}")
        return self.finish(story, out, [entries[i] for i in sorted(entries)], time.perf_counter() - started)
