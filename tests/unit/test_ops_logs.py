"""Log lines: JSON objects with the ids a search needs, text lines with the same context, and the
dispatch observer that writes one line per attempt, story end and worker event."""

from __future__ import annotations

import io
import json
import logging

import pytest

from storyfarm.daemon.logs import JsonFormatter, LogObserver, TextFormatter, configure_logging
from storyfarm.scheduler.gpu_pool.messages import Failed, ShotTask


def capture(formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"storyfarm.test.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


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
