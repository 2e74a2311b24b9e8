"""The story's memory: the window rule, ids, persistence and crash-consistent resume."""

import json

import numpy as np
import pytest
import torch

from storyfarm.m2v.memory import bank as memory_mod
from storyfarm.m2v.memory.bank import MemoryBank, window
from storyfarm.story.numbering import keyframe_id


# ---- window ----------------------------------------------------------------------------------
def test_window_keeps_long_term_head_plus_recent_tail():
    items = list(range(15))
    assert window(items, long_term=3, max_size=10) == [0, 1, 2, 8, 9, 10, 11, 12, 13, 14]


def test_window_defaults_are_storymem_3_and_10():
    assert window(list(range(11))) == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 9, 10])
def test_window_keeps_everything_up_to_max_size(n):
    assert window(list(range(n)), long_term=3, max_size=10) == list(range(n))


def test_window_fewer_than_long_term():
    assert window(["a", "b"], long_term=3, max_size=10) == ["a", "b"]
    assert window(["a", "b"], long_term=3, max_size=1) == ["a"]


def test_window_long_term_at_or_above_max_size_keeps_the_first():
    items = list(range(8))
    assert window(items, long_term=5, max_size=5) == [0, 1, 2, 3, 4]
    assert window(items, long_term=7, max_size=4) == [0, 1, 2, 3]


def test_window_without_long_term_is_a_sliding_window():
    assert window(list(range(8)), long_term=0, max_size=3) == [5, 6, 7]


def test_window_size_zero_and_bad_arguments():
    assert window(list(range(5)), long_term=3, max_size=0) == []
    assert window([], long_term=0, max_size=0) == []
    with pytest.raises(ValueError):
        window([1], long_term=-1)


def test_window_counts_keyframes_not_shots():
    # 5 shots of 3 keyframes each: the window holds 10 keyframes, not 10 shots
    ids = [keyframe_id(s, f) for s in range(5) for f in (0, 40, 80)]
    got = window(ids, long_term=3, max_size=10)
    assert len(got) == 10
    assert got[:3] == ["s001f001", "s001f041", "s001f081"]
    assert got[3:] == ids[-7:]


# ---- bank ------------------------------------------------------------------------------------
def image(seed, h=16, w=24):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def emb(seed, d=8):
    v = torch.randn(d, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def shot(shot_index, frames):
    return [(f, image(100 * shot_index + f), emb(100 * shot_index + f)) for f in frames]


def assert_same_bank(a: MemoryBank, b: MemoryBank):
    assert a.snapshot() == b.snapshot()
    for x, y in zip(a.keyframes, b.keyframes):
        assert (x.id, x.source, x.shot_index, x.frame_index) == (y.id, y.source, y.shot_index, y.frame_index)
        assert (x.embedding is None) == (y.embedding is None)
        if x.embedding is not None:
            assert torch.equal(x.embedding, y.embedding)
    ids = a.snapshot()
    for p, q in zip(a.images(ids), b.images(ids)):
        assert np.array_equal(p, q)


def test_ids_order_and_contents(tmp_path):
    bank = MemoryBank(tmp_path / "mem")
    refs = bank.add_references([image(1), image(2)], embeddings=[emb(1), emb(2)])
    assert [k.id for k in refs] == ["ref00", "ref01"]
    bank.add_shot_keyframes(0, shot(0, [0, 40]))
    bank.add_shot_keyframes(1, shot(1, [7]))
    assert bank.snapshot() == ["ref00", "ref01", "s001f001", "s001f041", "s002f008"]
    assert [k.source for k in bank.keyframes] == ["reference"] * 2 + ["shot"] * 3
    assert bank.get(["s001f041"])[0].shot_index == 0 and bank.get(["s001f041"])[0].frame_index == 40
    assert np.array_equal(bank.images(["s002f008", "ref01"])[0], image(107))
    assert np.array_equal(bank.images(["s002f008", "ref01"])[1], image(2))
    embs = bank.embeddings()
    assert embs.shape == (5, 8) and embs.dtype == torch.float32
    assert torch.equal(embs[3], emb(40))
    with pytest.raises(KeyError):
        bank.get(["nope"])


def test_empty_bank(tmp_path):
    bank = MemoryBank(tmp_path)
    assert bank.embeddings() is None and bank.snapshot() == [] and bank.window_ids() == []
    bank.add_shot_keyframes(0, [])  # a shot with no keyframes is valid
    assert MemoryBank.load(tmp_path).snapshot() == []


def test_references_without_embeddings_and_custom_ids(tmp_path):
    bank = MemoryBank(tmp_path)
    bank.add_references([image(1)], ids=["hero"])
    bank.add_references([image(2)])
    assert bank.snapshot() == ["hero", "ref01"]
    assert bank.embeddings() is None
    bank.add_shot_keyframes(0, shot(0, [3]))
    assert bank.embeddings().shape == (1, 8)  # only keyframes that have an embedding
    bank.add_references([image(3)], for_shot=1)  # a shot's own references join mid-story
    assert bank.snapshot() == ["hero", "ref01", "s001f004", "ref02"]
    assert_same_bank(bank, MemoryBank.load(tmp_path))
    with pytest.raises(ValueError):
        bank.add_references([image(4)], ids=["hero"])
    with pytest.raises(ValueError):
        MemoryBank(tmp_path / "other").add_references([image(1)], ids=["../escape"])


def test_persistence_round_trip_and_layout(tmp_path):
    root = tmp_path / "story" / "memory"
    bank = MemoryBank(root)
    bank.add_references([image(1)], embeddings=emb(1)[None])
    bank.add_shot_keyframes(0, shot(0, [0, 80]))
    index = json.loads((root / "memory.json").read_text())
    assert [r["id"] for r in index["keyframes"]] == ["ref00", "s001f001", "s001f081"]
    assert (root / "embeddings.safetensors").is_file()
    assert sorted(p.name for p in root.iterdir()) == [
        "embeddings.safetensors", "memory.json", "ref00.png", "s001f001.png", "s001f081.png"]

    loaded = MemoryBank.load(root)
    assert_same_bank(bank, loaded)
    loaded.add_shot_keyframes(1, shot(1, [5]))  # a resumed story keeps growing
    assert MemoryBank.open(root).snapshot() == ["ref00", "s001f001", "s001f081", "s002f006"]
    with pytest.raises(FileExistsError):
        MemoryBank(root)


def test_window_ids_and_memory_before_each_shot(tmp_path):
    bank = MemoryBank(tmp_path)
    bank.add_references([image(1), image(2)], embeddings=[emb(1), emb(2)])
    windows, snapshots, images = {}, {}, {}
    for s in range(5):
        windows[s], snapshots[s] = bank.window_ids(long_term=3, max_size=5), bank.snapshot()
        images[s] = bank.images(windows[s])
        bank.add_shot_keyframes(s, shot(s, [0, 50]))
    assert bank.window_ids(3, 5) == ["ref00", "ref01", "s001f001", "s005f001", "s005f051"]
    assert windows[0] == ["ref00", "ref01"]
    assert windows[2] == ["ref00", "ref01", "s001f001", "s002f001", "s002f051"]
    # later, from the ids alone (here after a reload), each shot's memory is exactly what it saw
    later = MemoryBank.load(tmp_path)
    for s in range(5):
        assert window(snapshots[s], long_term=3, max_size=5) == windows[s]
        assert snapshots[s] == later.snapshot()[: len(snapshots[s])]
        for a, b in zip(later.images(windows[s]), images[s]):
            assert np.array_equal(a, b)
    assert later.embeddings(windows[2]).shape == (5, 8)


def test_retried_shot_replaces_its_keyframes(tmp_path):
    bank = MemoryBank(tmp_path)
    bank.add_shot_keyframes(0, shot(0, [0]))
    bank.add_shot_keyframes(1, shot(1, [0, 40]))
    new = [(10, image(999), emb(999))]
    bank.add_shot_keyframes(1, new)  # shot 1 re-run after a crash
    assert bank.snapshot() == ["s001f001", "s002f011"]
    assert not (tmp_path / "s002f041.png").exists()
    assert_same_bank(bank, MemoryBank.load(tmp_path))
    assert np.array_equal(MemoryBank.load(tmp_path).images(["s002f011"])[0], image(999))


def test_rerendered_shot_replaces_its_keyframes_in_place(tmp_path):
    bank = MemoryBank(tmp_path)
    bank.add_references([image(1)], embeddings=[emb(1)], labels=["lena"])
    bank.add_shot_keyframes(0, shot(0, [0, 5]))
    bank.add_references([image(2)], embeddings=[emb(2)], for_shot=1, labels=["harbour"])
    bank.add_shot_keyframes(1, shot(1, [3]))
    bank.add_shot_keyframes(2, shot(2, [1]))
    before = {s: bank.before(s) for s in range(4)}
    assert before[1] == ["ref00", "s001f001", "s001f006", "ref01"]  # a shot sees its own references
    assert before[2] == before[1] + ["s002f004"] and before[3] == before[2] + ["s003f002"]
    # shot 0 re-rendered with an edit: new keyframes at its place, later shots keep theirs
    bank.add_shot_keyframes(0, [(7, image(70), emb(70))])
    assert bank.snapshot() == ["ref00", "s001f008", "ref01", "s002f004", "s003f002"]
    assert not (tmp_path / "s001f001.png").exists() and (tmp_path / "s003f002.png").exists()
    assert bank.before(2) == ["ref00", "s001f008", "ref01", "s002f004"]
    reloaded = MemoryBank.load(tmp_path)
    assert_same_bank(bank, reloaded)
    assert [k.label for k in reloaded.keyframes] == ["lena", None, "harbour", None, None]
    # the window over a snapshot: the story's references are long-term however many there are
    assert bank.window_ids(long_term=0, max_size=2, shot_index=2) == ["ref00", "s002f004"]
    assert bank.window_ids(long_term=0, max_size=2) == ["ref00", "s003f002"]


def test_shot_keyframe_ids_count_from_1_and_a_bank_with_0_based_ids_keeps_its_scheme(tmp_path, monkeypatch):
    bank = MemoryBank(tmp_path / "new")
    bank.add_shot_keyframes(0, shot(0, [0]))
    assert [(k.id, k.shot_index, k.frame_index) for k in bank.keyframes] == [("s001f001", 0, 0)]
    # a bank written before ids counted from 1 (s000f000 = shot index 0, frame index 0): a re-render
    # of its shot 1 picking frame 39 would be s001f040 in the new scheme, the id of shot 2's frame 41
    monkeypatch.setattr(memory_mod, "keyframe_id", lambda s, f: f"s{s:03d}f{f:03d}")
    old = MemoryBank(tmp_path / "old")
    old.add_shot_keyframes(0, shot(0, [0]))
    old.add_shot_keyframes(1, shot(1, [40]))
    monkeypatch.undo()
    assert old.snapshot() == ["s000f000", "s001f040"]
    old.add_shot_keyframes(0, shot(0, [39]))
    assert MemoryBank.load(tmp_path / "old").snapshot() == ["s000f039", "s001f040"]


def test_invalid_additions_change_nothing(tmp_path):
    bank = MemoryBank(tmp_path)
    bank.add_references([image(1)], embeddings=[emb(1)])
    bank.add_shot_keyframes(0, shot(0, [0]))
    with pytest.raises(ValueError, match="embedding sizes"):
        bank.add_shot_keyframes(1, [(0, image(1), torch.ones(4))])
    with pytest.raises(ValueError, match="image"):
        bank.add_shot_keyframes(1, [(0, image(1).astype(np.float32), emb(1))])
    with pytest.raises(ValueError):
        bank.add_shot_keyframes(1, [(3, image(1), emb(1)), (3, image(2), emb(2))])  # same id twice
    with pytest.raises(ValueError, match="embedding sizes"):  # a bad retry keeps the old keyframes
        bank.add_shot_keyframes(0, [(1, image(1), torch.ones(4))])
    assert bank.snapshot() == ["ref00", "s001f001"]
    assert MemoryBank.load(tmp_path).snapshot() == ["ref00", "s001f001"]


def test_crash_before_the_index_is_written_resumes_the_previous_memory(tmp_path, monkeypatch):
    bank = MemoryBank(tmp_path)
    bank.add_shot_keyframes(0, shot(0, [0, 40]))

    def crash(*args, **kwargs):
        raise OSError("power cut")

    monkeypatch.setattr(MemoryBank, "_write_index", crash)
    with pytest.raises(OSError):
        bank.add_shot_keyframes(1, shot(1, [3]))
    assert bank.snapshot() == ["s001f001", "s001f041"]  # in-memory view not advanced either
    monkeypatch.undo()

    resumed = MemoryBank.load(tmp_path)
    assert resumed.snapshot() == ["s001f001", "s001f041"]
    assert torch.equal(resumed.embeddings()[1], emb(40))
    resumed.add_shot_keyframes(1, shot(1, [3]))  # the re-run shot overwrites the leftovers
    assert_same_bank(resumed, MemoryBank.load(tmp_path))


def test_crash_while_replacing_a_retried_shot(tmp_path, monkeypatch):
    bank = MemoryBank(tmp_path)
    bank.add_shot_keyframes(0, shot(0, [0]))
    bank.add_shot_keyframes(1, shot(1, [2]))
    real = memory_mod.save_png

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(memory_mod, "save_png", crash)
    with pytest.raises(OSError):
        bank.add_shot_keyframes(1, [(2, image(5), emb(5))])  # same id, new content
    monkeypatch.setattr(memory_mod, "save_png", real)
    resumed = MemoryBank.load(tmp_path)
    assert resumed.snapshot() == ["s001f001"]  # old shot-1 keyframes removed first, new not committed
    resumed.add_shot_keyframes(1, [(2, image(5), emb(5))])
    again = MemoryBank.load(tmp_path)
    assert torch.equal(again.embeddings()[1], emb(5))
    assert np.array_equal(again.images(["s002f003"])[0], image(5))


def test_rewind_restores_the_memory_before_a_shot(tmp_path):
    bank = MemoryBank(tmp_path)
    bank.add_references([image(1)], embeddings=[emb(1)])  # story-level: kept for good
    bank.add_shot_keyframes(0, shot(0, [0, 5]))
    bank.add_references([image(2)], embeddings=[emb(2)], for_shot=1)  # joined before shot 1
    bank.add_shot_keyframes(1, shot(1, [3]))
    bank.add_shot_keyframes(2, shot(2, [1]))
    assert bank.snapshot() == ["ref00", "s001f001", "s001f006", "ref01", "s002f004", "s003f002"]
    assert bank.rewind(1) == 3  # shot 1's reference and keyframes, and everything after
    assert bank.snapshot() == ["ref00", "s001f001", "s001f006"]
    assert MemoryBank.load(tmp_path).snapshot() == bank.snapshot()  # on disk too
    assert not (tmp_path / "s003f002.png").exists()
    assert bank.rewind(5) == 0
    # re-adding shot 1's reference gets the same id again
    assert [k.id for k in bank.add_references([image(2)], embeddings=[emb(2)], for_shot=1)] == ["ref01"]
