"""One observer for every render (m2v.render.observe): the driver reports every stage of
lifecycle.RENDER_STAGES once and in order, and every denoising step, to the CLI's bars and to a
worker alike, and a cancel stops the shot between steps. Real tiny model, real mp4s."""

import pytest

from storyfarm.m2v.render.driver import StoryRenderer
from storyfarm.m2v.render.observe import Cancelled, RenderObserver
from storyfarm.story.format import check_against_model, parse_story
from storyfarm.story.lifecycle import SHOT_STAGES


class Recorder(RenderObserver):
    def __init__(self, cancel_at_step: int | None = None):
        self.events: list[tuple] = []
        self.cancel_at_step = cancel_at_step

    def story_start(self, story, total_shots):
        self.events.append(("story_start", total_shots))

    def shot_start(self, shot, plan):
        self.events.append(("shot_start", shot.index))

    def stage(self, name, step=0, total=0, detail=""):
        self.events.append((name, step, total))

    def shot_done(self, shot, entry):
        self.events.append(("shot_done", shot.index))

    def stages_of_shot(self, index: int) -> list[str]:
        start = self.events.index(("shot_start", index))
        names = []
        for event in self.events[start + 1:]:
            if event[0] in ("shot_done", "shot_start"):
                break
            if not names or names[-1] != event[0]:
                names.append(event[0])
        return names

    def cancelled(self) -> bool:
        steps = [e for e in self.events if e[0] == "denoise" and e[1]]
        return self.cancel_at_step is not None and len(steps) >= self.cancel_at_step


def story(engine, *shots):
    doc = {"seed": 5, "resolution": "64x32", "frames": 9, "steps": 3, "shots": [{"prompt": p} for p in shots]}
    return check_against_model(parse_story(doc), engine.preset.model_limits())


def test_every_stage_once_in_order_and_every_step(tiny_engine, tmp_path):
    recorder = Recorder()
    s = story(tiny_engine, "a lighthouse at dusk", "the lamp turns on")
    manifest = StoryRenderer(tiny_engine).render(s, tmp_path / "out", observer=recorder)
    assert manifest["shots"][0]["model"] == "t2v"  # no memory to encode: the stage is still reported
    for index in (0, 1):
        assert recorder.stages_of_shot(index) == list(SHOT_STAGES)
    steps = [(e[1], e[2]) for e in recorder.events if e[0] == "denoise" and e[1]]
    assert steps == [(1, 3), (2, 3), (3, 3)] * 2
    assert recorder.events[0] == ("story_start", 2) and recorder.events[-1] == ("shot_done", 1)


def test_cancel_stops_the_shot_between_steps(tiny_engine, tmp_path):
    recorder = Recorder(cancel_at_step=2)
    renderer = StoryRenderer(tiny_engine)
    with pytest.raises(Cancelled):
        renderer.render(story(tiny_engine, "a storm"), tmp_path / "out", observer=recorder, cancel=recorder.cancelled)
    assert [e[1] for e in recorder.events if e[0] == "denoise" and e[1]] == [1, 2]
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_the_command_lines_bars_name_the_stage_after_denoising():
    from rich.console import Console

    from storyfarm.daemon.cli import RichProgress

    with RichProgress(Console(record=True, width=100)) as bars:
        bars.story_start(type("S", (), {"name": "kite", "shots": [None, None]})(), 2)
        shot = type("Shot", (), {"index": 1, "scene": 1, "shot": 2})()
        bars.shot_start(shot, type("Plan", (), {"sampler": type("Sampler", (), {"steps": 3})()})())
        bars.stage("denoise", 3, 3, "low_noise t=12")
        assert bars.bars.tasks[bars.steps].description == "shot 2 of 2 (scene 1.2) steps [low_noise t=12]"
        bars.stage("vae_decode")
        assert bars.bars.tasks[bars.steps].description == "shot 2 of 2 (scene 1.2) [vae decode]"
