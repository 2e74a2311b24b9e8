"""Settings merge order for a shot: shot, then story, then operator (CLI), then preset."""

from storyfarm.m2v.render.driver import RenderSettings, StoryRenderer
from storyfarm.story.format import parse_story


def plans(engine, settings, doc):
    story = parse_story(doc)
    renderer = StoryRenderer(engine, settings)
    seed = renderer.base_seed(story)
    return [renderer.plan(story, shot, "story:t", seed) for shot in story.shots]


def test_shot_beats_story_beats_operator_beats_preset(tiny_engine):
    doc = {
        "steps": 5,
        "guidance": [4.0, 2.0],
        "shots": [
            {"prompt": "a", "steps": 3, "resolution": "64x32"},
            {"prompt": "b"},
        ],
    }
    first, second = plans(tiny_engine, RenderSettings(steps=9, frames=9, resolution=(96, 64)), doc)
    assert first.sampler.steps == 3 and second.sampler.steps == 5  # shot, then story
    assert (first.width, first.height) == (64, 32) and (second.width, second.height) == (96, 64)  # operator
    assert first.frames == 9  # operator over preset (17)
    assert second.sampler.guidance == (4.0, 2.0)
    preset = tiny_engine.preset.render
    bare = plans(tiny_engine, RenderSettings(), {"shots": [{"prompt": "c"}]})[0]
    assert bare.sampler.steps == preset.steps and bare.frames == preset.frames
    assert (bare.width, bare.height) == tuple(preset.resolution)
    assert bare.sampler.shift == preset.shift and bare.sampler.boundary == preset.boundary
    assert bare.negative_prompt == preset.negative_prompt


def test_seeds_run_over_the_whole_story_not_per_scene(tiny_engine):
    doc = {"seed": 100, "scenes": [{"shots": [{"prompt": "a"}, {"prompt": "b", "seed": 5}]}, {"shots": [{"prompt": "c"}, {"prompt": "d"}]}]}
    assert [p.seed for p in plans(tiny_engine, RenderSettings(), doc)] == [100, 5, 102, 103]
    # the command line's seed replaces the story's; a shot's own seed still wins
    assert [p.seed for p in plans(tiny_engine, RenderSettings(seed=7), doc)] == [7, 5, 9, 10]
