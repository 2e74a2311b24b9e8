"""Re-rendering one shot of a rendered story: an edited prompt, a strength, a seed, a cascade.

The shot sees its memory snapshot; shots not rendered again keep their bytes; the story video,
contact sheet and manifest are assembled again from the new take.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml

from storyfarm.daemon.cli import main as cli_main
from storyfarm.m2v import video
from storyfarm.story.files import sha256_file
from storyfarm.m2v.render.driver import StoryRenderer
from storyfarm.story.format import check_against_model, parse_story

DOC = {"seed": 8, "resolution": "64x32", "frames": 9, "steps": 3, "shots": [
    {"prompt": "a lighthouse keeper climbs the stairs"},
    {"prompt": "the lamp turns on"},
    {"prompt": "the beam sweeps the sea", "cut": False},
]}


@pytest.fixture(scope="module")
def rendered(tiny_engine, tmp_path_factory):
    story = check_against_model(parse_story(DOC), tiny_engine.preset.model_limits())
    out = tmp_path_factory.mktemp("edit") / "story"
    manifest = StoryRenderer(tiny_engine).render(story, out)
    return story, out, manifest


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def sha_of(out, manifest):
    return [sha256_file(out / s["file"]) for s in manifest["shots"]]


def test_an_edited_prompt_changes_only_that_shot(tiny_engine, rendered, tmp_path):
    story, original, before = rendered
    out = copy(original, tmp_path / "story")
    memory_before = json.loads((out / "keyframes" / "memory.json").read_text())
    after = StoryRenderer(tiny_engine).rerender(story, out, 1, {"prompt": "the lamp turns on in a storm"})
    old, new = sha_of(original, before), sha_of(out, after)
    assert new[0] == old[0] and new[2] == old[2]  # not cascaded: byte for byte as before
    assert new[1] != old[1] and after["shots"][1]["sha256"] == new[1]
    assert after["shots"][1]["prompt"] == "the lamp turns on in a storm"
    assert after["shots"][1]["edit"] == {"prompt": "the lamp turns on in a storm", "start_step": 0}
    assert after["shots"][1]["memory_keyframes"] == before["shots"][1]["memory_keyframes"]  # its snapshot
    assert after["story_sha256"] != before["story_sha256"]
    assert len(video.read_mp4(out / "story.mp4")) == sum(s["frames"] for s in after["shots"])
    # its keyframes were replaced at its place in the memory; the other shots' stayed
    memory = json.loads((out / "keyframes" / "memory.json").read_text())["keyframes"]
    assert [k["shot_index"] for k in memory] == sorted(k["shot_index"] for k in memory)
    assert [k for k in memory if k["shot_index"] != 1] == [k for k in memory_before["keyframes"] if k["shot_index"] != 1]
    assert [k["file"] for k in after["keyframes"]] == [f"keyframes/{k['id']}.png" for k in memory]


def test_strength_starts_from_the_previous_take(tiny_engine, rendered, tmp_path, monkeypatch):
    story, original, before = rendered
    prompt = "the lamp turns on, seen from the sea"
    fresh = StoryRenderer(tiny_engine).rerender(story, copy(original, tmp_path / "a"), 1, {"prompt": prompt})
    full = StoryRenderer(tiny_engine).rerender(story, copy(original, tmp_path / "b"), 1, {"prompt": prompt, "strength": 1.0})
    assert full["shots"][1]["sha256"] == fresh["shots"][1]["sha256"]  # strength 1 is pure noise
    started = []
    real = tiny_engine.vae.encode_clip
    monkeypatch.setattr(tiny_engine.vae, "encode_clip", lambda frames: started.append(frames.copy()) or real(frames))
    light = StoryRenderer(tiny_engine).rerender(story, copy(original, tmp_path / "c"), 1, {"prompt": prompt, "strength": 0.34})
    assert light["shots"][1]["edit"] == {"prompt": prompt, "strength": 0.34, "start_step": 2}  # the last of 3 steps
    assert len(started) == 1 and np.array_equal(started[0], video.read_mp4(original / before["shots"][1]["file"]))
    assert light["shots"][1]["sha256"] not in (fresh["shots"][1]["sha256"], before["shots"][1]["sha256"])
    # the same light edit from another previous take gives another result: it starts from that take
    other = copy(original, tmp_path / "d")
    shutil.copy(tmp_path / "a" / fresh["shots"][1]["file"], other / before["shots"][1]["file"])
    from_other = StoryRenderer(tiny_engine).rerender(story, other, 1, {"prompt": prompt, "strength": 0.34})
    assert from_other["shots"][1]["sha256"] != light["shots"][1]["sha256"]
    (other / before["shots"][1]["file"]).unlink()
    with pytest.raises(FileNotFoundError, match="no previous take"):
        StoryRenderer(tiny_engine).rerender(story, other, 1, {"strength": 0.5})


def test_a_cascade_renders_every_later_shot_again_and_keeps_their_edits(tiny_engine, rendered, tmp_path):
    story, original, before = rendered
    out = copy(original, tmp_path / "story")
    renderer = StoryRenderer(tiny_engine)
    renderer.rerender(story, out, 2, {"prompt": "the beam sweeps a calm sea"})
    after = renderer.rerender(story, out, 0, {"seed": 1234}, cascade=True)
    old, new = sha_of(original, before), sha_of(out, after)
    assert all(n != o for n, o in zip(new, old))
    assert after["shots"][0]["seed"] == 1234 and after["shots"][1]["seed"] == before["shots"][1]["seed"]
    assert after["shots"][2]["prompt"] == "the beam sweeps a calm sea"  # an earlier edit survives a cascade


def test_the_render_command_re_renders_one_shot(tiny_engine, rendered, tmp_path, capsys):
    story_file = tmp_path / "story.yaml"
    story_file.write_text(yaml.safe_dump(DOC))
    out = copy(rendered[1], tmp_path / "out")
    capsys.readouterr()
    # shots are numbered from 1 (story/numbering.py): --shot 3 is the third shot, shots/003_...mp4
    assert cli_main(["render", str(story_file), "--out", str(out), "--quiet", "--shot", "3", "--prompt", "a red beam"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "done: shot 3 re-rendered in " in said, said  # one shot, not the story's three
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shots"][2]["prompt"] == "a red beam" and manifest["shots"][2]["file"].startswith("shots/003_")
    assert sha_of(out, manifest)[2] != rendered[2]["shots"][2]["sha256"]
    assert sha_of(out, manifest)[:2] == [s["sha256"] for s in rendered[2]["shots"][:2]]
    assert cli_main(["render", str(story_file), "--out", str(out), "--quiet", "--shot", "0"]) == 2
    assert "--shot 0: shot numbers count from 1; this story has shots 1 to 3" in " ".join(capsys.readouterr().out.split())
    assert cli_main(["render", str(story_file), "--out", str(out), "--quiet", "--shot", "1", "--strength", "2"]) == 2
    assert "strength: expected a strength of at most 1, got 2.0" in capsys.readouterr().out
    assert cli_main(["render", str(story_file), "--out", str(out), "--quiet", "--shot", "7"]) == 2
    assert cli_main(["render", str(story_file), "--out", str(tmp_path / "new"), "--quiet", "--cascade"]) == 2
