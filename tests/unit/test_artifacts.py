"""Artifact store: name attacks, symlinks, atomic publish, resumable reads, crash sweep."""

import hashlib
import os

import pytest

from storyfarm.daemon.artifacts import (
    ArtifactChanged,
    ArtifactNotFound,
    ArtifactStore,
    InvalidName,
    OffsetOutOfRange,
    STORY_ID_PATTERN,
    TEMPORARY_PATTERN,
    UnsafePath,
)
from storyfarm.story.files import atomic_output

SID = "st_0123456789abcdef"
SHOT = "shots/003_scene01_shot03.mp4"


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(tmp_path / "data")


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() or p.is_symlink())


@pytest.mark.parametrize("name", [SHOT, "story.mp4", "keyframes/s003f040.png", "keyframes/ref00.png", "contact_sheet.png", "manifest.json"])
def test_publish_daemon_names(store, name):
    data = os.urandom(1000)
    info = store.publish(SID, name, data)
    assert (info.name, info.size, info.sha256) == (name, 1000, hashlib.sha256(data).hexdigest())
    assert info.relative_path == f"stories/{SID}/{name}"
    assert (store.data_dir / info.relative_path).read_bytes() == data


def test_publish_from_a_file_replaces_the_old_version(store, tmp_path):
    src = tmp_path / "render.mp4"
    src.write_bytes(b"v2" * 1_000_000)
    store.publish(SID, "story.mp4", b"v1")
    info = store.publish(SID, "story.mp4", str(src))
    assert info.size == 2_000_000 and info.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert files_under(store.story_dir(SID)) == ["story.mp4"]


@pytest.mark.parametrize(
    "name",
    ["../escape.mp4", "shots/../../x.mp4", "/etc/passwd", "shots\\x.mp4", "story.mp4\x00.png", "", ".hidden.mp4",
     "shots/", "other/x.mp4", "shots/a/b.mp4", "story.sh", "story..mp4", "shots/.tmp.mp4", "STORY.MP4/x", "x" * 200 + ".mp4"],
)
def test_name_attacks_are_refused(store, name):
    with pytest.raises(InvalidName):
        store.publish(SID, name, b"x")
    with pytest.raises(InvalidName):
        store.open_range(SID, name, 0)
    assert files_under(store.data_dir) == []


@pytest.mark.parametrize("story_id", ["st_0123", "st_0123456789ABCDEF", "../st_0123456789abcdef", "st_0123456789abcdef/..", "xx_0123456789abcdef"])
def test_story_ids_must_match_the_store_format(store, story_id):
    assert not STORY_ID_PATTERN.fullmatch(story_id)
    with pytest.raises(InvalidName, match="story id"):
        store.story_dir(story_id)


def test_symlinks_on_the_path_are_refused(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    story = store.story_dir(SID)
    story.mkdir()
    (story / "shots").symlink_to(outside)  # a planted folder link
    with pytest.raises(UnsafePath, match="symlink"):
        store.publish(SID, SHOT, b"x")
    assert list(outside.iterdir()) == []
    (outside / "secret.png").write_bytes(b"secret")
    os.symlink(outside / "secret.png", story / "contact_sheet.png")  # a planted file link
    with pytest.raises(UnsafePath):
        store.open_range(SID, "contact_sheet.png", 0)
    os.rename(story, tmp_path / "moved")
    os.symlink(tmp_path / "moved", story)  # the story folder itself
    with pytest.raises(UnsafePath):
        store.publish(SID, "story.mp4", b"x")
    with pytest.raises(UnsafePath):
        store.remove_story(SID)


def test_a_linked_data_dir_is_the_operators_choice(tmp_path):
    (tmp_path / "big").mkdir()
    os.symlink(tmp_path / "big", tmp_path / "data")
    store = ArtifactStore(tmp_path / "data")
    store.publish(SID, "story.mp4", b"ok")
    assert (tmp_path / "big" / "stories" / SID / "story.mp4").read_bytes() == b"ok"


@pytest.mark.parametrize("fail_at", ["read", "fsync", "replace"])
def test_a_failed_publish_leaves_nothing(store, tmp_path, monkeypatch, fail_at):
    src = tmp_path / "src.mp4"
    src.write_bytes(b"y" * 3_000_000)

    def fail(*args):
        raise OSError(f"injected {fail_at} failure")

    if fail_at == "read":
        src = tmp_path  # a folder: the copy fails after the temporary exists
    else:
        monkeypatch.setattr(os, fail_at, fail)
    with pytest.raises(OSError):
        store.publish(SID, SHOT, str(src))
    monkeypatch.undo()
    assert files_under(store.story_dir(SID)) == []  # no final file, no temporary


def test_failed_publish_keeps_the_previous_version(store, monkeypatch):
    store.publish(SID, "manifest.json", b"{}")
    def fail(*args):
        raise OSError("injected")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        store.publish(SID, "manifest.json", b'{"new": 1}')
    monkeypatch.undo()
    assert files_under(store.story_dir(SID)) == ["manifest.json"]
    assert (store.story_dir(SID) / "manifest.json").read_bytes() == b"{}"


def test_resumable_reads(store):
    data = os.urandom(10_000)
    store.publish(SID, SHOT, data)
    got = b""
    for offset in (0, 4096, 8192):  # a download interrupted after each 4 KiB chunk, resumed each time
        f, size = store.open_range(SID, SHOT, offset)
        with f:
            assert size == 10_000
            got += f.read(4096)
    assert got == data
    f, size = store.open_range(SID, SHOT, 10_000)  # complete already: nothing left to send
    with f:
        assert f.read() == b""
    for bad in (10_001, -1):
        with pytest.raises(OffsetOutOfRange, match="size 10000"):
            store.open_range(SID, SHOT, bad)
    with pytest.raises(ArtifactNotFound):
        store.open_range(SID, "story.mp4", 0)


def test_reads_are_pinned_to_one_version(store):
    """A take's file is republished before the job store records it: a read names the version it
    expects and gets that one or ArtifactChanged; a read already open finishes the old version."""
    old, new = os.urandom(3 << 20), os.urandom(2 << 20)
    old_sha = store.publish(SID, SHOT, old).sha256
    f, size = store.open_version(SID, SHOT, old_sha, 1 << 20)
    new_sha = store.publish(SID, SHOT, new).sha256  # republished while that read is open
    with f:
        assert (size, f.read()) == (len(old), old[1 << 20:])
    with pytest.raises(ArtifactChanged, match="republished"):
        store.open_version(SID, SHOT, old_sha)  # the file is newer than the record a reader holds
    for offset in (0, len(new)):  # the new version's hash is remembered, the read position kept
        f, size = store.open_version(SID, SHOT, new_sha, offset)
        with f:
            assert (size, f.read()) == (len(new), new[offset:])


def test_remove_story(store):
    store.publish(SID, SHOT, b"x")
    store.publish(SID, "story.mp4", b"x")
    assert store.remove_story(SID) is True
    assert not store.story_dir(SID).exists() and os.listdir(store.root) == []
    assert store.remove_story(SID) is False


def test_sweep_removes_crash_leftovers_only(store, tmp_path):
    store.publish(SID, SHOT, b"keep")
    store.publish(SID, "manifest.json", b"{}")
    shots = store.story_dir(SID) / "shots"
    with pytest.raises(RuntimeError):
        with atomic_output(shots / "004_scene01_shot04.mp4") as tmp:
            assert TEMPORARY_PATTERN.fullmatch(tmp.name)  # the sweep recognises the writer's temporaries
            raise RuntimeError
    leftovers = [shots / ".004_scene01_shot04.mp4.k2j3h4g5.tmp.mp4", store.story_dir(SID) / ".manifest.json.tmp"]
    for p in leftovers:
        p.write_bytes(b"partial")
    half_removed = store.root / ".rm-st_aaaaaaaaaaaaaaaa-1234abcd"
    (half_removed / "shots").mkdir(parents=True)
    (half_removed / "shots" / "001.mp4").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".x.tmp").write_bytes(b"not ours")
    os.symlink(outside, store.story_dir(SID) / "keyframes")  # never descended into

    assert store.sweep_temporaries(older_than=3600) == [half_removed]  # the temporaries are fresh
    removed = store.sweep_temporaries()
    assert sorted(removed) == sorted(leftovers)
    assert files_under(store.story_dir(SID)) == ["keyframes", "manifest.json", SHOT]
    assert (outside / ".x.tmp").exists()
