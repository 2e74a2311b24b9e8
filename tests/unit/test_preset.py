"""Presets: packaged ones load with DESIGN.md §4 defaults; bad values name the field."""

import pytest

from storyfarm.story.presets import PresetError, load_preset, packaged_presets


def test_packaged_presets_load():
    assert {"tiny", "wan2.2-i2v-a14b-storymem", "wan2.2-i2v-a14b-storymem-mm2v"} <= set(packaged_presets())
    for name in packaged_presets():
        assert load_preset(name).name == name


def test_real_preset_carries_the_published_defaults(monkeypatch):
    monkeypatch.setenv("STORYFARM_MODELS", "/srv/models")
    p = load_preset("wan2.2-i2v-a14b-storymem")
    r = p.render
    assert (r.resolution, r.frames, r.fps, r.steps, r.shift, r.guidance, r.boundary, r.solver) == (
        (832, 480), 81, 16, 40, 4.0, (3.5, 3.5), 0.9, "unipc")
    assert (p.memory.long_term, p.memory.max_size, p.memory.position_stride) == (3, 10, 5)
    assert (p.keyframes.threshold, p.keyframes.max_per_shot, p.keyframes.step) == (0.9, 3, 0.01)
    assert p.weights.base == "/srv/models/Wan2.2-I2V-A14B-Diffusers"
    assert p.weights.lora.variant == "mi2v" and p.weights.lora.strength == 1.0
    assert load_preset("wan2.2-i2v-a14b-storymem-mm2v").render.continuation == "motion_frames"


def test_relative_paths_resolve_next_to_the_preset(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("name: x\nsource: local\nweights: {base: models/wan}\n")
    assert load_preset(str(f)).weights.base == str(tmp_path / "models" / "wan")


@pytest.mark.parametrize(
    "body, needle",
    [
        ("name: x\nsource: random\narchitecture: {transformer: {}, vae: {}, text_encoder: {}}\nrender: {frames: 80}\n", "render: frames 80"),
        ("name: x\nsource: random\narchitecture: {transformer: {}, vae: {}, text_encoder: {}}\nrender: {stepz: 3}\n", "render.stepz"),
        ("name: x\nsource: local\n", "weights: required"),
        ("name: x\nsource: cloud\n", "source"),
        ("name: x\nsource: random\narchitecture: {transformer: {}, vae: {}, text_encoder: {}}\nrender: {resolution: [100, 64]}\n", "multiples of 16"),
        ("extends: [tiny]\nname: x\n", "extends: expected a preset name"),
        ("extends: nosuch\nname: x\n", "unknown preset 'nosuch'"),
        ("extends: bad.yaml\nname: x\n", "extends: cycle"),  # this file itself
    ],
)
def test_bad_presets_name_the_field(tmp_path, body, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(body)
    with pytest.raises(PresetError, match=needle):
        load_preset(str(f))


def test_unknown_preset_lists_the_packaged_ones():
    with pytest.raises(PresetError, match="tiny"):
        load_preset("no-such-preset")


def test_an_unset_variable_without_a_default_is_an_error_as_in_the_daemon_config(tmp_path, monkeypatch):
    """One ${VAR} expander (storyfarm.story.config) for presets and the daemon config: a preset
    used to keep the literal `${VAR}` in its weight path and fail later, far from the cause."""
    from storyfarm.daemon.config import ConfigError, load_config

    monkeypatch.delenv("SF_TEST_NOPE", raising=False)
    monkeypatch.setenv("SF_TEST_ROOT", "/srv/w")
    f = tmp_path / "p.yaml"
    f.write_text("name: x\nsource: local\nweights: {base: '${SF_TEST_ROOT}/wan', lora: {high_noise: '${SF_TEST_NOPE}/h.safetensors'}}\n")
    with pytest.raises(PresetError, match=r"p.yaml: weights.lora.high_noise: environment variable SF_TEST_NOPE is not set"):
        load_preset(str(f))
    f.write_text("name: x\nsource: local\nweights: {base: '${SF_TEST_ROOT}/wan', t2v: '${SF_TEST_NOPE:-/opt}/t2v'}\n")
    assert (load_preset(str(f)).weights.base, load_preset(str(f)).weights.t2v) == ("/srv/w/wan", "/opt/t2v")
    c = tmp_path / "daemon.yaml"
    c.write_text("data_dir: ${SF_TEST_NOPE}/x\n")
    with pytest.raises(ConfigError, match=r"daemon.yaml: data_dir: environment variable SF_TEST_NOPE is not set"):
        load_config(c)


def test_the_real_size_preset_is_the_tiny_model_at_the_production_shot_size():
    tiny, big = load_preset("tiny"), load_preset("tiny-480p")
    assert big.name == "tiny-480p" and big.seed == tiny.seed
    assert big.architecture.transformer == tiny.architecture.transformer  # the same M2V model
    assert big.architecture.vae == {**tiny.architecture.vae, "base_dim": 8}  # a narrower VAE, the same latents
    r = big.render
    assert (r.resolution, r.frames, r.fps, r.guidance) == ((832, 480), 81, 16, (1.0, 1.0))
    assert (r.shift, r.solver, r.boundary) == (tiny.render.shift, tiny.render.solver, tiny.render.boundary)
    assert big.memory == tiny.memory and big.keyframes == tiny.keyframes


def test_extends_merges_a_variant_over_its_base_and_resolves_paths_next_to_each_file(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "wan.yaml").write_text(
        "name: wan\ndescription: base\nsource: local\nweights: {base: models/wan, clip: models/clip}\nrender: {steps: 40}\n")
    (tmp_path / "fast.yaml").write_text("extends: base/wan.yaml\nname: fast\nrender: {steps: 4}\nweights: {clip: mine/clip}\n")
    p = load_preset(str(tmp_path / "fast.yaml"))
    assert (p.name, p.description, p.render.steps) == ("fast", "", 4)
    assert p.weights.base == str(tmp_path / "base" / "models" / "wan")  # the base's path, next to the base
    assert p.weights.clip == str(tmp_path / "mine" / "clip")  # the variant's own, next to the variant

