"""Log lines: JSON objects with the ids a search needs, text lines with the same context, and the
dispatch observer that writes one line per attempt, story end and worker event. Structured values
(a worker's warm-up report, a Ray cluster's resources) are JSON fields, never reprs in `message`."""

from __future__ import annotations

import io
import json
import logging

import sys
import types

import pytest

from storyfarm.daemon.logs import JsonFormatter, LogObserver, TextFormatter, configure_logging
from storyfarm.scheduler.gpu_pool.messages import Failed, ShotTask


def capture(formatter, name: str | None = None, monkeypatch=None) -> tuple[logging.Logger, io.StringIO]:
    """A logger (a fresh one, or the module logger `name`, restored by `monkeypatch`) that writes
    only to the returned stream, in `formatter`'s format."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(name or f"storyfarm.test.{id(stream)}")
    setattr_ = monkeypatch.setattr if monkeypatch else lambda obj, key, value: setattr(obj, key, value)
    setattr_(logger, "handlers", [handler])
    setattr_(logger, "propagate", False)
    setattr_(logger, "level", logging.DEBUG)
    return logger, stream


WARMUP = {"seconds": 12.5, "forwards": 4, "memory_counts": [0, 3], "attention": {"backend": "sdpa"},
          "compile": {"high_noise": {"recompiles": 0}}}


def test_json_lines_carry_context_and_exceptions():
    logger, stream = capture(JsonFormatter())
    logger.info("shot %d done", 3, extra={"story_id": "st_1", "shot_id": "sh_2", "worker": "w0", "ignored": 1})
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        logger.exception("it broke: %s", "ünïcode")
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first["message"] == "shot 3 done" and first["level"] == "info"
    assert (first["story_id"], first["shot_id"], first["worker"]) == ("st_1", "sh_2", "w0")
    assert "ignored" not in first and first["time"].endswith("Z") and "T" in first["time"]
    assert second["level"] == "error" and second["message"] == "it broke: ünïcode"
    assert "RuntimeError: boom" in second["exc"] and "story_id" not in second


def test_text_lines_end_with_the_context():
    logger, stream = capture(TextFormatter())
    logger.warning("late", extra={"story_id": "st_9", "shot_index": 0})
    assert stream.getvalue().rstrip().endswith("late [story_id=st_9 shot_index=0]")


def test_configure_logging_replaces_root_handlers_and_refuses_unknown_formats():
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        stream = io.StringIO()
        handler = configure_logging("json", logging.INFO, stream)
        assert root.handlers == [handler]
        logging.getLogger("storyfarm.x").info("hello", extra={"project": "ads"})
        logging.getLogger("storyfarm.x").debug("hidden")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert [(r["message"], r["project"]) for r in lines] == [("hello", "ads")]
        with pytest.raises(ValueError, match="log_format: 'xml' is not one of text, json"):
            configure_logging("xml")
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def test_log_observer_writes_one_line_per_farm_event_with_ids():
    logger, stream = capture(JsonFormatter())
    observer = LogObserver(logger)
    task = ShotTask("at_1", "st_1", "sh_1", 2, "", "", "")
    observer.attempt_started(task, worker_id="w0", project="ads", priority=0, queue_wait_s=1.5, placement="affinity")
    observer.attempt_finished(task, worker_id="w0", project="ads", outcome="lost", reason="worker_died",
                              report=Failed("w0", "at_1", "worker process died"), shot_state="queued")
    observer.story_finished("st_1", project="ads", state="failed", reason="shot 2 failed", seconds=61.0)
    observer.worker_event("w0", device="cuda:0", event="replaced", reason="worker_died")
    started, finished, story, worker = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert started["attempt_id"] == "at_1" and started["shot_index"] == 2 and started["level"] == "info"
    assert finished["level"] == "warning" and finished["outcome"] == "lost" and "worker process died" in finished["message"]
    assert story["story_id"] == "st_1" and story["outcome"] == "failed" and "shot_id" not in story
    assert worker["worker"] == "w0" and worker["device"] == "cuda:0" and worker["reason"] == "worker_died"


def test_structured_values_are_json_fields_not_reprs_in_the_message():
    logger, stream = capture(JsonFormatter())
    logger.info("warmed up", extra={"worker": "w0", "warmup": WARMUP, "resources": {"CPU": 8.0}})
    line = json.loads(stream.getvalue())
    assert line["message"] == "warmed up" and line["warmup"] == WARMUP and line["resources"] == {"CPU": 8.0}
    text_logger, text = capture(TextFormatter())
    text_logger.info("warmed up", extra={"worker": "w0", "resources": {"CPU": 8.0}})
    assert text.getvalue().rstrip().endswith('warmed up [worker=w0 resources={"CPU":8.0}]')


def test_worker_warm_up_report_is_a_field_of_its_line(monkeypatch):
    """The real WorkerRuntime.load, with the model side (torch, the engine, the driver) replaced in
    sys.modules by stand-ins: its log line, not the model, is under test."""
    from storyfarm.scheduler.gpu_pool.worker import WorkerRuntime

    class FakeEngine:
        attention_backend = "sdpa"

        def __init__(self, preset, device, expert_placement):
            self.preset = preset

        def warm_up(self):
            return WARMUP

    stand_ins = {
        "torch": types.SimpleNamespace(set_num_threads=lambda n: None),
        "storyfarm.m2v.render.engine": types.SimpleNamespace(Engine=FakeEngine),
        "storyfarm.m2v.render.driver": types.SimpleNamespace(
            RenderSettings=dict, StoryRenderer=lambda engine, settings: types.SimpleNamespace(engine=engine)),
        "storyfarm.story.presets": types.SimpleNamespace(load_preset=lambda name: types.SimpleNamespace(name=name)),
    }
    for name, module in stand_ins.items():
        monkeypatch.setitem(sys.modules, name, module)
    _, stream = capture(JsonFormatter(), "storyfarm.scheduler.gpu_pool.worker", monkeypatch)
    ready = WorkerRuntime("w0", "tiny", "cpu", send=lambda msg: None).load()
    assert ready.attention_backend == "sdpa"
    line = json.loads(stream.getvalue())
    assert line["warmup"] == WARMUP and (line["worker"], line["device"], line["attention"]) == ("w0", "cpu", "sdpa")
    assert line["message"] == "worker w0 on cpu warmed up in 12.5 s (attention sdpa)"


def test_ray_connection_logs_the_cluster_resources_as_a_field(monkeypatch):
    from storyfarm.scheduler.gpu_pool.ray_actors import connect_ray

    resources = {"CPU": 16.0, "GPU": 2.0, "memory": 1e9, "node:10.0.0.5": 1.0}
    fake = types.SimpleNamespace(is_initialized=lambda: False, init=lambda **kw: None, cluster_resources=lambda: resources)
    monkeypatch.setitem(sys.modules, "ray", fake)
    _, stream = capture(JsonFormatter(), "storyfarm.scheduler.gpu_pool.ray_actors", monkeypatch)
    connect_ray("auto")
    line = json.loads(stream.getvalue())
    assert line["message"] == "connected to Ray: 16 CPU(s), 2 GPU(s)" and line["resources"] == resources
