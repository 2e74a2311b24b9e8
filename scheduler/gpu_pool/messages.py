"""What the daemon and its render workers say to each other (picklable, no torch).

The daemon hands a worker one ShotTask at a time; the worker answers with Ready once its models
are loaded, StageUpdate once per render stage (lifecycle.RENDER_STAGES, in order) and per denoising
step, and exactly one Done or Failed per
task. Messages carry the attempt id so a late message from a replaced worker can be recognised
and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ShotTask:
    attempt_id: str
    story_id: str
    shot_id: str
    shot_index: int
    story_document: str  # the story file as submitted (StoryMem JSON or storyfarm YAML/JSON)
    story_dir: str  # the story's folder under the data dir: clips, keyframes/ (its memory)
    references_dir: str  # where the story's reference images are (its file names them relative to it)
    finish_story: bool = False  # the last shot: also assemble story.mp4, contact sheet, manifest
    entries: tuple = ()  # manifest entries of the shots before, for the story assembly
    edit: dict | None = None  # a re-render: {"prompt": ..., "strength": ...} overriding the story's shot
    low_memory: bool = False  # retry after an out-of-memory: VAE tiling, offload
    story_name: str = ""  # the store's name of the story (its file's stem when its text names none)


@dataclass(frozen=True)
class Ready:
    worker_id: str
    device: str
    preset: str
    load_seconds: float
    attention_backend: str = ""  # the backend that ran in the warm-up forwards


@dataclass(frozen=True)
class StageUpdate:
    worker_id: str
    attempt_id: str
    shot_index: int
    stage: str  # one of storyfarm.story.lifecycle.RENDER_STAGES
    step: int = 0
    total: int = 0


@dataclass(frozen=True)
class Done:
    worker_id: str
    attempt_id: str
    entry: dict  # the shot's manifest entry
    files: tuple[str, ...] = ()  # published files, relative to the story dir
    manifest: dict | None = None  # set when the task finished the story
    seconds: float = 0.0
    resident_stories: int = 0  # stories whose memory latents the worker's latent pool holds
    # Measurements for metrics, all optional: "stages" {stage: seconds} (lifecycle.SHOT_STAGES: text_encode, memory_encode,
    # denoise, vae_decode, keyframes, mp4_encode), "step_seconds" [per denoising step], "frames",
    # "video_seconds", "pool" {resident_bytes, stories, queries, hits, misses, evictions},
    # "gpu_memory_bytes", "attention_backend", "recompiles".
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Failed:
    worker_id: str
    attempt_id: str | None  # None: the worker failed to start
    error: str
    cancelled: bool = False
    retryable: bool = True
    fatal: bool = False  # the worker must be replaced (CUDA errors, failed start)
    details: dict = field(default_factory=dict)
    reason: str = "content"  # content | out_of_memory | cuda_error | cancelled | start_failed
    stage: str = ""  # the stage it failed in (out-of-memory by stage)


@dataclass(frozen=True)
class Release:
    """Daemon -> worker: a story ended (finished, failed, cancelled): drop its memory latents."""

    story_dir: str
