"""Checking a SubmitStory request before anything is written.

A submit is accepted only when the whole story would render: the story text parses (StoryMem
JSON or storyfarm YAML/JSON, or the structured StorySpec), every reference image is a real image
within the limits, every shot fits the preset's model and the per-shot work budget. All problems
are reported at once, each with its field path. Reference images are stored content-addressed
under <data_dir>/references/<payload sha256>/ before the story is committed, so a crash between
the two leaves only an unused folder, never a story without its references.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import grpc
import yaml

from storyfarm.daemon.config import LimitsConfig
from storyfarm.daemon.errors import RpcError, invalid
from storyfarm.daemon.store_records import ShotIn
from storyfarm.story.fields import MAX_NAME_CHARS, FieldErrors, read_text
from storyfarm.story.files import atomic_output
from storyfarm.story.presets import Preset
from storyfarm.story.references import REFERENCE_NAME, ReferenceImageError, open_reference_image
from storyfarm.story.format import Story, StoryValidationError, check_against_model, parse_story
from storyfarm.v1 import render_pb2 as pb



@dataclass(frozen=True)
class CheckedSubmit:
    story: Story
    document: str  # stored as is; the worker parses it again with base_dir = references_dir
    payload_sha256: str
    references: dict[str, bytes]
    shots: list[ShotIn]


def _spec_document(spec: pb.StorySpec) -> str:
    """The structured form as a native storyfarm story (one parser for every form)."""

    def settings(s: pb.RenderSettings, out: dict) -> dict:
        if s.HasField("negative_prompt"):
            out["negative_prompt"] = s.negative_prompt
        if s.WhichOneof("length") == "frames":
            out["frames"] = s.frames
        elif s.WhichOneof("length") == "duration":
            out["duration"] = s.duration.ToNanoseconds() / 1e9
        if s.HasField("resolution"):
            out["resolution"] = [s.resolution.width, s.resolution.height]
        if s.HasField("steps"):
            out["steps"] = s.steps
        if s.HasField("guidance"):
            out["guidance"] = [s.guidance.high_noise, s.guidance.low_noise]
        if s.HasField("shift"):
            out["shift"] = s.shift
        return out

    doc: dict = settings(spec.defaults, {"name": spec.name or "story", "overview": spec.overview})
    if spec.HasField("seed"):
        doc["seed"] = spec.seed
    if spec.references:
        doc["references"] = list(spec.references)
    shots = []
    for s in spec.shots:
        shot = settings(s.settings, {"prompt": s.prompt})
        if s.first_frame_prompt:
            shot["first_frame_prompt"] = s.first_frame_prompt
        if s.HasField("cut"):
            shot["cut"] = s.cut
        if s.transition:
            names = {pb.TRANSITION_FIRST_FRAME: "first_frame", pb.TRANSITION_MOTION_FRAMES: "motion_frames"}
            shot["transition"] = names.get(s.transition, s.transition)  # an unknown number: the parser names the field
        if s.HasField("seed"):
            shot["seed"] = s.seed
        if s.references:
            shot["references"] = list(s.references)
        shots.append(shot)
    doc["shots"] = shots
    return json.dumps(doc, ensure_ascii=False)


def _references(request: pb.SubmitStoryRequest, limits: LimitsConfig, folder: Path) -> dict[str, bytes]:
    if len(request.reference_images) > limits.max_references:
        raise invalid(f"{len(request.reference_images)} reference images; at most {limits.max_references}",
                      "INVALID_REFERENCE_IMAGE", [("reference_images", f"at most {limits.max_references} images")])
    refs, problems = {}, []
    for i, ref in enumerate(request.reference_images):
        field = f"reference_images[{i}]"
        if not REFERENCE_NAME.fullmatch(ref.name) or ref.name in refs:
            problems.append((f"{field}.name", f"{ref.name!r}: a unique name of letters, digits, '.', '_', '-' (no paths)"))
            continue
        if len(ref.data) > limits.max_reference_bytes:
            problems.append((f"{field}.data", f"{len(ref.data)} bytes; at most {limits.max_reference_bytes}"))
            continue
        (folder / ref.name).write_bytes(ref.data)
        try:
            open_reference_image(folder / ref.name, field, max_pixels=limits.max_reference_pixels,
                                 max_bytes=limits.max_reference_bytes)
        except (ReferenceImageError, SyntaxError) as exc:  # Pillow reports some broken PNG chunks as SyntaxError
            problems.append((f"{field}.data", str(exc).split(": ", 1)[-1]))
            continue
        refs[ref.name] = ref.data
    if problems:
        raise invalid("reference images refused", "INVALID_REFERENCE_IMAGE", problems)
    return refs


def _name_storymem_references(document: str, fmt: str, names: list[str]) -> str:
    """StoryMem's format has no references key: its images, in request order, are its initial memory.
    The stored document names them (storyfarm's `references` addition), so workers read them alike."""
    parsed = json.loads(document) if fmt == "json" else yaml.safe_load(document)
    return json.dumps({**parsed, "references": names}, ensure_ascii=False)


def _host_paths(story: Story, folder: str, form: str) -> list[tuple[str, str]]:
    """Over the API a story names its uploaded images, never a file of the daemon's host: a path
    (absolute, or climbing out with '..') would be read by the worker and leak through the video."""
    lists = [("references", story.references)] + [(f"{s.path}.references", s.references) for s in story.shots]
    return [(f"{form}.{where}[{i}]", "the name of one of reference_images, not a path")
            for where, paths in lists for i, path in enumerate(paths)
            if os.path.dirname(os.path.abspath(path)) != os.path.abspath(folder)]


def _default_name(request: pb.SubmitStoryRequest) -> str:
    """The name of a story whose text has none: the file's stem the client sent (never the API
    field the text came in), checked like a name written in a story."""
    if not request.default_name:
        return ""
    errors = FieldErrors()
    name = read_text(request.default_name, "default_name", errors, limit=MAX_NAME_CHARS, one_line=True)
    if errors:
        raise invalid("bad default_name", fields=[(e.path, e.message) for e in errors.items])
    return name


def check_submit(request: pb.SubmitStoryRequest, preset: Preset, limits: LimitsConfig) -> CheckedSubmit:
    default_name = _default_name(request)
    form = request.WhichOneof("story")
    if form is None:
        raise invalid("no story given", fields=[("story", "set story_json, story_yaml or story_spec")])
    document = _spec_document(request.story_spec) if form == "story_spec" else getattr(request, form)
    if len(document.encode("utf-8")) > limits.max_story_bytes:
        raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "story too large", "INVALID_STORY",
                       fields=[(form, f"at most {limits.max_story_bytes} bytes")])
    with tempfile.TemporaryDirectory(prefix="storyfarm-submit-") as tmp:
        refs = _references(request, limits, Path(tmp))
        fmt = "yaml" if form == "story_yaml" else "json"
        try:
            story = parse_story(document, source=form, base_dir=tmp, fmt=fmt, name=default_name)
            if story.format == "storymem" and refs and not story.references:
                document, fmt = _name_storymem_references(document, fmt, list(refs)), "json"
                story = parse_story(document, source=form, base_dir=tmp, fmt=fmt, name=default_name)
            story = check_against_model(story, preset.model_limits())
        except StoryValidationError as exc:
            raise invalid(f"story refused ({len(exc.errors)} problem(s))",
                          fields=[(f"{form}.{e.path}" if e.path else form, e.message) for e in exc.errors]) from None
        if outside := _host_paths(story, tmp, form):
            raise invalid("story references files outside its reference_images", "INVALID_REFERENCE_IMAGE", outside)
    if len(story.shots) > limits.max_shots:
        raise invalid("too many shots", fields=[(f"{form}.shots", f"{len(story.shots)} shots; at most {limits.max_shots}")])
    render, over = preset.render, []
    shots = []
    for shot in story.shots:
        width, height = shot.resolution or render.resolution
        frames, steps = shot.frames or render.frames, shot.steps or render.steps
        if not limits.admits_work(width, height, frames, steps):
            over.append((f"{form}.{shot.path}", f"{width}x{height} x {frames} frames x {steps} steps exceeds the per-shot budget {limits.max_work}"))
        if len(shot.prompt) > limits.max_prompt_chars:
            over.append((f"{form}.{shot.path}.prompt", f"{len(shot.prompt)} characters; at most {limits.max_prompt_chars}"))
        shots.append(ShotIn(index=shot.index, scene=shot.scene, shot=shot.shot, prompt=shot.prompt,
                            settings=json.dumps(shot.overrides(), default=list)))
    if over:
        raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "story exceeds the render budget", "RENDER_BUDGET_EXCEEDED", fields=over)
    digest = hashlib.sha256()
    digest.update(form.encode() + b"\0" + document.encode("utf-8") + b"\0" + (request.preset or "").encode())
    if default_name:  # only when sent: the identity of requests without one stays what it was
        digest.update(b"\0name\0" + default_name.encode("utf-8"))
    for name in sorted(refs):
        digest.update(b"\0" + name.encode() + b"\0" + hashlib.sha256(refs[name]).digest())
    return CheckedSubmit(story, document, digest.hexdigest(), refs, shots)


def store_references(checked: CheckedSubmit, data_dir: Path) -> Path:
    """Write the references where the workers read them (idempotent per payload)."""
    folder = data_dir / "references" / checked.payload_sha256
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in checked.references.items():
        if not (folder / name).is_file():
            with atomic_output(folder / name) as tmp:
                tmp.write_bytes(data)
    return folder
