"""FIFO-Diffusion long shots: the diagonal queue, windows, streaming decode and constant memory.

The tiny preset's native length is 17 frames (5 latent frames); shots here are longer, so they are
rendered window by window with per-frame timesteps, the story memory in every window, and frames
streamed to the mp4 as they leave the queue.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from storyfarm.m2v import video
from storyfarm.story.files import sha256_file
from storyfarm.m2v.render.driver import StoryRenderer
from storyfarm.m2v.render.engine import Engine, ShotPlan
from storyfarm.m2v.render.fifo import FifoSampler, FifoSettings, WindowRunner, fifo_sigmas, plan_windows
from storyfarm.m2v.render.fifo_shot import StreamingDecoder, add_window_devices, render_fifo_shot
from storyfarm.m2v.model.rope import memory_time_positions
from storyfarm.m2v.render.sampler import SamplerSettings
from storyfarm.story.format import check_against_model, parse_story


# -- the schedule and the windows ---------------------------------------------------------------
@pytest.mark.parametrize("window, partitions", [(5, 1), (5, 2), (21, 2), (4, 3)])
def test_windows_cover_every_slot_once(window, partitions):
    settings = FifoSettings(window, partitions)
    plain = plan_windows(settings)
    assert [(w.start, w.write_start, w.write_end) for w in plain] == [(k * window, k * window, (k + 1) * window) for k in range(partitions)]
    for context in (0, 1, window):
        look = plan_windows(FifoSettings(window, partitions, lookahead=True), context=min(context, window // 2))
        written = [slot for w in look for slot in range(w.write_start, w.write_end)]
        assert written == list(range(settings.levels))  # each slot written by exactly one window
        for w in look:
            assert w.start <= w.write_start and w.write_end <= w.start + window <= settings.levels
            assert w.start >= -min(context, window // 2)  # never reads a popped frame that is not there
        # lookahead: twice the model calls, every written frame has cleaner frames before it once warm
        assert len(look) == -(-settings.levels // -(-window // 2))
        if context >= window // 2:
            assert all(w.write_start - w.start == window // 2 for w in look if w.write_end - w.write_start == -(-window // 2))


def test_sigmas_fall_from_noise_to_clean():
    sigmas = fifo_sigmas(10, shift=4.0)
    assert len(sigmas) == 11 and sigmas[-1] == 0.0 and 0.999 < sigmas[0] < 1.0
    assert np.all(np.diff(sigmas) < 0)


# -- streaming ----------------------------------------------------------------------------------
def test_streaming_decode_equals_a_whole_clip_decode(tiny_engine):
    latents = torch.randn(16, 4, 4, 8, generator=torch.Generator().manual_seed(0))
    whole = tiny_engine.vae.decode(latents)
    decoder = StreamingDecoder(tiny_engine.vae)
    pieces = [decoder.push(latents[:, i]) for i in range(4)]
    assert [len(p) for p in pieces] == [1, 4, 4, 4]
    assert np.array_equal(np.concatenate(pieces), whole)


def test_streamed_mp4_is_the_same_file(tmp_path):
    frames = np.random.default_rng(1).integers(0, 256, (9, 32, 48, 3), dtype=np.uint8)
    video.write_mp4(tmp_path / "a.mp4", frames, 16)
    assert video.write_mp4_stream(tmp_path / "b.mp4", iter(frames), 16) == 9
    assert sha256_file(tmp_path / "a.mp4") == sha256_file(tmp_path / "b.mp4")
    assert np.array_equal(video.read_last_frames(tmp_path / "a.mp4", 3), video.read_mp4(tmp_path / "a.mp4")[-3:])
    with pytest.raises(ValueError, match="frame 2"):
        video.write_mp4_stream(tmp_path / "c.mp4", [frames[0], frames[1], frames[2, :16]], 16)
    assert not (tmp_path / "c.mp4").exists()


# -- the sampler --------------------------------------------------------------------------------
class Spy:
    """An expert that records what each window call gets."""

    def __init__(self, expert, calls):
        self.expert, self.calls, self.name = expert, calls, expert.name

    def __call__(self, latents, timestep, text, positions, conditioning=None):
        self.calls.append((latents.shape[2], timestep[0].tolist(), list(positions)))
        return self.expert(latents, timestep, text, positions, conditioning)


def sampler_for(engine, runners, memory=None, lookahead=False, seed=3):
    setup = engine.prepare(ShotPlan("s", "a harbour", "", seed, 64, 32, 17, SamplerSettings(steps=2)))
    return FifoSampler(FifoSettings(5, 2, lookahead), runners, text=setup.text, negative_text=setup.negative,
                       guidance=(3.5, 3.5), boundary_timestep=900.0, shift=4.0, memory=memory,
                       window_clip=engine.blank_clip(ShotPlan("s", "", "", 0, 64, 32, 17, SamplerSettings())),
                       window_pixel_frames=17, seed=seed)


def test_windows_get_per_frame_timesteps_memory_and_local_positions(tiny_engine):
    calls = []
    experts = tuple(Spy(e, calls) for e in tiny_engine.m2v_experts)
    memory = torch.randn(2, 16, 4, 8, generator=torch.Generator().manual_seed(5))
    sampler = sampler_for(tiny_engine, [WindowRunner("cpu", experts)], memory=memory)
    base = torch.randn(16, 5, 4, 8, generator=torch.Generator().manual_seed(6))
    out = list(sampler.run(base, total=7))
    assert len(out) == 7 and all(f.shape == (16, 4, 8) for f in out)
    assert calls and all(frames == 2 + 5 for frames, _, _ in calls)  # memory + one native window, always
    assert all(positions == memory_time_positions(2, 5) == [-10, -5, 0, 1, 2, 3, 4] for _, _, positions in calls)
    for _, timesteps, _ in calls:
        video_t = timesteps[2:]
        assert video_t == sorted(video_t) and len(set(video_t)) == 5  # the diagonal: one level per frame
    # memory conditions every window: the same queue without memory gives other frames
    plain = list(sampler_for(tiny_engine, [WindowRunner("cpu", tiny_engine.m2v_experts)]).run(base, total=7))
    assert not torch.equal(torch.stack(out), torch.stack(plain))


def test_windows_are_independent_of_how_many_runners_run_them(tiny_engine, tiny_preset):
    other = Engine(tiny_preset)  # a second copy of the experts, as on a second GPU of a group
    base = torch.randn(16, 5, 4, 8, generator=torch.Generator().manual_seed(7))
    calls = {}
    for lookahead in (False, True):
        one = sampler_for(tiny_engine, [WindowRunner("cpu", tiny_engine.m2v_experts)], lookahead=lookahead)
        two = sampler_for(tiny_engine, [WindowRunner("cpu", tiny_engine.m2v_experts), WindowRunner("cpu", other.m2v_experts)],
                          lookahead=lookahead)
        assert torch.equal(torch.stack(list(one.run(base, 6))), torch.stack(list(two.run(base, 6))))
        assert one.calls == two.calls
        calls[lookahead] = one.calls
    # lookahead: 4 windows per iteration instead of 2 (a plain window that straddles the expert
    # boundary runs both experts, so plain calls are 3 per iteration here)
    assert calls == {False: 6 * 3, True: 6 * 4}


def test_a_gpu_group_spreads_windows_over_its_devices_with_the_same_result(tiny_engine, tiny_preset):
    group = Engine(tiny_preset)
    add_window_devices(group, ["cpu"])  # a second device of the group (CPU here), its own experts
    plan = ShotPlan("story:g", "a long pier at dusk", "", 4, 64, 32, 33, SamplerSettings(steps=2), use_t2v=True)
    alone = render_fifo_shot(tiny_engine, plan, FifoSettings(5, 2))
    spread = render_fifo_shot(group, plan, FifoSettings(5, 2))
    assert np.array_equal(np.stack(list(alone.frames)), np.stack(list(spread.frames)))
    assert (alone.stats["runners"], spread.stats["runners"]) == (1, 2) and alone.model == "t2v"


# -- a long shot through the driver --------------------------------------------------------------
def test_a_long_shot_is_rendered_by_fifo_and_streamed(tiny_engine, tmp_path, monkeypatch):
    story = check_against_model(parse_story({"seed": 2, "resolution": "64x32", "steps": 2, "shots": [
        {"prompt": "a harbour at dawn"}, {"prompt": "the boat sails out, a long take", "cut": False, "frames": 37},
        {"prompt": "the harbour at night", "frames": 33, "fifo": {"partitions": 1, "lookahead": True}}]}),
        tiny_engine.preset.model_limits())
    assert [s.mode for s in story.shots] == ["auto", "fifo", "fifo"]  # longer than the native 17 frames
    pushed, written = [], []
    push = StreamingDecoder.push
    monkeypatch.setattr(StreamingDecoder, "push", lambda self, z: pushed.append(len(written)) or push(self, z))
    real_stream = video.write_mp4_stream

    def counting(path, frames, fps, **kw):
        def tap():
            for f in frames:
                written.append(1)
                yield f
        return real_stream(path, tap(), fps, **kw)

    monkeypatch.setattr(video, "write_mp4_stream", counting)
    manifest = StoryRenderer(tiny_engine).render(story, tmp_path / "out")
    long, looked = manifest["shots"][1], manifest["shots"][2]
    assert (long["mode"], long["frames"], long["rendered_frames"]) == ("fifo", 36, 37)  # MI2V's first frame dropped
    assert long["fifo"]["latent_frames"] == 10 and long["fifo"]["levels"] == 10 and long["memory_keyframes"]
    assert (looked["mode"], looked["frames"], looked["fifo"]["lookahead"], looked["fifo"]["levels"]) == ("fifo", 33, True, 5)
    for entry in (long, looked):
        clip = video.read_mp4(tmp_path / "out" / entry["file"])
        assert clip.shape == (entry["frames"], 32, 64, 3) and sha256_file(tmp_path / "out" / entry["file"]) == entry["sha256"]
    assert manifest["shots"][0]["mode"] == "m2v"
    # frames reach the encoder as they are decoded: before each latent frame is decoded, every
    # frame of the ones before it has been encoded (nothing of the shot's length is held)
    start = 0
    for count, repeated in ((10, 1), (9, 0)):  # latent frames of each FIFO shot, frames it drops
        before_push, start = pushed[start:start + count], start + count
        assert [n - before_push[0] for n in before_push] == [0] + [1 + 4 * k - repeated for k in range(count - 1)]


MEASURE = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from storyfarm.m2v.render.driver import RenderSettings, StoryRenderer
    from storyfarm.m2v.render.engine import Engine
    from storyfarm.story.presets import load_preset
    from storyfarm.story.format import check_against_model, parse_story

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    engine = Engine(load_preset("tiny"))
    renderer = StoryRenderer(engine, RenderSettings(resolution=(128, 64), steps=2, seed=1))
    out = {}
    for name, frames in (("warm", 9), ("short", 33), ("long", 129)):
        story = check_against_model(parse_story({"shots": [{"prompt": "a long walk on the beach", "frames": frames,
                                                            "mode": "fifo"}]}), engine.preset.model_limits())
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        base = status("VmRSS:")
        renderer.render(story, sys.argv[1] + "/" + name)
        out[name] = {"base": base, "peak": status("VmHWM:")}
    print(json.dumps(out))
""")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_fifo_memory_does_not_grow_with_shot_length(tmp_path):
    """Peak RSS of a fresh process rendering a 33-frame and a 4x longer (129-frame) FIFO shot.

    glibc's malloc is pinned to mmap every allocation over 128 KiB and to give freed memory back
    (otherwise its adaptive thresholds keep freed tensors in the heap and RSS remembers them), so
    RSS follows live memory. Both the whole-process peak and the render's own increment over the
    RSS before it must stay within 15%.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads(done.stdout.strip().splitlines()[-1])
    short, long = m["short"], m["long"]
    assert long["peak"] <= 1.15 * short["peak"], m
    assert long["peak"] - long["base"] <= 1.15 * (short["peak"] - short["base"]), m
    assert len(video.read_mp4(tmp_path / "long" / "shots" / "001_scene01_shot01.mp4")) == 129
