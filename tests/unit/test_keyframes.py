"""Keyframe selection: the StoryMem rule on hand-made embeddings, the CLIP embedder, the gates."""

import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from storyfarm.m2v.memory import keyframes as kf
from storyfarm.m2v.memory.keyframes import (
    HPSv3Gate, KeyframeSelector, NoGate, OpenCLIPEmbedder, QualityGate, TransformersCLIPEmbedder,
    build_tiny_clip_embedder, make_gate, select_keyframes,
)


def at_angles(*degrees):
    """Unit vectors in a plane: cosine similarity of two rows is cos(angle between them)."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin(), torch.zeros_like(rad)], 1).float()


ALL = [True] * 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models are latency-bound; extra intra-op threads only add contention on busy CI."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- the rule --------------------------------------------------------------------------------
def test_accepts_the_first_frame_then_frames_unlike_the_last_accepted():
    # 20 deg apart -> sim 0.94 (kept out), 40 deg -> 0.77 (in). Frame 2 is compared with the last
    # ACCEPTED frame (0), not with its neighbour (1), so it is accepted.
    emb = at_angles(0, 20, 40, 50)
    assert select_keyframes(emb, ALL[:4], None) == [0, 2]


def test_adaptive_threshold_stops_at_the_first_threshold_giving_few_enough():
    # 30 deg steps: consecutive sims 0.866, two steps apart 0.5. At 0.9 all 5 frames are accepted
    # (> 3); at 0.86 (the first threshold <= 0.866) frames 0, 2, 4 -> exactly 3. Going on to <= 0.5
    # would give [0, 3], so an answer of 2 frames means the loop overshot.
    emb = at_angles(0, 30, 60, 90, 120)
    decision = kf._decide(emb, ALL[:5], None, threshold=0.9, max_keyframes=3, step=0.01, dedupe_threshold=0.9)
    assert decision.keyframes == [0, 2, 4]
    assert decision.threshold == pytest.approx(0.86)
    assert select_keyframes(emb, ALL[:5], None) == [0, 2, 4]
    assert select_keyframes(emb, ALL[:5], None, max_keyframes=5) == [0, 1, 2, 3, 4]
    assert select_keyframes(emb, ALL[:5], None, max_keyframes=2) == [0, 3]


def test_step_sets_the_granularity():
    emb = at_angles(0, 30, 60, 90, 120)
    d = kf._decide(emb, ALL[:5], None, threshold=0.9, max_keyframes=3, step=0.1, dedupe_threshold=0.9)
    assert d.keyframes == [0, 2, 4] and d.threshold == pytest.approx(0.8)
    with pytest.raises(ValueError):
        select_keyframes(emb, ALL[:5], None, step=0)


def test_adaptive_loop_is_bounded():
    # v, -v, v, -v, ...: every frame differs from the last accepted at any threshold > -1
    emb = at_angles(*[0, 180] * 4)
    d = kf._decide(emb, ALL[:8], None, threshold=0.9, max_keyframes=3, step=0.01, dedupe_threshold=0.9)
    assert d.keyframes == [0, 1, 2]
    assert d.threshold <= 0


def test_gate_rejection():
    emb = at_angles(0, 10, 90, 95, 180)
    # frame 0 fails: the first PASSING frame (1) is the first keyframe
    assert select_keyframes(emb, [False, True, True, True, True], None) == [1, 2, 4]
    # a rejected frame never becomes "the last accepted": 3 is compared with 1, not with 2
    assert select_keyframes(emb, [True, True, False, True, False], None) == [0, 3]
    assert select_keyframes(emb, [False] * 5, None) == []


def test_dedupe_against_memory_after_the_cap():
    emb = at_angles(0, 30, 60, 90, 120)
    memory = at_angles(61, 200)  # ~ frame 2 (sim 0.9998); the other is far from everything
    assert select_keyframes(emb, ALL[:5], memory) == [0, 4]  # not topped up from the rejected frames
    assert select_keyframes(emb, ALL[:5], memory, dedupe_threshold=0.99999) == [0, 2, 4]
    assert select_keyframes(emb, ALL[:5], torch.empty(0, 3)) == [0, 2, 4]
    # unnormalised input is normalised before comparing
    assert select_keyframes(emb * 7, ALL[:5], memory * 3) == [0, 4]


def test_empty_results_are_valid():
    assert select_keyframes(torch.empty(0, 4), [], None) == []
    assert select_keyframes(at_angles(0, 90), [True, True], None, max_keyframes=0) == []
    assert select_keyframes(at_angles(0), [True], at_angles(0)) == []  # everything already in memory
    with pytest.raises(ValueError):
        select_keyframes(at_angles(0, 90), [True], None)


def sequential_rule(emb, passes, threshold=0.9, limit=3, step=0.01):
    """The adaptive loop as StoryMem runs it: one whole walk per threshold, lowered while too many."""
    sim = F.normalize(emb.float(), dim=-1) @ F.normalize(emb.float(), dim=-1).T
    rounds = 0
    while True:
        current, accepted = threshold - rounds * step, []
        for i in range(len(passes)):
            if passes[i] and (not accepted or sim[accepted[-1], i] < current):
                accepted.append(i)
                if len(accepted) > limit:
                    break
        if len(accepted) <= limit:
            return accepted
        if current <= 0:
            return accepted[:limit]
        rounds += 1


def test_walking_all_thresholds_at_once_is_the_adaptive_loop():
    """The walks run side by side, frame by frame, decide as the loop that walks again per threshold."""
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n, dim = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(2, 5, (1,), generator=g))
        drift = torch.randn(n, dim, generator=g).cumsum(0)  # neighbours alike, as in a shot
        emb = drift + 0.5 * torch.randn(n, dim, generator=g)
        passes = (torch.rand(n, generator=g) > 0.2).tolist()
        limit, step = int(torch.randint(1, 5, (1,), generator=g)), [0.01, 0.05, 0.3][trial % 3]
        assert select_keyframes(emb, passes, None, max_keyframes=limit, step=step) == \
            sequential_rule(emb, passes, limit=limit, step=step), trial


# ---- embedders -------------------------------------------------------------------------------
def textured_frames(n=4, h=48, w=80, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_clip_embedder(seed=0)


def test_clip_preprocessing_normalises_with_clip_statistics():
    mean_grey = np.round(np.array(kf.CLIP_MEAN) * 255).astype(np.uint8)
    frames = np.broadcast_to(mean_grey, (2, 50, 70, 3)).copy()
    pixels = kf.clip_pixels(torch.from_numpy(frames), 32)
    assert pixels.shape == (2, 3, 32, 32)
    assert pixels.abs().max() < 0.01  # the CLIP mean colour maps to ~0
    white = kf.clip_pixels(torch.full((1, 40, 40, 3), 255, dtype=torch.uint8), 32)
    expected = (1 - torch.tensor(kf.CLIP_MEAN)) / torch.tensor(kf.CLIP_STD)
    assert torch.allclose(white[0, :, 0, 0], expected, atol=1e-4)


def test_clip_preprocessing_keeps_the_whole_frame():
    """StoryMem squashes the frame to the square input: the sides of a wide frame stay visible."""
    frames = torch.zeros(1, 32, 96, 3, dtype=torch.uint8)
    frames[:, :, :32] = 255  # the left third is white; a centre crop would lose it entirely
    pixels = kf.clip_pixels(frames, 32)
    white = (1 - kf.CLIP_MEAN[0]) / kf.CLIP_STD[0]
    black = (0 - kf.CLIP_MEAN[0]) / kf.CLIP_STD[0]
    assert torch.allclose(pixels[0, 0, :, :8], torch.full((32, 8), white), atol=1e-3)
    assert torch.allclose(pixels[0, 0, :, -8:], torch.full((32, 8), black), atol=1e-3)


def test_tiny_clip_embedder_shapes_norms_and_identity(tiny):
    frames = textured_frames()
    frames[3] = frames[1]
    emb = tiny.embed(frames)
    assert emb.shape == (4, 32) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)
    sims = emb @ emb.T
    assert sims[1, 3] == pytest.approx(1.0, abs=1e-5)
    assert sims[0, 1] < 0.9999
    assert tiny.embed(frames[:0]).shape[0] == 0


def test_tiny_clip_embedder_is_deterministic_per_seed(tiny):
    frames = textured_frames(3, seed=1)
    state = torch.random.get_rng_state()
    again = build_tiny_clip_embedder(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # building does not disturb global RNG
    assert torch.equal(tiny.embed(frames), again.embed(frames))
    assert not torch.allclose(tiny.embed(frames), build_tiny_clip_embedder(seed=1).embed(frames))


def test_batching_does_not_change_embeddings(tiny):
    frames = textured_frames(5, seed=2)
    small = TransformersCLIPEmbedder(tiny.model, batch_size=2)
    assert torch.allclose(small.embed(frames), tiny.embed(frames), atol=1e-6)


def test_from_pretrained_full_clip_checkpoint_matches_clip_features(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(tmp_path)

    embedder = TransformersCLIPEmbedder.from_pretrained(tmp_path)
    assert embedder.image_size == 32
    frames = textured_frames(3, seed=3)
    pixels = kf.clip_pixels(torch.from_numpy(frames), 32)
    with torch.no_grad():
        reference = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    assert torch.allclose(embedder.embed(frames), reference, atol=1e-5)
    assert torch.allclose(TransformersCLIPEmbedder(model).embed(frames), reference, atol=1e-5)


def test_from_pretrained_vision_checkpoints(tmp_path, tiny):
    from transformers import CLIPVisionModel

    tiny.model.save_pretrained(tmp_path / "with_projection")
    frames = textured_frames(2, seed=4)
    loaded = TransformersCLIPEmbedder.from_pretrained(tmp_path / "with_projection")
    assert torch.allclose(loaded.embed(frames), tiny.embed(frames), atol=1e-6)

    CLIPVisionModel(tiny.model.config).save_pretrained(tmp_path / "no_projection")
    with pytest.raises(ValueError, match="visual_projection"):
        TransformersCLIPEmbedder.from_pretrained(tmp_path / "no_projection")


def test_open_clip_backend_reports_why_it_is_unavailable():
    try:
        import open_clip  # noqa: F401
    except Exception:
        with pytest.raises(ImportError, match="torchvision"):
            OpenCLIPEmbedder("ViT-B-32", pretrained="/nonexistent")
        pytest.skip("open_clip does not import: it needs torchvision, which has no CPU build for this torch")
    pytest.skip("open_clip imports here but no local ViT-B-32 checkpoint is available to load")


# ---- gates -----------------------------------------------------------------------------------
def quality_frames():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:96, 0:128].astype(np.float32)
    base = 128 + 50 * np.sin(x / 6) * np.cos(y / 9) + rng.normal(0, 25, (96, 128))
    sharp = np.repeat(np.clip(base, 0, 255)[..., None], 3, -1).astype(np.uint8)
    t = torch.from_numpy(sharp).permute(2, 0, 1)[None].float()
    blurred = F.avg_pool2d(F.pad(t, (4, 4, 4, 4), mode="replicate"), 9, stride=1)
    blurred = blurred[0].permute(1, 2, 0).round().byte().numpy()
    dark = (sharp.astype(np.float32) * 0.08).astype(np.uint8)
    return {
        "sharp": sharp,
        "blurred": blurred,
        "flat_grey": np.full_like(sharp, 128),
        "black": np.zeros_like(sharp),
        "white": np.full_like(sharp, 255),
        "dark": dark,
    }


def test_quality_gate_orders_frames_sensibly():
    frames = quality_frames()
    gate = QualityGate(threshold=3.0)
    score = dict(zip(frames, gate.scores(np.stack(list(frames.values())))))
    assert score["sharp"] > 7
    assert score["blurred"] < 0.5 * score["sharp"]
    for bad in ("flat_grey", "black", "white", "dark"):
        assert score[bad] < gate.threshold < score["sharp"], (bad, score)
    assert gate.passes(np.stack([frames["sharp"], frames["black"]])) == [True, False]
    assert all(0 <= s <= 10 for s in score.values())


def test_quality_score_does_not_depend_much_on_resolution():
    sharp = quality_frames()["sharp"]
    big = np.repeat(np.repeat(sharp, 4, 0), 4, 1)  # 384 x 512, analysed at 256 short side
    gate = QualityGate()
    small_score, big_score = gate.scores(sharp[None])[0], gate.scores(big[None])[0]
    assert big_score == pytest.approx(small_score, abs=1.5)


def test_no_gate_and_make_gate():
    frames = np.zeros((3, 8, 8, 3), np.uint8)
    assert NoGate().passes(frames) == [True] * 3
    assert isinstance(make_gate("off"), NoGate)
    gate = make_gate("quality", threshold=4.5)
    assert isinstance(gate, QualityGate) and gate.threshold == 4.5 and gate.name == "quality"
    with pytest.raises(ValueError, match="hpsv3, quality, off"):
        make_gate("clipiqa")
    for g in (NoGate(), gate):
        assert isinstance(g, kf.AestheticGate)


def test_hpsv3_gate_names_the_config_field_when_weights_are_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=kf.HPSV3_WEIGHTS_FIELD):
        make_gate("hpsv3", weights_path=None)
    with pytest.raises(FileNotFoundError, match=kf.HPSV3_WEIGHTS_FIELD):
        HPSv3Gate(tmp_path / "missing.safetensors")


def test_hpsv3_gate_loads_once_and_scores_with_the_reward_head(tmp_path, monkeypatch):
    weights = tmp_path / "HPSv3.safetensors"
    weights.write_bytes(b"x")
    built, calls = [], []

    class FakeInferencer:
        def __init__(self, config_path=None, checkpoint_path=None, device="cuda"):
            built.append((checkpoint_path, device))

        def reward(self, image_paths, prompts):
            calls.append((len(image_paths), prompts))
            return torch.tensor([[float(np.asarray(im).mean()) / 25.5, 0.1] for im in image_paths])

    monkeypatch.setitem(sys.modules, "hpsv3", types.SimpleNamespace(HPSv3RewardInferencer=FakeInferencer))
    gate = make_gate("hpsv3", weights_path=str(weights), threshold=3.0, device="cpu")
    frames = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (0, 51, 102, 255, 10)])
    for _ in range(3):  # three shots, one model
        assert gate.passes(frames) == [False, False, True, True, False]
    assert built == [(str(weights), "cpu")]
    assert calls[0] == (4, [""] * 4) and calls[1] == (1, [""])


def test_hpsv3_real_model():
    try:
        import hpsv3  # noqa: F401
    except Exception:
        pytest.skip("hpsv3 is not installed (optional 7B reward model; needs its weights configured)")
    pytest.skip("hpsv3 imports but no local HPSv3 checkpoint is configured for tests")


# ---- the selector ----------------------------------------------------------------------------
class ColourEmbedder:
    """Embeds a frame as its normalised mean colour: red and green frames are orthogonal."""

    def embed(self, frames):
        x = torch.as_tensor(np.asarray(frames)).float().mean(dim=(1, 2))
        return F.normalize(x, dim=-1)


def red_then_green(n=81, green=range(45, 81)):
    frames = np.zeros((n, 8, 8, 3), np.uint8)
    frames[:, :, :, 0] = 200
    frames[list(green), :, :, 0], frames[list(green), :, :, 1] = 0, 200
    return frames


def test_selector_walks_every_frame():
    frames = red_then_green()  # red until 44, then green
    selector = KeyframeSelector(ColourEmbedder(), NoGate())
    picked = selector.select(frames)
    assert [i for i, _ in picked] == [0, 45]  # the first green frame itself, not a later sample
    assert torch.allclose(picked[1][1], torch.tensor([0.0, 1.0, 0.0]))
    stats = selector.last_stats
    assert (stats.frames, stats.selected) == (81, 2)
    assert stats.total_s >= stats.embed_s >= 0 and stats.gate_s >= 0

    memory = torch.tensor([[0.0, 1.0, 0.0]])  # green already in memory
    assert [i for i, _ in selector.select(frames, memory)] == [0]
    assert selector.last_stats.duplicates == 1
    assert selector.select(frames[:0]) == []


def test_selector_with_tiny_clip_and_quality_gate(tiny):
    frames = np.stack([quality_frames()["black"]] * 3 + [quality_frames()["sharp"]] * 3)
    selector = KeyframeSelector(tiny, QualityGate(), max_keyframes=3)
    picked = selector.select(frames)
    assert [i for i, _ in picked] == [3]  # black frames fail the gate; identical frames are not new
    assert picked[0][1].shape == (32,)


def test_a_keyframe_between_the_old_samples_is_found():
    """A character crossing the frame for two frames (11 and 12 of 81): the 32 evenly spaced frames
    once scored (0, 3, 5, 8, 10, 13, ...) miss it; walking every frame keeps it."""
    old_samples = {int(round(v)) for v in np.linspace(0, 80, 32)}
    assert not {11, 12} & old_samples
    frames = red_then_green(green=[11, 12])
    picked = KeyframeSelector(ColourEmbedder(), NoGate()).select(frames)
    assert [i for i, _ in picked] == [0, 11, 13]


def test_a_streamed_shot_is_decided_alike_without_being_held(tiny):
    """Frames fed one at a time (a FIFO shot): the same keyframes and images as the shot held whole,
    embedded in batches of `batch_size`, and only images that can still be chosen kept."""
    rng = np.random.default_rng(5)
    scenes = [rng.integers(0, 256, (1, 24, 40, 3), dtype=np.uint8) for _ in range(4)]
    frames = np.concatenate([np.repeat(s, 10, 0) for s in scenes])  # four still scenes of 10 frames
    frames[::3] //= 2  # a flicker, so that near-identical frames still differ
    selector = KeyframeSelector(tiny, NoGate(), batch_size=4, max_keyframes=3)
    whole = selector.select(frames, None)
    embedded, held = [], []
    real_embed = tiny.embed
    tiny.embed = lambda x: embedded.append(len(x)) or real_embed(x)
    try:
        scan = selector.scan()
        for frame in frames:
            scan.add(frame[None])
            held.append(len(scan._images))
        picked = scan.finish(None)
    finally:
        del tiny.embed
    assert [i for i, _, _ in picked] == [i for i, _ in whole] and len(picked) >= 2
    for (i, image, emb), (_, want) in zip(picked, whole):
        assert np.array_equal(image, frames[i]) and torch.allclose(emb, want, atol=1e-6)
    assert set(embedded) == {4} and sum(embedded) == len(frames)
    assert max(held) < len(frames) // 2 and selector.last_stats.frames == len(frames)
