"""Hostile and broken input over the real API: each refused with a clear error, nothing written.

A catalogue, by category, of what a careless or malicious client can send: path traversal in
every name that could reach the file system (reference images, story references, artifact names,
story and batch ids), messages and stories over the limits, shots over the render budget,
malformed images and decompression bombs, and text with control or bidirectional-override
characters. Every case is sent to the shared production-profile daemon and must come back with
the documented status code, the ErrorInfo reason, and a field violation naming the field (where
the field is the problem), while the store gains no story and no event and the data dir no file.
Planted symlinks are checked separately: they must never be followed when serving a download.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
import pytest
from grpc_status import rpc_status

from helpers import images
from helpers.daemon_proc import violations
from storyfarm.v1 import render_pb2 as pb

from farm_profile import LIMITS, bearer

INVALID, EXHAUSTED, NOT_FOUND = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 grpc.StatusCode.NOT_FOUND)
SMALL = {"resolution": "64x32", "frames": 5, "steps": 2}
GOOD_PNG = images.png(64, 64)


def story(*prompts: str, **extra) -> str:
    return json.dumps({**SMALL, **extra, "shots": [{"prompt": p} for p in prompts or ("a lighthouse at dusk",)]})


def submit(text: str | None = None, *, fmt: str = "story_json", images_=(), **fields) -> pb.SubmitStoryRequest:
    request = pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, **fields)
    if fmt == "story_spec":
        request.story_spec.CopyFrom(text)
    else:
        setattr(request, fmt, story() if text is None else text)
    request.reference_images.extend(pb.ReferenceImage(name=n, data=d) for n, d in images_)
    return request


def with_image(data: bytes, name: str = "ref.png") -> pb.SubmitStoryRequest:
    return submit(json.dumps({**SMALL, "references": [name], "shots": [{"prompt": "the keeper"}]}), images_=[(name, data)])


def spec(*prompts: str, **defaults) -> pb.StorySpec:
    s = pb.StorySpec(name="spec", shots=[pb.ShotSpec(prompt=p) for p in prompts])
    s.defaults.resolution.width, s.defaults.resolution.height = defaults.get("size", (64, 32))
    s.defaults.frames, s.defaults.steps = defaults.get("frames", 5), defaults.get("steps", 2)
    return s


@dataclass(frozen=True)
class Bad:
    category: str
    name: str
    rpc: str
    request: Callable[[dict], object]  # built from the context (a real story id, a host image path)
    code: grpc.StatusCode
    field: str | None = None  # a field violation that must be present (exact path, or its prefix)
    reason: str | None = "INVALID_STORY"  # None: refused by gRPC itself, no storyfarm details


def over(n: int, prompts: int = 1) -> str:
    return story(*["p"] * prompts) + " " * n


CASES = [
    # -- names that could reach the file system --------------------------------------------------
    *[Bad("names", f"reference image name {name!r}", "SubmitStory", lambda c, n=name: with_image(GOOD_PNG, n), INVALID,
          "reference_images[0].name", "INVALID_REFERENCE_IMAGE")
      for name in ("../evil.png", "/etc/passwd", "sub/dir.png", ".hidden.png", "..\\evil.png", "\uff0e\uff0e\uff0fevil.png",
                   "evil.png\x00.jpg", "a" * 101 + ".png", "")],
    Bad("names", "reference image named twice", "SubmitStory",
        lambda c: submit(json.dumps({**SMALL, "references": ["a.png"], "shots": [{"prompt": "x"}]}),
                         images_=[("a.png", GOOD_PNG), ("a.png", GOOD_PNG)]),
        INVALID, "reference_images[1].name", "INVALID_REFERENCE_IMAGE"),
    Bad("names", "story reference: an image on the daemon's host, absolute", "SubmitStory",
        lambda c: submit(json.dumps({**SMALL, "references": [c["host_image"]], "shots": [{"prompt": "x"}]})),
        INVALID, "story_json.references[0]", "INVALID_REFERENCE_IMAGE"),
    Bad("names", "story reference: traversal to the daemon's host", "SubmitStory",
        lambda c: submit(json.dumps({**SMALL, "references": ["../" * 12 + c["host_image"].lstrip("/")], "shots": [{"prompt": "x"}]})),
        INVALID, "story_json.references[0]", "INVALID_REFERENCE_IMAGE"),
    Bad("names", "shot reference: an image on the daemon's host", "SubmitStory",
        lambda c: submit(json.dumps({**SMALL, "shots": [{"prompt": "x"}, {"prompt": "y", "references": [c["host_image"]]}]})),
        INVALID, "story_json.shots[1].references[0]", "INVALID_REFERENCE_IMAGE"),
    Bad("names", "YAML story reference through the uploaded name's folder", "SubmitStory",
        lambda c: submit(f"references: [ref.png/../../../{'../' * 8}{c['host_image'].lstrip('/')}]\nshots: [{{prompt: x}}]\n"
                         f"resolution: 64x32\nframes: 5\nsteps: 2\n", fmt="story_yaml", images_=[("ref.png", GOOD_PNG)]),
        INVALID, "story_yaml.references[0]", "INVALID_REFERENCE_IMAGE"),
    *[Bad("names", f"artifact name {name!r}", "DownloadArtifact",
          lambda c, n=name: pb.DownloadArtifactRequest(story_id=c["story_id"], name=n), NOT_FOUND, None, "ARTIFACT_NOT_FOUND")
      for name in ("../../storyfarm.db", "shots/../../../storyfarm.db", "/etc/passwd", "manifest.json/../../../storyfarm.db",
                   "keyframes/../manifest.json", "shots/%2e%2e%2fmanifest.json")],
    *[Bad("names", f"{rpc} of story id {sid!r}", rpc, lambda c, s=sid, r=rpc: getattr(pb, f"{r}Request")(story_id=s), NOT_FOUND, None,
          "STORY_NOT_FOUND")
      for sid in ("../../storyfarm.db", "st_../../../etc", "/etc/passwd") for rpc in ("GetStory", "ListArtifacts")],
    Bad("names", "batch id with a slash", "SubmitBatch",
        lambda c: pb.SubmitBatchRequest(batch_id="../night", stories=[submit()]), INVALID, "batch_id", "INVALID_BATCH_ID"),
    Bad("names", "batch id with traversal, read", "GetBatch", lambda c: pb.GetBatchRequest(batch_id="../../x"), NOT_FOUND,
        None, "BATCH_NOT_FOUND"),
    # -- sizes -----------------------------------------------------------------------------------
    Bad("oversized", "message over max_message_bytes", "SubmitStory",
        lambda c: submit(over(LIMITS["max_message_bytes"])), EXHAUSTED, None, None),
    Bad("oversized", "batch over max_message_bytes", "SubmitBatch",
        lambda c: pb.SubmitBatchRequest(batch_id="big", stories=[submit(over(60_000)) for _ in range(5)]), EXHAUSTED, None, None),
    Bad("oversized", "story text over max_story_bytes", "SubmitStory",
        lambda c: submit(over(LIMITS["max_story_bytes"])), EXHAUSTED, "story_json"),
    Bad("oversized", "YAML story text over max_story_bytes", "SubmitStory",
        lambda c: submit("shots: [{prompt: x}]\n" + "#" * LIMITS["max_story_bytes"], fmt="story_yaml"), EXHAUSTED, "story_yaml"),
    Bad("oversized", "too many shots", "SubmitStory", lambda c: submit(story(*["p"] * (LIMITS["max_shots"] + 1))),
        INVALID, "story_json.shots"),
    Bad("oversized", "too many structured shots", "SubmitStory",
        lambda c: submit(spec(*["p"] * (LIMITS["max_shots"] + 1)), fmt="story_spec"), INVALID, "story_spec.shots"),
    Bad("oversized", "too many reference images", "SubmitStory",
        lambda c: submit(images_=[(f"r{i}.png", GOOD_PNG) for i in range(LIMITS["max_references"] + 1)]),
        INVALID, "reference_images", "INVALID_REFERENCE_IMAGE"),
    Bad("oversized", "reference image over max_reference_bytes", "SubmitStory",
        lambda c: with_image(images.png(256, 256, noise=True)), INVALID, "reference_images[0].data", "INVALID_REFERENCE_IMAGE"),
    Bad("oversized", "prompt over max_prompt_chars", "SubmitStory",
        lambda c: submit(story("a" * (LIMITS["max_prompt_chars"] + 1))), EXHAUSTED, "story_json.shots[0].prompt",
        "RENDER_BUDGET_EXCEEDED"),
    Bad("oversized", "request id over 128 characters", "SubmitStory",
        lambda c: pb.SubmitStoryRequest(request_id="r" * 129, story_json=story()), INVALID, "request_id"),
    Bad("oversized", "65 labels", "SubmitStory",
        lambda c: submit(labels={f"k{i}": "v" for i in range(65)}), INVALID, "labels", "INVALID_LABEL"),
    Bad("oversized", "label value over 63 characters", "SubmitStory",
        lambda c: submit(labels={"team": "v" * 64}), INVALID, "labels[\"team\"]", "INVALID_LABEL"),
    # -- the render budget and the model's limits -----------------------------------------------
    *[Bad("budget", f"{size} x {frames} frames x {steps} steps", "SubmitStory",
          lambda c, s=size, f=frames, n=steps: submit(json.dumps({"resolution": s, "frames": f, "steps": n,
                                                                  "shots": [{"prompt": "x"}]})),
          EXHAUSTED, "story_json.shots[0]", "RENDER_BUDGET_EXCEEDED")
      for size, frames, steps in (("160x96", 33, 8), ("320x192", 17, 8), ("160x96", 17, 9), ("640x384", 81, 40))],
    Bad("budget", "story-level settings over budget for every shot", "SubmitStory",
        lambda c: submit(json.dumps({"resolution": "320x192", "frames": 17, "steps": 8,
                                     "shots": [{"prompt": "x"}, {"prompt": "y"}]})),
        EXHAUSTED, "story_json.shots[1]", "RENDER_BUDGET_EXCEEDED"),
    Bad("budget", "structured story over budget", "SubmitStory",
        lambda c: submit(spec("x", size=(320, 192), frames=17, steps=8), fmt="story_spec"), EXHAUSTED, "story_spec.shots[0]",
        "RENDER_BUDGET_EXCEEDED"),
    Bad("budget", "resolution off the 16-pixel grid", "SubmitStory",
        lambda c: submit(story(resolution="100x50")), INVALID, "story_json.resolution"),
    Bad("budget", "absurd resolution", "SubmitStory", lambda c: submit(story(resolution="99999999x99999999")), INVALID,
        "story_json.resolution"),
    Bad("budget", "frames not 4n+1", "SubmitStory", lambda c: submit(story(frames=10)), INVALID, "story_json.frames"),
    Bad("budget", "zero steps", "SubmitStory", lambda c: submit(story(steps=0)), INVALID, "story_json.steps"),
    Bad("budget", "10^12 steps", "SubmitStory", lambda c: submit(story(steps=10**12)), INVALID, "story_json.steps"),
    Bad("budget", "frames 1e308", "SubmitStory", lambda c: submit(story(frames=1e308)), INVALID, "story_json.frames"),
    Bad("budget", "priority over 100", "SubmitStory", lambda c: submit(priority=1000), INVALID, "priority",
        reason="INVALID_ARGUMENT"),
    Bad("budget", "priority change under -100", "SetPriority",
        lambda c: pb.SetPriorityRequest(story_id=c["story_id"], priority=-101), INVALID, "priority",
        reason="INVALID_ARGUMENT"),
    Bad("budget", "a cancel reason of two lines", "CancelStory",
        lambda c: pb.CancelStoryRequest(story_id=c["story_id"], reason="a\nb"), INVALID, "reason",
        reason="INVALID_ARGUMENT"),
    # -- structured requests with values their schema does not know --------------------------------
    Bad("structure", "structured shot with an unknown transition number", "SubmitStory",
        lambda c: submit(pb.StorySpec(shots=[pb.ShotSpec(prompt="a"), pb.ShotSpec(prompt="b", transition=-1)]),
                         fmt="story_spec"), INVALID, "story_spec.shots[1].transition"),
    # -- images ----------------------------------------------------------------------------------
    *[Bad("images", what, "SubmitStory", lambda c, d=data: with_image(d()), INVALID, "reference_images[0].data",
          "INVALID_REFERENCE_IMAGE")
      for what, data in (
          ("random bytes named .png", lambda: bytes(range(256)) * 16),
          ("empty file", lambda: b""),
          ("truncated PNG", lambda: images.png(64, 64, noise=True)[:2000]),
          ("PNG header claiming 65535x65535 (decompression bomb)", images.png_header_bomb),
          ("PNG over max_reference_pixels", lambda: images.png(1100, 1000)),
          ("PNG with a 64 MiB zTXt chunk (zip bomb)", images.png_text_bomb),
          ("PNG with a broken chunk mid-image", images.png_broken_chunk),
          ("PNG 8x8 (too small)", lambda: images.png(8, 8)),
          ("GIF", lambda: images.encoded("GIF")),
          ("BMP", lambda: images.encoded("BMP")),
          ("TIFF", lambda: images.encoded("TIFF")),
          ("SVG", lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect/></svg>'),
          ("EPS (would run Ghostscript)", lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n"),
          ("JPEG truncated", lambda: images.encoded("JPEG")[:300]),
      )],
    # -- text ------------------------------------------------------------------------------------
    *[Bad("text", f"prompt with U+{ord(ch):04X}", "SubmitStory", lambda c, x=ch: submit(story(f"a{x}b")), INVALID,
          "story_json.shots[0].prompt")
      for ch in ("\x00", "\x07", "\x1b", "\x7f", "\x9b", "\u202a", "\u202b", "\u202d", "\u202e", "\u2066", "\u2067",
                 "\u2068", "\u2069")],
    Bad("text", "negative prompt with a right-to-left override", "SubmitStory",
        lambda c: submit(json.dumps({**SMALL, "shots": [{"prompt": "x", "negative_prompt": "blur\u202eyrros"}]})), INVALID,
        "story_json.shots[0].negative_prompt"),
    Bad("text", "StoryMem first-frame prompt with an escape sequence", "SubmitStory",
        lambda c: submit(json.dumps({"story_name": "s", "scenes": [{"scene_num": 1, "video_prompts": ["x"],
                                                                   "first_frame_prompt": ["\x1b[2Jx"], "cut": [True]}]})),
        INVALID, "story_json.scenes[0].first_frame_prompt[0]"),
    Bad("text", "story name with a terminal title escape", "SubmitStory",
        lambda c: submit(story(name="night\x1b]0;owned\x07")), INVALID, "story_json.name"),
    Bad("text", "YAML prompt with an escape", "SubmitStory",
        lambda c: submit('shots: [{prompt: "a\\eb"}]\n', fmt="story_yaml"), INVALID, "story_yaml.shots[0].prompt"),
    Bad("text", "structured prompt with a bidi isolate", "SubmitStory",
        lambda c: submit(spec("a\u2067b"), fmt="story_spec"), INVALID, "story_spec.shots[0].prompt"),
    Bad("text", "label key with an escape", "SubmitStory", lambda c: submit(labels={"team\x1b[31m": "x"}), INVALID,
        "labels", "INVALID_LABEL"),
    Bad("text", "label value with a right-to-left override", "SubmitStory", lambda c: submit(labels={"team": "a\u202eb"}),
        INVALID, "labels[\"team\"]", "INVALID_LABEL"),
    Bad("text", "project with control characters", "SubmitStory", lambda c: submit(project="film\x1b[2J"), INVALID,
        "project"),
    Bad("text", "project with a path", "SubmitStory", lambda c: submit(project="../../film"), INVALID, "project"),
]


def written(data: Path) -> set[str]:
    """Every file under the data dir except the SQLite files themselves (their rows are compared)."""
    return {str(p.relative_to(data)) for p in data.rglob("*")
            if p.is_file() and not p.name.startswith(("storyfarm.db", "daemon.lock"))}


@pytest.fixture(scope="module")
def context(production_daemon, tmp_path_factory):
    """A succeeded story of project `film` (for artifact and story-id cases) and a real image on
    the daemon's host outside its data dir (what a traversal would reach)."""
    stub, metadata = production_daemon.stub, bearer("submitter")
    story_id = stub.SubmitStory(submit(story()), metadata=metadata, timeout=30).story_id
    wait_story(stub, story_id, metadata)
    production_daemon.quiesce()
    host_image = tmp_path_factory.mktemp("host") / "secret.png"
    host_image.write_bytes(images.png(64, 64))
    return {"story_id": story_id, "host_image": str(host_image)}


def wait_story(stub, story_id: str, metadata, states=(pb.STORY_STATE_SUCCEEDED,), timeout: float = 120) -> pb.Story:
    deadline = time.monotonic() + timeout
    while (s := stub.GetStory(pb.GetStoryRequest(story_id=story_id), metadata=metadata, timeout=10)).state not in states:
        assert s.state in (pb.STORY_STATE_QUEUED, pb.STORY_STATE_RUNNING), s
        assert time.monotonic() < deadline, f"story {story_id} still {s.state}"
        time.sleep(0.1)
    return s


def call(stub, rpc: str, request, metadata):
    result = getattr(stub, rpc)(request, metadata=metadata, timeout=30)
    return list(result) if rpc.startswith(("Download", "Watch")) else result


@pytest.mark.parametrize("case", CASES, ids=[f"{c.category}: {c.name}" for c in CASES])
def test_bad_input_is_refused_with_its_field_and_writes_nothing(production_daemon, context, case, figures):
    d, stub, metadata = production_daemon, production_daemon.stub, bearer("admin")
    request = case.request(context)
    files, seq = written(d.data), d.daemon.store.last_event_seq()
    stories = sum(d.daemon.store.count_stories_by_state().values())

    with pytest.raises(grpc.RpcError) as err:
        call(stub, case.rpc, request, metadata)
    error = err.value
    assert error.code() == case.code, (error.code(), error.details())
    fields, reason = violations(error)
    if case.reason is None:
        assert rpc_status.from_call(error) is None, "expected gRPC's own refusal"
    else:
        assert reason == case.reason, (reason, fields, error.details())
        assert error.details() and "Exception calling application" not in error.details()
    if case.field is not None:
        assert any(f == case.field or f.startswith((case.field + ".", case.field + "[")) for f in fields), \
            f"expected a violation of {case.field}, got {fields}"
        assert all(description for description in fields.values()), fields  # each says what is allowed

    assert d.daemon.store.last_event_seq() == seq, \
        f"a refused request appended events: {[(e.kind, e.payload) for e in d.daemon.store.events_since(None, seq)]}"
    assert sum(d.daemon.store.count_stories_by_state().values()) == stories, "a refused request stored a story"
    assert written(d.data) - files == set(), f"a refused request wrote files: {written(d.data) - files}"
    tally = figures.setdefault("bad_inputs", {})
    tally[case.category] = tally.get(case.category, 0) + 1


def test_every_category_is_covered():
    assert Counter(c.category for c in CASES).keys() == {"names", "oversized", "budget", "structure", "images", "text"}
    assert len({(c.category, c.name) for c in CASES}) == len(CASES), "case names must be unique"


def test_exactly_at_the_limits_is_accepted(production_daemon):
    """The refusals above are the limits, not something stricter: the same requests at the limit pass."""
    stub, metadata = production_daemon.stub, bearer("admin")
    at_limit = [
        submit(json.dumps({"resolution": "160x96", "frames": 17, "steps": 8, "shots": [{"prompt": "x"}]}), validate_only=True),
        submit(story("a" * LIMITS["max_prompt_chars"]), validate_only=True),
        submit(story(*["p"] * LIMITS["max_shots"]), validate_only=True),
        submit(story("line one\nline two\twith a tab, ünïcödé and 漢字"), validate_only=True, priority=100,
               labels={f"k{i}": "v" * 63 for i in range(64)}),
        pb.SubmitStoryRequest(request_id="r" * 128, story_json=story(), validate_only=True, project="film-2.b_c"),
        with_image(images.png(1000, 1000)),
    ]
    at_limit[-1].validate_only = True
    for request in at_limit:
        assert stub.SubmitStory(request, metadata=metadata, timeout=30).shot_count >= 1


def test_planted_symlinks_are_never_followed_by_downloads(production_daemon, context):
    """Someone with access to the data dir swaps a published clip, then a whole story folder, for
    symlinks to the job store: a download must refuse rather than stream the database."""
    d, stub, metadata = production_daemon, production_daemon.stub, bearer("viewer")
    story_id = context["story_id"]
    record = d.daemon.store.get_story(story_id)
    clip = next(a for a in record.artifacts if a.kind == "shot_video")
    path = d.data / clip.path
    original = path.read_bytes()
    database = (d.data / "storyfarm.db").read_bytes()[:64]
    try:
        path.unlink()
        path.symlink_to(d.data / "storyfarm.db")
        with pytest.raises(grpc.RpcError) as err:
            call(stub, "DownloadArtifact", pb.DownloadArtifactRequest(story_id=story_id, name=clip.name), metadata)
        assert err.value.code() == NOT_FOUND and database not in (err.value.details() or "").encode()
    finally:
        path.unlink()
        path.write_bytes(original)
    folder = d.data / "stories" / story_id
    aside = folder.with_name(folder.name + "-aside")
    folder.rename(aside)
    try:
        folder.symlink_to(aside, target_is_directory=True)
        with pytest.raises(grpc.RpcError) as err:
            call(stub, "DownloadArtifact", pb.DownloadArtifactRequest(story_id=story_id, name=clip.name), metadata)
        assert err.value.code() == NOT_FOUND
    finally:
        folder.unlink()
        aside.rename(folder)
    chunks = call(stub, "DownloadArtifact", pb.DownloadArtifactRequest(story_id=story_id, name=clip.name), metadata)
    assert b"".join(c.data for c in chunks) == original  # and the real file still downloads
