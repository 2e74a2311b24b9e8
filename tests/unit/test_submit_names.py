"""What a story submitted to the daemon is called (issue 14): a story without a name of its own is
named after the file it was submitted from (the client sends the file's stem), `story` when it
came as bare text; never after the API field it came in (`story_yaml`)."""

from __future__ import annotations

import uuid

import grpc
import pytest

from storyfarm.daemon.client_wire import submit_request
from storyfarm.daemon.config import LimitsConfig
from storyfarm.daemon.errors import RpcError
from storyfarm.daemon.submit import check_submit
from storyfarm.story.presets import load_preset
from storyfarm.v1 import render_pb2 as pb

UNNAMED = "shots:\n  - prompt: a lighthouse at dusk\n"


def request(**kw) -> pb.SubmitStoryRequest:
    return submit_request(kw.pop("story", UNNAMED), request_id=uuid.uuid4().hex, project=None, priority=0,
                          labels=None, deadline=None, references=None, validate_only=False, **kw)


def checked_name(req: pb.SubmitStoryRequest) -> str:
    return check_submit(req, load_preset("tiny"), LimitsConfig()).story.name


def test_a_story_file_sends_its_stem(tmp_path):
    path = tmp_path / "lighthouse.yaml"
    path.write_text(UNNAMED)
    req = request(story=path)
    assert req.WhichOneof("story") == "story_yaml" and req.default_name == "lighthouse"
    assert checked_name(req) == "lighthouse"
    assert request(story=str(path)).default_name == "lighthouse"  # the CLI passes the path as text


def test_a_story_text_sends_no_name():
    req = request()
    assert req.default_name == ""
    assert checked_name(req) not in ("story_yaml", "story_json")


@pytest.mark.parametrize("form", ["story_yaml", "story_json"])
def test_the_api_field_never_names_a_story(form):
    text = UNNAMED if form == "story_yaml" else '{"shots": [{"prompt": "a"}]}'
    assert checked_name(pb.SubmitStoryRequest(request_id="r", **{form: text})) == ""  # the store says "story"


def test_a_name_in_the_story_wins_over_the_file_name(tmp_path):
    path = tmp_path / "lighthouse.yaml"
    path.write_text("name: The Last Keeper\n" + UNNAMED)
    assert checked_name(request(story=path)) == "The Last Keeper"


def test_the_file_name_is_part_of_the_request_identity(tmp_path):
    """Two files with the same text but different names are different stories for idempotency."""
    (tmp_path / "a.yaml").write_text(UNNAMED)
    (tmp_path / "b.yaml").write_text(UNNAMED)
    limits, preset = LimitsConfig(), load_preset("tiny")
    a = check_submit(request(story=tmp_path / "a.yaml"), preset, limits)
    b = check_submit(request(story=tmp_path / "b.yaml"), preset, limits)
    assert a.payload_sha256 != b.payload_sha256


@pytest.mark.parametrize("bad", ["a\x1bb", "x" * 201, "two\nlines"])
def test_a_bad_default_name_is_refused_with_its_field(bad):
    with pytest.raises(RpcError) as caught:
        check_submit(pb.SubmitStoryRequest(request_id="r", story_yaml=UNNAMED, default_name=bad),
                     load_preset("tiny"), LimitsConfig())
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in caught.value.fields] == ["default_name"]
