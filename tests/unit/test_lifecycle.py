"""The lifecycle lists (storyfarm.story.lifecycle) are the one home of states and stages: the store's
frozen schema, the metrics and the CLI agree with them, and StageSequence reports every stage once,
in order, whatever a render enters."""

import re
import sqlite3

import pytest

from storyfarm.story.lifecycle import (FINAL_STATES, OPEN_SHOT_STATES, OPEN_STORY_STATES, OUTCOMES, RENDER_STAGES,
                                       SHOT_STATES, STORY_STATES, StageSequence)


def test_every_stage_once_in_order_whatever_is_entered():
    seq = StageSequence()
    reported = []
    # a first shot rendered text-to-video: no memory_encode; FIFO goes back to denoise and vae_decode
    for entered in ("text_encode", "denoise", "denoise", "vae_decode", "denoise", "vae_decode", "keyframes"):
        reported += seq.enter(entered)
    assert reported == ["text_encode", "memory_encode", "denoise", "vae_decode", "mp4_encode", "keyframes"]
    assert seq.stage == "keyframes"
    assert seq.enter("assemble") == ["assemble"]
    with pytest.raises(ValueError, match=r"unknown render stage 'upload'; known: text_encode, "):
        seq.enter("upload")


def test_open_and_final_states_partition_the_states():
    assert set(OPEN_STORY_STATES) | FINAL_STATES == set(STORY_STATES)
    assert set(OPEN_SHOT_STATES) | FINAL_STATES == set(SHOT_STATES)
    assert not set(OPEN_SHOT_STATES) & FINAL_STATES and FINAL_STATES <= set(OUTCOMES)


def test_the_frozen_schema_checks_the_same_states_and_outcomes():
    """Migrations never change once shipped, so the schema spells its lists out; they must still agree."""
    from storyfarm.daemon.store_schema import migrate

    db = sqlite3.connect(":memory:", isolation_level=None)
    migrate(db)
    ddl = {name: sql for name, sql in db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'")}

    def listed(table, column):
        m = re.search(rf"{column} TEXT[^,]*?CHECK \({column} IN\s*\(([^)]*)\)\)", ddl[table])
        return {v.strip().strip("'") for v in m.group(1).split(",")}

    assert listed("stories", "state") == set(STORY_STATES)
    assert listed("shots", "state") == set(SHOT_STATES)
    assert listed("attempts", "outcome") == set(OUTCOMES)


def test_metrics_label_every_stage_and_final_state():
    from storyfarm.daemon.metrics import ZERO_START

    assert ZERO_START["storyfarm_shot_stage_duration_seconds"][1] == RENDER_STAGES
    assert set(ZERO_START["storyfarm_story_duration_seconds"][1]) == FINAL_STATES
    assert ZERO_START["storyfarm_shot_duration_seconds"][1] == OUTCOMES
