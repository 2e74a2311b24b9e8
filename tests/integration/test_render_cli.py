"""`storyfarm render` / `validate` as a user runs them: real processes, real mp4s decoded back."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from storyfarm.m2v import video
from storyfarm.m2v.memory.bank import window
from storyfarm.m2v.model.rope import memory_time_positions

CLI = str(Path(sys.executable).with_name("storyfarm"))


def run_cli(*args, timeout=900):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def published_frames(entry: dict, rendered: int) -> int:
    """Continuations drop the frames that re-create the previous shot's end (StoryMem does too)."""
    return rendered - {None: 0, "first_frame": 1, "motion_frames": 5}[entry["transition"]]


def check_render(out: Path, expected_shots: int, frames: int, size: tuple[int, int]) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    shots = manifest["shots"]
    assert len(shots) == expected_shots
    files = sorted((out / "shots").glob("*.mp4"))
    assert [f"shots/{p.name}" for p in files] == [s["file"] for s in shots]
    width, height = size
    for entry in shots:
        path = out / entry["file"]
        assert entry["sha256"] == sha256(path)
        decoded = video.read_mp4(path)
        assert entry["rendered_frames"] == frames
        assert decoded.shape == (published_frames(entry, frames), height, width, 3) == (entry["frames"], height, width, 3)
        for key in ("scene", "shot", "prompt", "seed", "cut", "memory_keyframes", "rope_time_positions", "new_keyframes", "seconds"):
            assert key in entry, key
        latent_frames = (frames - 1) // 4 + 1
        m = len(entry["memory_keyframes"])
        assert entry["rope_time_positions"] == memory_time_positions(m, latent_frames)
        assert {"text_encode", "denoise", "vae_decode", "mp4_encode", "keyframes"} <= set(entry["seconds"])
    story = video.read_mp4(out / "story.mp4")
    assert story.shape[0] == sum(published_frames(e, frames) for e in shots)
    assert manifest["story_sha256"] == sha256(out / "story.mp4")
    for kf in manifest["keyframes"]:
        assert (out / kf["file"]).is_file()
    assert (out / "contact_sheet.png").stat().st_size > 0
    # each shot saw exactly StoryMem's window over the keyframes that existed before it:
    # the story's first 3 kept for good plus the most recent, 10 in all, oldest first
    known: list[str] = [k["id"] for k in manifest["keyframes"] if k["source"] == "reference"]
    for entry in shots:
        expected = [] if entry["model"] == "t2v" else window(known, long_term=3, max_size=10)
        assert entry["memory_keyframes"] == expected
        known += entry["new_keyframes"]
    assert [k["id"] for k in manifest["keyframes"]] == known
    return manifest


@pytest.mark.slow
def test_render_example_story(tmp_path, repo):
    out = tmp_path / "lighthouse"
    res = run_cli("render", repo / "configs/stories/lighthouse.yaml", "--preset", "tiny", "--out", out, "--seed", "7")
    assert res.returncode == 0, res.stdout + res.stderr
    manifest = check_render(out, 6, 17, (160, 96))
    shots = manifest["shots"]
    assert shots[0]["model"] == "t2v" and all(s["model"] == "m2v" for s in shots[1:])
    assert shots[0]["cut"] is True
    continuations = [s for s in shots if not s["cut"]]
    assert continuations and all(s["transition"] in ("first_frame", "motion_frames") for s in continuations)
    seeds = [s["seed"] for s in shots]
    assert len(set(seeds)) == len(seeds)  # never repeated per scene


@pytest.mark.slow
def test_render_stbench_cat(tmp_path, stbench):
    out = tmp_path / "cat"
    res = run_cli("render", stbench / "cat.json", "--preset", "tiny", "--out", out, "--seed", "7")
    assert res.returncode == 0, res.stdout + res.stderr
    manifest = check_render(out, 10, 17, (160, 96))
    source = json.loads((stbench / "cat.json").read_text())
    cuts = [c for scene in source["scenes"] for c in scene["cut"]]
    assert [s["cut"] for s in manifest["shots"]] == [True] + cuts[1:]
    prompts = [p for scene in source["scenes"] for p in scene["video_prompts"]]
    assert [s["prompt"] for s in manifest["shots"]] == prompts
    assert [s["seed"] for s in manifest["shots"]] == [7 + i for i in range(10)]
    # the memory filled past the window, so the sliding part and the long-term part both show
    longest = max(manifest["shots"], key=lambda s: len(s["memory_keyframes"]))
    assert len(longest["memory_keyframes"]) == 10
    assert len(manifest["keyframes"]) > 10


def test_same_seed_renders_the_same_story(tmp_path, repo):
    story = repo / "configs/stories/minimal.yaml"
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        res = run_cli("render", story, "--out", out, "--seed", "3", "--frames", "9", "--resolution", "64x32", "--steps", "2", "--quiet")
        assert res.returncode == 0, res.stdout + res.stderr
        outs.append(out)
    a, b = (json.loads((o / "manifest.json").read_text()) for o in outs)
    for sa, sb in zip(a["shots"], b["shots"]):
        assert np.array_equal(video.read_mp4(outs[0] / sa["file"]), video.read_mp4(outs[1] / sb["file"]))
        assert sa["new_keyframes"] == sb["new_keyframes"]
        assert sa["sha256"] == sb["sha256"]  # published bytes are stable for a seed, not just pixels
    # a re-render into the same folder replaces the earlier render
    res = run_cli("render", story, "--out", outs[0], "--seed", "4", "--frames", "9", "--resolution", "64x32", "--steps", "2", "--quiet")
    assert res.returncode == 0, res.stderr
    c = json.loads((outs[0] / "manifest.json").read_text())
    assert [s["seed"] for s in c["shots"]] == [4, 5, 6]
    assert len(list((outs[0] / "shots").glob("*.mp4"))) == 3


def test_render_refuses_a_foreign_non_empty_folder(tmp_path, repo):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = run_cli("render", repo / "configs/stories/minimal.yaml", "--out", out, "--quiet")
    assert res.returncode == 2
    assert "not empty" in res.stdout
    assert (out / "notes.txt").read_text() == "mine"


def test_validate_reports_field_paths(tmp_path, repo):
    ok = run_cli("validate", repo / "configs/stories/lighthouse.yaml")
    assert ok.returncode == 0 and "ok:" in ok.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({
        "story_name": "x", "story_overview": "y",
        "scenes": [{"scene_num": 1, "video_prompts": ["a", "b"], "first_frame_prompt": ["a", "b"], "cut": [True, "False"]}],
    }))
    res = run_cli("validate", bad)
    assert res.returncode == 2
    assert 'scenes[0].cut[1]: expected a boolean, got "False"' in res.stdout
    odd = tmp_path / "odd.yaml"
    odd.write_text("shots:\n  - prompt: a\n    frames: 80\n  - prompt: b\n    resolution: 830x480\n")
    res = run_cli("validate", odd)
    assert res.returncode == 2
    assert "shots[0].frames" in res.stdout and "shots[1].resolution" in res.stdout


def test_references_become_the_initial_memory(tmp_path):
    """MR2V: story references are the first memory entries; a shot's references join before it."""
    rng = np.random.default_rng(0)
    from PIL import Image

    for name, size in (("hero.png", (80, 48)), ("place.jpg", (200, 120)), ("late.png", (64, 64))):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(tmp_path / name)
    story = tmp_path / "refs.yaml"
    story.write_text(
        "references: [hero.png, place.jpg]\n"
        "shots:\n"
        "  - prompt: the hero stands at the harbour\n"
        "  - prompt: the hero walks into the market\n"
        "    references: [late.png]\n"
    )
    out = tmp_path / "out"
    res = run_cli("render", story, "--out", out, "--frames", "9", "--resolution", "64x32", "--steps", "2", "--quiet")
    assert res.returncode == 0, res.stdout + res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    first, second = manifest["shots"]
    assert first["model"] == "m2v"  # references present: no T2V first shot
    assert first["memory_keyframes"] == ["ref00", "ref01"]
    assert first["rope_time_positions"] == [-10, -5, 0, 1, 2]
    # the shot's own reference joins after shot 1's keyframes: the newest memory entry
    assert second["memory_keyframes"][:2] == ["ref00", "ref01"] and second["memory_keyframes"][-1] == "ref02"
    assert [k["id"] for k in manifest["keyframes"] if k["source"] == "reference"] == ["ref00", "ref01", "ref02"]


def test_bad_reference_image_is_refused_with_its_field(tmp_path):
    (tmp_path / "fake.png").write_bytes(b"not an image at all")
    story = tmp_path / "bad_refs.yaml"
    story.write_text("shots:\n  - prompt: a\n  - prompt: b\n    references: [fake.png]\n")
    out = tmp_path / "out"
    res = run_cli("render", story, "--out", out, "--frames", "9", "--resolution", "64x32", "--steps", "2", "--quiet")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "shots[1].references[0]" in res.stdout


# --- an interrupted render, and checks made before any model loads (issue 14) -------------------

SMALL = ("--seed", "5", "--frames", "9", "--resolution", "64x32", "--steps", "2")


def published(out: Path) -> dict[str, tuple[int, int]]:
    """Every file under `out` with its (inode, mtime_ns): what a refused command must leave alone."""
    return {str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()}


def test_an_interrupted_render_resumes_from_its_last_published_shot(tmp_path, repo, tiny_engine):
    from storyfarm.m2v.render.driver import RenderSettings, StoryRenderer
    from storyfarm.m2v.render.observe import Cancelled, RenderObserver
    from storyfarm.story.format import check_against_model, load_story

    story_file = repo / "configs/stories/minimal.yaml"
    full = tmp_path / "full"  # the same command, never interrupted
    res = run_cli("render", story_file, "--out", full, *SMALL, "--quiet")
    assert res.returncode == 0, res.stdout + res.stderr

    # the render stops (a cancel, as a Ctrl-C would) as soon as its first shot is published
    out, done = tmp_path / "out", []

    class Done(RenderObserver):
        def shot_done(self, shot, entry):
            done.append(entry)

    renderer = StoryRenderer(tiny_engine, RenderSettings(seed=5, steps=2, frames=9, resolution=(64, 32)))
    story = check_against_model(load_story(story_file), tiny_engine.preset.model_limits())
    with pytest.raises(Cancelled):
        renderer.render(story, out, Done(), cancel=lambda: len(done) >= 1)
    assert not (out / "manifest.json").exists() and len(list((out / "shots").glob("*.mp4"))) == 1
    before = published(out)

    # another story, preset or options: refused before any model loads, naming --out and the difference
    other = tmp_path / "other.yaml"
    other.write_text("shots:\n  - prompt: a different story\n")
    for args, differs in (((story_file, "--out", out, "--seed", "6", *SMALL[2:]), "--seed 5"),
                          ((other, "--out", out, *SMALL), "another story")):
        res = run_cli("render", *args, "--quiet")
        assert res.returncode == 2, res.stdout + res.stderr
        said = " ".join(res.stdout.split())
        assert f"--out {out}" in said and differs in said and "loading preset" not in said, said
        assert published(out) == before

    # the same command resumes: the published shot is kept as it is, the story ends as if never stopped
    res = run_cli("render", story_file, "--out", out, *SMALL)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming" in res.stdout
    first = done[0]["file"]
    assert published(out)[first] == before[first]
    manifest = check_render(out, 3, 9, (64, 32))
    reference = json.loads((full / "manifest.json").read_text())
    assert [s["sha256"] for s in manifest["shots"]] == [s["sha256"] for s in reference["shots"]]
    assert [k["id"] for k in manifest["keyframes"]] == [k["id"] for k in reference["keyframes"]]
    assert manifest["story"]["name"] == "minimal"  # an unnamed story is named after its file


def test_ctrl_c_then_the_same_command_resumes(tmp_path, repo):
    out = tmp_path / "out"
    command = [CLI, "render", str(repo / "configs/stories/lighthouse.yaml"), "--out", str(out), *SMALL[2:], "--quiet"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    marker = out / "render.json"
    deadline = time.monotonic() + 600
    while not (marker.is_file() and json.loads(marker.read_text())["shots"]):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no shot published in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # Ctrl-C once the first shot is published
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert not (out / "manifest.json").exists()
    res = run_cli(*command[1:])
    assert res.returncode == 0, res.stdout + res.stderr
    check_render(out, 6, 9, (64, 32))


def test_a_shot_rerender_checks_the_folder_before_loading_the_model(tmp_path, repo):
    story = repo / "configs/stories/minimal.yaml"
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_cli("render", story, "--out", empty, "--shot", "1", "--quiet")
    assert res.returncode == 2, res.stdout + res.stderr
    said = " ".join(res.stdout.split())
    assert "no manifest" in said and "loading preset" not in said, said
    out = tmp_path / "out"
    assert run_cli("render", story, "--out", out, *SMALL, "--quiet").returncode == 0
    res = run_cli("render", story, "--out", out, *SMALL, "--shot", "4", "--quiet")
    said = " ".join(res.stdout.split())
    assert res.returncode == 2 and "--shot 4: shot numbers count from 1; this story has shots 1 to 3" in said, said
    assert "loading preset" not in said, said
