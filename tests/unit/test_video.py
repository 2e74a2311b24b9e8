"""Video files: real H.264 round trips, atomic writes, explicit-order story concat, PNGs."""

import hashlib

import av
import numpy as np
import pytest
from PIL import Image

from storyfarm.m2v import video
from storyfarm.story.files import atomic_output, sha256_file
from storyfarm.m2v.video import (
    concat_mp4, contact_sheet, probe_mp4, read_mp4, save_png, write_mp4,
)


def gradient_clip(frames=8, height=64, width=96):
    """A smooth, moving colour gradient: what H.264 at crf 18 reproduces closely."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    clip = []
    for t in range(frames):
        r = 40 + 160 * x / width
        g = 40 + 160 * y / height
        b = np.full_like(x, 60 + 15 * t)
        clip.append(np.stack([r, g, b], -1))
    return np.clip(np.stack(clip), 0, 255).astype(np.uint8)


def solid_clip(rgb, frames, height=32, width=48):
    return np.broadcast_to(np.array(rgb, np.uint8), (frames, height, width, 3)).copy()


def leftovers(folder, final_names):
    return sorted(p.name for p in folder.iterdir() if p.name not in final_names)


def test_write_read_probe_round_trip(tmp_path):
    clip = gradient_clip()
    path = tmp_path / "shot.mp4"
    write_mp4(path, clip, fps=8)

    back = read_mp4(path)
    assert back.shape == clip.shape and back.dtype == np.uint8
    err = np.abs(back.astype(np.int16) - clip.astype(np.int16))
    assert err.mean() < 2.0 and err.max() < 24, (err.mean(), err.max())

    info = probe_mp4(path)
    assert (info["frames"], info["width"], info["height"], info["codec"]) == (8, 96, 64, "h264")
    assert info["fps"] == pytest.approx(8.0)
    assert info["duration_s"] == pytest.approx(1.0, abs=0.2)
    assert leftovers(tmp_path, {"shot.mp4"}) == []


@pytest.mark.parametrize("shape", [(2, 63, 96, 3), (2, 64, 95, 3)])
def test_odd_sizes_are_refused(tmp_path, shape):
    with pytest.raises(ValueError, match="even"):
        write_mp4(tmp_path / "odd.mp4", np.zeros(shape, np.uint8), fps=8)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [np.zeros((2, 8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8),
                                 np.zeros((0, 8, 8, 3), np.uint8)])
def test_bad_frames_are_refused(tmp_path, bad):
    with pytest.raises(ValueError):
        write_mp4(tmp_path / "bad.mp4", bad, fps=8)


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "shot.mp4"
    real = video.yuv420_frame
    calls = {"n": 0}

    def flaky(rgb):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("encoder died")
        return real(rgb)

    monkeypatch.setattr(video, "yuv420_frame", flaky)
    with pytest.raises(RuntimeError, match="encoder died"):
        write_mp4(path, gradient_clip(), fps=8)
    assert list(tmp_path.iterdir()) == []  # no final file, no temporary

    monkeypatch.setattr(video, "yuv420_frame", real)
    write_mp4(path, gradient_clip(frames=4), fps=8)
    before = sha256_file(path)
    calls["n"] = 0
    monkeypatch.setattr(video, "yuv420_frame", flaky)
    with pytest.raises(RuntimeError):
        write_mp4(path, gradient_clip(), fps=8)
    assert sha256_file(path) == before
    assert leftovers(tmp_path, {"shot.mp4"}) == []


def test_atomic_output_replaces_only_on_success(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(KeyError):
        with atomic_output(target) as tmp:
            assert tmp.parent == tmp_path and tmp != target
            tmp.write_text("half")
            raise KeyError("boom")
    assert target.read_text() == "old"
    with atomic_output(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert leftovers(tmp_path, {"a.txt"}) == []


def dominant_colours(frames):
    names = np.array(["red", "green", "blue"])
    return list(names[frames.reshape(len(frames), -1, 3).mean(1).argmax(1)])


def test_concat_follows_the_explicit_order_not_the_folder(tmp_path):
    shots = {"red": (220, 20, 20), "green": (20, 220, 20), "blue": (20, 20, 220)}
    lengths = {"red": 3, "green": 4, "blue": 5}
    for name, rgb in shots.items():
        write_mp4(tmp_path / f"{name}.mp4", solid_clip(rgb, lengths[name]), fps=8)
    write_mp4(tmp_path / "stray.mp4", solid_clip((220, 20, 20), 7), fps=8)  # must not be picked up

    out = tmp_path / "story" / "story.mp4"
    order = ["blue", "red", "green"]
    concat_mp4(out, [tmp_path / f"{n}.mp4" for n in order], fps=8)

    expected = [n for n in order for _ in range(lengths[n])]
    assert dominant_colours(read_mp4(out)) == expected
    assert probe_mp4(out)["frames"] == 12
    assert leftovers(out.parent, {"story.mp4"}) == []


def test_concat_rejects_mismatched_sizes_naming_the_file(tmp_path):
    write_mp4(tmp_path / "a.mp4", solid_clip((1, 2, 3), 2), fps=8)
    write_mp4(tmp_path / "b.mp4", solid_clip((1, 2, 3), 2, height=48), fps=8)
    with pytest.raises(ValueError, match="b.mp4"):
        concat_mp4(tmp_path / "out.mp4", [tmp_path / "a.mp4", tmp_path / "b.mp4"], fps=8)
    assert not (tmp_path / "out.mp4").exists()


def test_concat_needs_an_explicit_list(tmp_path):
    with pytest.raises(TypeError):
        concat_mp4(tmp_path / "out.mp4", str(tmp_path / "*.mp4"), fps=8)
    with pytest.raises(ValueError):
        concat_mp4(tmp_path / "out.mp4", [], fps=8)


def test_save_png_is_lossless_and_atomic(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    path = tmp_path / "k" / "ref00.png"
    save_png(path, image)
    assert np.array_equal(np.asarray(Image.open(path)), image)
    assert leftovers(path.parent, {"ref00.png"}) == []
    with pytest.raises(ValueError):
        save_png(tmp_path / "bad.png", image.astype(np.float32))
    assert not (tmp_path / "bad.png").exists()


def test_contact_sheet_grid_and_labels(tmp_path):
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200),
               (90, 90, 90)]
    tiles = [(f"s{n:03d}f000 a rather long label that overflows", solid_clip(c, 1, 40, 80)[0])
             for n, c in enumerate(colours)]
    path = tmp_path / "sheet.png"
    contact_sheet(tiles, path, columns=3, tile_width=64)
    sheet = np.asarray(Image.open(path).convert("RGB"))
    assert sheet.shape[1] == 3 * 64
    rows = 3
    cell_h = sheet.shape[0] // rows
    assert sheet.shape[0] == rows * cell_h
    # tile n sits at row n // 3, column n % 3, scaled to 64 x 32
    for n, colour in enumerate(colours):
        y, x = (n // 3) * cell_h, (n % 3) * 64
        assert np.abs(sheet[y + 16, x + 32].astype(int) - colour).max() <= 2
        label_strip = sheet[y + 32:y + cell_h, x:x + 64]
        assert (label_strip.sum(-1) < 300).any(), "label text missing"
    # the empty cells of the last row stay white
    assert (sheet[2 * cell_h:, 64:] == 255).all()
    with pytest.raises(ValueError):
        contact_sheet([], tmp_path / "empty.png")


def test_sha256_file(tmp_path):
    path = tmp_path / "blob"
    data = bytes(range(256)) * 5000
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_yuv_frame_is_fully_determined_and_matches_bt601():
    """Every byte of every plane (padding included) is set; luma agrees with swscale's BT.601."""
    rgb = np.random.default_rng(1).integers(0, 256, (36, 90, 3), dtype=np.uint8)  # 90: padded lines
    frame = video.yuv420_frame(rgb)
    assert frame.planes[0].line_size > 90
    again = video.yuv420_frame(rgb)
    assert [bytes(p) for p in frame.planes] == [bytes(p) for p in again.planes]
    ref = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
    ours = np.frombuffer(bytes(frame.planes[0]), np.uint8).reshape(36, -1)[:, :90].astype(int)
    theirs = np.frombuffer(bytes(ref.planes[0]), np.uint8).reshape(36, -1)[:, :90].astype(int)
    assert np.abs(ours - theirs).max() <= 1
    padding = np.frombuffer(bytes(frame.planes[0]), np.uint8).reshape(36, -1)[:, 90:]
    assert (padding == ours[:, -1:]).all()  # edge-replicated, never left as it was allocated


def test_x264_instruction_sets_follow_the_cpu_without_avx512():
    flags = "flags\t\t: fpu mmx mmxext sse sse2 ssse3 sse4_1 sse4_2 avx fma bmi1 bmi2 avx2 abm avx512f avx512bw\n"
    asm = video.x264_asm("processor : 0\n" + flags)
    assert asm.split(",") == ["MMX2", "SSE2Fast", "SSSE3", "SSE4", "SSE4.2", "AVX", "FMA3", "BMI1", "BMI2", "AVX2", "LZCNT"]
    assert "AVX512" not in asm
    # an older CPU: only what it has (naming a set the CPU lacks would crash the encoder)
    assert video.x264_asm("flags : mmx mmxext sse sse2 ssse3\n") == "MMX2,SSE2Fast,SSSE3"
    assert video.x264_asm("no flags line here") is None


def test_encoding_the_same_frames_gives_the_same_bytes(tmp_path):
    clip = np.random.default_rng(3).integers(0, 256, (9, 32, 64, 3), dtype=np.uint8)
    for name in ("a.mp4", "b.mp4"):
        write_mp4(tmp_path / name, clip, fps=16)
    assert sha256_file(tmp_path / "a.mp4") == sha256_file(tmp_path / "b.mp4")


def test_read_frame_is_the_same_frame_read_mp4_gives(tmp_path):
    clip = np.random.default_rng(4).integers(0, 256, (5, 16, 32, 3), dtype=np.uint8)
    write_mp4(tmp_path / "c.mp4", clip, fps=8)
    whole = video.read_mp4(tmp_path / "c.mp4")
    assert np.array_equal(video.read_frame(tmp_path / "c.mp4", 2), whole[2])
    with pytest.raises(IndexError):
        video.read_frame(tmp_path / "c.mp4", 5)
