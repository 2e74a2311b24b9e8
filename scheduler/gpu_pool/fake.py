"""A worker that renders nothing: the daemon measured alone, and the pool tested without torch.

`FakeWorker` has the interface of worker.WorkerRuntime (load, run, release) and is what the `fake`
worker factory names (`scheduler.worker: fake` in the daemon config). It imports no torch, numpy,
PIL or av. For each ShotTask it parses the story as a real worker does, reports every stage of
story.lifecycle.RENDER_STAGES in order (denoise once per step), checks the cancel event at every
stage and step, publishes what a real worker publishes (the shot clip under the driver's name and,
for the shot that finishes the story, story.mp4, contact_sheet.png and manifest.json) as small
placeholder files through atomic_output, and returns a Done whose entry carries the clip's real
sha256. The same story gives the same bytes, so a re-run shot publishes the same clip.

Scripting, for tests and load experiments: words in a shot's prompt (or in a re-render's prompt),
plus the words of the environment variable STORYFARM_FAKE_WORKER, which apply to every shot:
- `fake:fail`  a content failure (retryable), at the first denoising step;
- `fake:oom`   an out-of-memory failure in `denoise`;
- `fake:cuda`  a CUDA error: fatal, the worker is replaced;
- `fake:die`   the worker dies after its first denoising step (the process exits, nothing is sent);
- `fake:hang`  after its first denoising step the worker sends nothing more and ignores cancel
               (a kernel that never returns: the heartbeat timeout is what ends it);
- `fake:slow=S`  every denoising step takes S seconds (cancel still checked while waiting);
- `fake:steps=N` N denoising steps (default: the shot's steps, else the preset's);
- `fake:load=S`  (in STORYFARM_FAKE_WORKER) loading takes S seconds.
A fault word may end in `*N` (`fake:oom*1`): it fires only on the first N attempts at that shot.
Attempts are counted in the story folder (`.fake/shot-<index>.attempts`, never published), so the
count survives the worker's replacement. Without `*N` a fault fires on every attempt.

In-process hosts (a test running workers as threads) build it with `in_process=True`: dying then
raises WorkerDied instead of exiting the process, and a hang ends when the host calls `kill()`.
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
import time
import zlib
from pathlib import Path

from storyfarm.scheduler.gpu_pool.messages import Done, Failed, Ready, ShotTask, StageUpdate
from storyfarm.story.fields import StoryValidationError
from storyfarm.story.files import atomic_output, sha256_file, write_json
from storyfarm.story.format import parse_story
from storyfarm.story.lifecycle import RENDER_STAGES, SHOT_STAGES
from storyfarm.story.presets import load_preset

SCRIPT_ENV = "STORYFARM_FAKE_WORKER"
FAULTS = ("fail", "oom", "cuda", "die", "hang")
_WORD = re.compile(r"fake:(fail|oom|cuda|die|hang|slow|steps|load)(?:=([0-9.]+))?(?:\*([0-9]+))?(?![\w.])")


class WorkerDied(BaseException):
    """In-process stand-in for the process dying: the host's thread ends without a reply."""


class _Cancelled(Exception):
    pass


def script(*texts: str) -> dict:
    """The rules in `texts`: {"faults": {kind: times or None}, "slow": s, "steps": n, "load": s}."""
    rules: dict = {"faults": {}}
    for kind, value, times in _WORD.findall(" ".join(texts)):
        if kind in FAULTS:
            rules["faults"].setdefault(kind, int(times) if times else None)
        elif value:
            rules[kind] = float(value) if kind != "steps" else max(1, int(float(value)))
    return rules


def _png(gray: int = 128) -> bytes:
    """A valid 1x1 grey PNG, made without PIL."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes([0, gray]))) + chunk(b"IEND", b"")


class FakeWorker:
    """Loads nothing and renders nothing; see the module docstring for what it does instead."""

    def __init__(self, worker_id: str, preset_name: str, device: str, send, *, threads: int | None = None,
                 expert_placement: str = "both", extra_devices: tuple[str, ...] = (), in_process: bool = False):
        self.worker_id, self.preset_name, self.device, self.send = worker_id, preset_name, device, send
        self.in_process = in_process
        self.killed = threading.Event()  # in-process hosts only: the host "killed" this worker
        self.stories: set[str] = set()  # story folders whose memory it "holds"
        self.preset = None
        self.stage = ""

    def load(self) -> Ready:
        started = time.perf_counter()
        self.preset = load_preset(self.preset_name)  # an unknown preset fails to start, as a real worker would
        delay = script(os.environ.get(SCRIPT_ENV, "")).get("load", 0.0)
        if delay:
            time.sleep(delay)
        return Ready(self.worker_id, self.device, self.preset.name, time.perf_counter() - started, "fake")

    def kill(self) -> None:
        self.killed.set()

    def release(self, story_dir: str) -> None:
        self.stories.discard(str(Path(story_dir).resolve()))

    def run(self, task: ShotTask, cancel) -> Done | Failed:
        """Fake-render one task; never raises (WorkerDied, in-process only, stands for a death)."""
        self.stage = "load"
        try:
            return self._render(task, cancel)
        except _Cancelled:
            return Failed(self.worker_id, task.attempt_id, "cancelled", cancelled=True, retryable=False,
                          reason="cancelled", stage=self.stage)
        except StoryValidationError as exc:
            return Failed(self.worker_id, task.attempt_id, f"StoryValidationError: {exc}", retryable=False,
                          reason="story", stage=self.stage)
        except Exception as exc:  # noqa: BLE001 - a failed shot must be reported, not lost
            return Failed(self.worker_id, task.attempt_id, f"{type(exc).__name__}: {exc}", stage=self.stage,
                          details={"pid": os.getpid(), "fake": True})

    # -- one shot ------------------------------------------------------------------------------
    def _render(self, task: ShotTask, cancel) -> Done | Failed:
        started = time.perf_counter()
        story = parse_story(task.story_document, source=f"story {task.story_id}", base_dir=task.references_dir,
                            name=task.story_name)
        shot = story.shots[task.shot_index]
        prompt = (task.edit or {}).get("prompt") or shot.prompt
        seed = (task.edit or {}).get("seed")
        seed = story.shot_seed(shot) if seed is None else seed  # a re-render's seed, as the driver takes it
        rules = script(os.environ.get(SCRIPT_ENV, ""), prompt)
        attempt = self._count_attempt(task)
        fault = next((kind for kind, times in rules["faults"].items() if times is None or attempt <= times), None)
        render = self.preset.render
        width, height = shot.resolution or render.resolution
        frames, steps = shot.frames or render.frames, rules.get("steps") or shot.steps or render.steps
        out = Path(task.story_dir)
        name = shot.clip_file
        seconds: dict[str, float] = {}
        step_seconds: list[float] = []
        for stage in SHOT_STAGES:
            t0 = time.perf_counter()
            self._report(task, cancel, stage, 0, steps if stage == "denoise" else 0)
            if stage == "denoise":
                failed = self._denoise(task, cancel, steps, rules.get("slow", 0.0), fault, step_seconds)
                if failed is not None:
                    return failed
            elif stage == "mp4_encode":
                clip = {"story": story.name, "index": shot.index, "prompt": prompt, "seed": seed,
                        "frames": frames, "size": [width, height], "steps": steps}
                with atomic_output(out / name) as tmp:
                    tmp.write_bytes(b"storyfarm fake clip\n" + json.dumps(clip, sort_keys=True).encode())
            seconds[stage] = round(time.perf_counter() - t0, 4)
        # one keyframe per earlier shot, the latest that fit the preset's memory window
        window = self.preset.memory.max_size
        memory = [f"fake-{j:03d}" for j in range(max(0, shot.index - window), shot.index)]
        entry = {"index": shot.index, "scene": shot.scene, "shot": shot.shot, "prompt": prompt, "seed": seed,
                 "cut": shot.cut, "model": "fake", "mode": "fake", "file": name, "sha256": sha256_file(out / name),
                 "frames": frames, "rendered_frames": frames, "width": width, "height": height, "fps": render.fps,
                 "steps": steps, "memory_keyframes": memory, "new_keyframes": [f"fake-{shot.index:03d}"],
                 "seconds": seconds}
        files, manifest = [name], None
        self.stories.add(str(out.resolve()))
        if task.finish_story:
            self._report(task, cancel, RENDER_STAGES[-1])
            manifest = self._assemble(story, out, sorted([*task.entries, entry], key=lambda e: e["index"]))
            files += ["story.mp4", "contact_sheet.png", "manifest.json"]
            self.release(task.story_dir)  # the story ended: free its "memory"
        took = time.perf_counter() - started
        stats = {"stages": dict(seconds), "step_seconds": step_seconds, "frames": frames,
                 "video_seconds": frames / render.fps if render.fps else 0.0, "memory_frames": len(memory)}
        return Done(self.worker_id, task.attempt_id, entry, tuple(files), manifest, took, len(self.stories), stats)

    def _denoise(self, task: ShotTask, cancel, steps: int, slow: float, fault: str | None,
                 step_seconds: list[float]) -> Failed | None:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            self._check(cancel)
            if fault == "fail":
                raise ValueError("fake content failure (fake:fail)")
            if fault == "oom":
                return Failed(self.worker_id, task.attempt_id, "OutOfMemoryError: CUDA out of memory (fake:oom)",
                              reason="out_of_memory", stage="denoise", details={"fake": True})
            if fault == "cuda":
                return Failed(self.worker_id, task.attempt_id, "RuntimeError: CUDA error: an illegal memory access "
                              "was encountered (fake:cuda)", fatal=True, reason="cuda_error", stage="denoise")
            if slow and cancel.wait(slow):
                self._check(cancel)
            step_seconds.append(round(time.perf_counter() - t0, 6))
            self._report(task, cancel, "denoise", step, steps)
            if fault == "die":
                self._die()
            if fault == "hang":
                self._hang()
        return None

    def _assemble(self, story, out: Path, entries: list[dict]) -> dict:
        with atomic_output(out / "story.mp4") as tmp:
            with open(tmp, "wb") as fh:
                for e in entries:
                    clip = out / e["file"]
                    if clip.is_file():
                        fh.write(clip.read_bytes())
        with atomic_output(out / "contact_sheet.png") as tmp:
            tmp.write_bytes(_png())
        manifest = {"version": 1, "fake": True,
                    "story": {"name": story.name, "source": story.source, "format": story.format,
                              "warnings": list(story.warnings)},
                    "preset": self.preset.name, "seed": story.seed, "story_file": "story.mp4",
                    "story_sha256": sha256_file(out / "story.mp4"), "contact_sheet": "contact_sheet.png",
                    "keyframes": [], "shots": entries}
        write_json(out / "manifest.json", manifest)
        return manifest

    # -- reporting, cancel and the scripted ways to end ------------------------------------------
    def _report(self, task: ShotTask, cancel, stage: str, step: int = 0, total: int = 0) -> None:
        self._check(cancel)
        self.stage = stage
        self.send(StageUpdate(self.worker_id, task.attempt_id, task.shot_index, stage, step, total))

    def _check(self, cancel) -> None:
        if self.killed.is_set():
            raise WorkerDied(self.worker_id)
        if cancel.is_set():
            raise _Cancelled()

    def _count_attempt(self, task: ShotTask) -> int:
        """This attempt's number at the shot (1 for the first), counted in the story folder."""
        path = Path(task.story_dir) / ".fake" / f"shot-{task.shot_index}.attempts"
        try:
            count = int(path.read_text()) + 1
        except (OSError, ValueError):
            count = 1
        with atomic_output(path) as tmp:
            tmp.write_text(str(count))
        return count

    def _die(self) -> None:
        if self.in_process:
            raise WorkerDied(self.worker_id)
        os._exit(70)

    def _hang(self) -> None:
        """Send nothing, ignore cancel; end only with the host (killed, or the daemon gone)."""
        parent = os.getppid()
        while not self.killed.wait(0.2):
            if not self.in_process and os.getppid() != parent:
                os._exit(0)
        raise WorkerDied(self.worker_id)
