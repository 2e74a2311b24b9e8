"""Reference images submitted with a story become its initial memory: several per character,
labelled, validated at submit, stored with the story, and read back by the worker in order (a
StoryMem JSON story, which has no references key, gets its images in request order)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from storyfarm.daemon.config import LimitsConfig
from storyfarm.daemon.errors import RpcError
from storyfarm.daemon.submit import check_submit, store_references
from storyfarm.m2v.render.driver import RenderSettings, StoryRenderer
from storyfarm.m2v.video import load_reference_image
from storyfarm.story.references import ReferenceImageError
from storyfarm.story.format import check_against_model, parse_story
from storyfarm.v1 import render_pb2 as pb


def image_bytes(color, size=(48, 32), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def request(story: dict, images: dict[str, bytes]) -> pb.SubmitStoryRequest:
    return pb.SubmitStoryRequest(request_id="r", story_json=json.dumps(story),
                                 reference_images=[pb.ReferenceImage(name=n, data=d) for n, d in images.items()])


def test_a_storymem_story_gets_its_images_as_initial_memory_in_order(tiny_engine, tmp_path):
    story = {"story_name": "cat", "story_overview": "a cat's day",
             "scenes": [{"scene_num": 1, "video_prompts": ["a cat wakes up", "the cat eats"], "cut": [True, True]}]}
    images = {"cat_front.png": image_bytes((200, 40, 40)), "cat_side.jpg": image_bytes((40, 200, 40), fmt="JPEG")}
    checked = check_submit(request(story, images), tiny_engine.preset, LimitsConfig())
    assert json.loads(checked.document)["references"] == ["cat_front.png", "cat_side.jpg"]
    folder = store_references(checked, tmp_path / "data")
    assert sorted(p.name for p in folder.iterdir()) == ["cat_front.png", "cat_side.jpg"]
    # the worker reads the stored document against the stored images
    worker_story = check_against_model(parse_story(checked.document, base_dir=folder), tiny_engine.preset.model_limits())
    assert [p.rsplit("/", 1)[-1] for p in worker_story.references] == ["cat_front.png", "cat_side.jpg"]
    renderer = StoryRenderer(tiny_engine, RenderSettings(resolution=(64, 32), frames=9, steps=2))
    manifest = renderer.render(worker_story, tmp_path / "out")
    assert [k["id"] for k in manifest["keyframes"][:2]] == ["ref00", "ref01"]
    assert manifest["shots"][0]["memory_keyframes"][:2] == ["ref00", "ref01"] and manifest["shots"][0]["model"] == "m2v"


def test_several_references_per_character_stay_in_every_window(tiny_engine, tmp_path):
    story = {"resolution": "64x32", "frames": 9, "steps": 2,
             "references": {"lena": ["lena_front.png", "lena_side.png"], "harbour": ["harbour.png"], "boat": "boat.png"},
             "shots": [{"prompt": f"shot {i}"} for i in range(3)]}
    images = {n: image_bytes((i * 60, 90, 200 - i * 40)) for i, n in enumerate(["lena_front.png", "lena_side.png", "harbour.png", "boat.png"])}
    checked = check_submit(request(story, images), tiny_engine.preset, LimitsConfig())
    folder = store_references(checked, tmp_path / "data")
    parsed = check_against_model(parse_story(checked.document, base_dir=folder), tiny_engine.preset.model_limits())
    assert parsed.reference_labels == ("lena", "lena", "harbour", "boat")
    manifest = StoryRenderer(tiny_engine).render(parsed, tmp_path / "out")
    labels = [(k["id"], k.get("label")) for k in manifest["keyframes"] if k["source"] == "reference"]
    assert labels == [("ref00", "lena"), ("ref01", "lena"), ("ref02", "harbour"), ("ref03", "boat")]
    for shot in manifest["shots"]:  # four references exceed long_term (3): all of them stay in memory
        assert shot["memory_keyframes"][:4] == ["ref00", "ref01", "ref02", "ref03"]


def test_reference_images_are_validated_with_field_paths(tiny_engine, tmp_path):
    story = {"references": ["a.png", "b.gif", "c.png"], "shots": [{"prompt": "x"}]}
    gif = io.BytesIO()
    Image.new("RGB", (32, 32)).save(gif, format="GIF")
    with pytest.raises(RpcError) as caught:
        check_submit(request(story, {"a.png": image_bytes((0, 0, 0), size=(8, 8)), "b.gif": gif.getvalue(),
                                     "c.png": b"not an image"}), tiny_engine.preset, LimitsConfig())
    fields = dict(caught.value.fields)
    assert caught.value.reason == "INVALID_REFERENCE_IMAGE"
    assert "each side must be >= 16" in fields["reference_images[0].data"]
    assert "GIF; allowed: PNG, JPEG, WEBP" in fields["reference_images[1].data"]
    assert "not a readable image" in fields["reference_images[2].data"]
    (tmp_path / "big.png").write_bytes(image_bytes((1, 2, 3), size=(300, 300)))
    with pytest.raises(ReferenceImageError, match=r"references\[0\]: .* is 300x300; at most 50000 pixels allowed"):
        load_reference_image(tmp_path / "big.png", "references[0]", max_pixels=50_000)
