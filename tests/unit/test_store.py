"""The job store: idempotent submit, the shot lifecycle and its retry budget, listing, paging,
events, batches, and a state-machine test of the lifecycle invariants. Controls are in
test_store_controls.py, crashes, durability and schema in test_store_durability.py; every test works
on a real SQLite file (WAL only exists on disk)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from helpers.job_store import artifact, run, sha, shot_id, shots_in, states, submit, tick
from storyfarm.daemon.store import ArtifactIn, IdempotencyConflict, JobStore, NotFound, ShotIn, StateError


# --- submit ---------------------------------------------------------------------------------

def test_submit_is_idempotent_per_project_and_request_id(store):
    first = store.submit_story("r1", "p", sha("a"), "s", "{}", shots_in(2), now=tick())
    again = store.submit_story("r1", "p", sha("a"), "s", "{}", shots_in(2), now=tick())
    other_project = store.submit_story("r1", "q", sha("a"), "s", "{}", shots_in(2), now=tick())
    assert first.created and not again.created and other_project.created
    assert again.story_id == first.story_id != other_project.story_id
    with pytest.raises(IdempotencyConflict) as conflict:
        store.submit_story("r1", "p", sha("b"), "s", "{}", shots_in(2), now=tick())
    assert conflict.value.story_id == first.story_id and first.story_id in str(conflict.value)
    assert len(store.list_stories(project="p")[0]) == 1
    assert first.story_id.startswith("st_") and len(first.story_id) == 19


@pytest.mark.parametrize("change, message", [
    (dict(shots=[]), "at least one shot"),
    (dict(shots=[ShotIn(1, 1, 1, "x")]), "indices"),
    (dict(shots=[ShotIn(0, 1, 1, "x", settings="[1]")]), "settings must be a JSON object"),
    (dict(payload_sha256="ABC"), "payload_sha256"),
    (dict(request_id=""), "request_id"),
    (dict(labels={"k": 1}), "labels"),
])
def test_submit_refuses_malformed_input(store, change, message):
    args = dict(request_id="r", project="p", payload_sha256=sha("x"), name="n", story_document="{}",
                shots=shots_in(1)) | change
    with pytest.raises(ValueError, match=message):
        store.submit_story(**args)
    assert store.list_stories()[0] == []


# --- lifecycle ------------------------------------------------------------------------------

def test_three_shot_story_runs_in_order_to_success(store):
    story_id = submit(store, 3, labels={"show": "cats"}, deadline=5e6)
    assert states(store, story_id) == ("queued", ["queued", "waiting", "waiting"])
    assert [s.index for s in store.runnable_shots(10)] == [0]

    attempt = store.start_attempt(shot_id(store, story_id, 0), "gpu0", now=tick())
    assert states(store, story_id) == ("running", ["running", "waiting", "waiting"])
    assert store.runnable_shots(10) == []
    with pytest.raises(StateError, match="is running"):
        store.start_attempt(shot_id(store, story_id, 0), "gpu1", now=tick())
    shot = store.finish_attempt(attempt, "succeeded", artifacts=[artifact("shot_000.mp4")],
                                result={"index": 0, "seconds": 1.5}, now=tick())
    assert (shot.state, shot.attempts, shot.worker) == ("succeeded", 1, "gpu0")
    assert shot.result == {"index": 0, "seconds": 1.5}
    assert states(store, story_id) == ("running", ["succeeded", "queued", "waiting"])
    assert [s.index for s in store.runnable_shots(10)] == [1]

    run(store, story_id, 1, worker="gpu1")
    assert states(store, story_id) == ("running", ["succeeded", "succeeded", "queued"])
    run(store, story_id, 2, artifacts=[artifact("shot_002.mp4"),
                                       artifact("story.mp4", story_level=True)])
    record = store.get_story(story_id)
    assert (record.state, [s.state for s in record.shots]) == ("succeeded", ["succeeded"] * 3)
    assert record.finished_at is not None and record.labels == {"show": "cats"} and record.deadline == 5e6
    assert [(a.name, a.shot_index) for a in record.artifacts] == [
        ("shot_000.mp4", 0), ("shot_001.mp4", 1), ("shot_002.mp4", 2), ("story.mp4", None)]
    assert [s.worker for s in record.shots] == ["gpu0", "gpu1", "gpu0"]
    assert store.runnable_shots(10) == []
    with pytest.raises(StateError, match="already finished as succeeded"):
        store.finish_attempt(attempt, "failed", now=tick())


def test_finish_refuses_bad_outcomes_paths_and_duplicate_artifact_names(store):
    story_id = submit(store, 2)
    attempt = store.start_attempt(shot_id(store, story_id, 0), "gpu0", now=tick())
    with pytest.raises(ValueError, match="outcome"):
        store.finish_attempt(attempt, "done")
    with pytest.raises(ValueError, match="only for a succeeded attempt"):
        store.finish_attempt(attempt, "failed", artifacts=[artifact("a")])
    for path in ("/etc/passwd", "../x.mp4", "a/../../b", ""):
        with pytest.raises(ValueError, match="path must be relative"):
            store.finish_attempt(attempt, "succeeded", artifacts=[ArtifactIn("a", "k", path, 1, sha("a"))])
    store.finish_attempt(attempt, "succeeded", artifacts=[artifact("same.mp4")], now=tick())
    second = store.start_attempt(shot_id(store, story_id, 1), "gpu0", now=tick())
    with pytest.raises(StateError, match="already has an artifact named 'same.mp4'"):
        store.finish_attempt(second, "succeeded", artifacts=[artifact("same.mp4")], now=tick())
    assert states(store, story_id) == ("running", ["succeeded", "running"])  # the refusal wrote nothing
    with pytest.raises(NotFound):
        store.finish_attempt("at_nope", "failed")


def test_retry_budget_counts_failures_but_not_lost_attempts(db_path):
    with JobStore.open(db_path, max_attempts=3) as store:
        story_id = submit(store, 2)
        assert run(store, story_id, 0, "failed", error="CUDA OOM").state == "queued"
        assert run(store, story_id, 0, "lost").state == "queued"
        assert run(store, story_id, 0, "lost").state == "queued"
        shot = run(store, story_id, 0, "failed", error="CUDA OOM again")
        assert (shot.state, shot.error, shot.attempts) == ("queued", "CUDA OOM again", 4)
        assert store.get_story(story_id).state == "running"
        shot = run(store, story_id, 0, "failed", error="CUDA OOM third")
        assert (shot.state, shot.attempts) == ("failed", 5)
        record = store.get_story(story_id)
        assert record.state == "failed" and "shot 1 failed 3 times" in record.error and "third" in record.error
        assert [s.state for s in record.shots] == ["failed", "waiting"]
        outcomes = [a.outcome for a in store.attempts(shot.id)]
        assert outcomes == ["failed", "lost", "lost", "failed", "failed"]
        assert store.runnable_shots(10) == []


def test_a_non_retryable_failure_fails_at_once(store):
    story_id = submit(store, 1)
    shot = run(store, story_id, 0, "failed", error="prompt rejected", retryable=False)
    assert shot.state == "failed"
    assert store.get_story(story_id).error == "shot 1 not retryable: prompt rejected"


def test_retry_shot_requeues_with_a_fresh_budget(db_path):
    with JobStore.open(db_path, max_attempts=2) as store:
        story_id = submit(store, 3)
        run(store, story_id, 0)
        run(store, story_id, 1, "failed")
        run(store, story_id, 1, "failed", error="boom")
        assert states(store, story_id) == ("failed", ["succeeded", "failed", "waiting"])
        for index, error, match in (
                (0, StateError, "shot 1 of story .* is succeeded; retry is allowed when it is failed"),
                (7, NotFound, r"has no shot_index 7 \(shot 8\); its shots are 1 to 3")):
            with pytest.raises(error, match=match):
                store.retry_shot(story_id, index, now=tick())
        record = store.retry_shot(story_id, 1, now=tick())
        assert (record.state, record.error, [s.state for s in record.shots]) == (
            "running", None, ["succeeded", "queued", "waiting"])
        assert run(store, story_id, 1, "failed").state == "queued"  # the budget starts again
        run(store, story_id, 1)
        run(store, story_id, 2)
        assert store.get_story(story_id).state == "succeeded"
        with pytest.raises(StateError, match="is succeeded; retry is allowed when it is failed"):
            store.retry_shot(story_id, 1)


# --- listing, events, batches ---------------------------------------------------------------

def test_list_stories_pages_stably_and_filters(store):
    ids = [submit(store, 1, project="p" if i % 2 else "q", labels={"n": str(i % 3)}) for i in range(7)]
    pages, token = [], None
    while True:
        page, token = store.list_stories(page_size=3, page_token=token)
        pages.append([r.id for r in page])
        if token is None:
            break
        if len(pages) == 1:
            ids.append(submit(store, 1, project="r"))  # submitted while paging: at the end, once
    assert [len(p) for p in pages] == [3, 3, 2] and sum(pages, []) == ids
    assert [r.id for r in store.list_stories(project="p")[0]] == ids[1:7:2]
    assert [r.id for r in store.list_stories(label=("n", "0"))[0]] == [ids[0], ids[3], ids[6]]
    store.request_cancel(ids[2])
    assert [r.id for r in store.list_stories(states=["cancelled"])[0]] == [ids[2]]
    assert len(store.list_stories(states=["queued", "cancelled"], page_size=1000)[0]) == 8
    assert store.count_stories_by_state() == {"queued": 7, "running": 0, "succeeded": 0, "failed": 0,
                                              "cancelled": 1, "paused": 0}
    for bad in (dict(page_token="garbage!"), dict(page_size=0), dict(states=["done"])):
        with pytest.raises(ValueError):
            store.list_stories(**bad)


def test_events_record_every_state_change_in_order(store):
    story_id = submit(store, 2)
    other = submit(store, 1)
    run(store, story_id, 0)
    run(store, story_id, 1, "failed")
    events = store.events_since(story_id)
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert {e.story_id for e in events} == {story_id}
    summary = [(e.kind, e.payload.get("index"), e.payload.get("to") or e.payload.get("outcome")) for e in events]
    assert summary == [
        ("story_state", None, "queued"),
        ("attempt_started", 0, None), ("shot_state", 0, "running"), ("story_state", None, "running"),
        ("attempt_finished", 0, "succeeded"), ("shot_state", 0, "succeeded"), ("artifact_published", None, None),
        ("shot_state", 1, "queued"),
        ("attempt_started", 1, None), ("shot_state", 1, "running"),
        ("attempt_finished", 1, "failed"), ("shot_state", 1, "queued"),
    ]
    running = [e.payload for e in events if e.kind == "shot_state" and e.payload["to"] == "running"]
    assert [(p["attempt"], bool(p["worker"])) for p in running] == [(1, True), (1, True)]  # who ran it, which try
    published = next(e.payload for e in events if e.kind == "artifact_published")
    assert published["shot_index"] == 0 and len(published["sha256"]) == 64
    tail = store.events_since(story_id, after_seq=events[-3].seq, limit=10)
    assert [e.seq for e in tail] == [e.seq for e in events[-2:]]
    assert other in {e.story_id for e in store.events_since(None)}


def test_batches_summarise_and_cancel_as_a_unit(store):
    ids = [submit(store, 1, batch_id="overnight", deadline=2e6 + i) for i in range(3)]
    submit(store, 1, batch_id="other")
    run(store, ids[0], 0)
    summary = store.batch_summary("overnight")
    assert (summary.total, summary.counts["succeeded"], summary.counts["queued"], summary.deadline) == (3, 1, 2, 2e6)
    assert [r.id for r in store.list_stories(batch_id="overnight")[0]] == ids
    summary = store.cancel_batch("overnight", now=tick())
    assert (summary.counts["succeeded"], summary.counts["cancelled"], summary.counts["queued"]) == (1, 2, 0)
    assert store.batch_summary("other").counts["queued"] == 1
    with pytest.raises(NotFound, match="no stories in batch"):
        store.batch_summary("nope")


# --- the lifecycle invariants, under random operation sequences ------------------------------

class Lifecycle(RuleBasedStateMachine):
    """Random submits, starts, finishes, controls and recoveries; after each step the invariants of
    store.py's docstring must hold over the whole database."""

    @initialize()
    def open_store(self):
        self.folder = tempfile.TemporaryDirectory()
        self.store = JobStore.open(Path(self.folder.name) / "jobs.db", max_attempts=2)
        self.stories: list[str] = []
        self.open_attempts: dict[str, str] = {}  # attempt id -> shot id
        self.succeeded: dict[str, int] = {}      # shot id -> its attempt count when it succeeded
        self.final: dict[str, str] = {}          # story id -> succeeded, or cancelled until resumed
        self.last_seq = 0
        for n in (1, 3):
            self.submit(n, priority=0)

    def teardown(self):
        if hasattr(self, "store"):
            self.store.close()
            self.folder.cleanup()

    @precondition(lambda self: len(self.stories) < 5)
    @rule(n=st.integers(1, 3), priority=st.integers(0, 2))
    def submit(self, n, priority):
        self.stories.append(submit(self.store, n, priority=priority))

    @rule(data=st.data())
    def start(self, data):
        runnable = self.store.runnable_shots(10)
        if runnable:
            shot = data.draw(st.sampled_from(runnable))
            self.open_attempts[self.store.start_attempt(shot.id, "gpu0")] = shot.id

    @rule(data=st.data())
    def start_any(self, data):
        """Any shot of any story: only a queued one may start, and the store must say so."""
        story = self.store.get_story(data.draw(st.sampled_from(self.stories)))
        shot = data.draw(st.sampled_from(story.shots))
        if shot.state == "queued":
            self.open_attempts[self.store.start_attempt(shot.id, "gpu0")] = shot.id
        else:
            with pytest.raises(StateError):
                self.store.start_attempt(shot.id, "gpu0")

    @precondition(lambda self: self.open_attempts)
    @rule(data=st.data(), outcome=st.sampled_from(["succeeded", "succeeded", "failed", "cancelled", "lost"]),
          retryable=st.booleans())
    def finish(self, data, outcome, retryable):
        attempt = data.draw(st.sampled_from(list(self.open_attempts)))  # insertion order: ids are random
        self.open_attempts.pop(attempt)
        self.store.finish_attempt(attempt, outcome, retryable=retryable)

    @rule(data=st.data(), op=st.sampled_from(["request_cancel", "request_pause", "resume", "retry_shot"]))
    def control(self, data, op):
        story_id = data.draw(st.sampled_from(self.stories))
        args = (story_id, data.draw(st.integers(0, 2))) if op == "retry_shot" else (story_id,)
        try:
            getattr(self.store, op)(*args)
        except (StateError, NotFound):
            return
        if op == "resume" and self.final.get(story_id) == "cancelled":
            del self.final[story_id]  # a cancelled story is resumed from its last succeeded shot

    @precondition(lambda self: self.open_attempts)
    @rule()
    def recover(self):
        assert self.store.recover() == len(self.open_attempts)
        self.open_attempts.clear()

    @invariant()
    def lifecycle_holds(self):
        records, _ = self.store.list_stories(page_size=1000)
        running = set(self.open_attempts.values())
        for record in records:
            shot_states = [s.state for s in record.shots]
            assert shot_states.count("running") <= 1
            done = shot_states.count("succeeded")
            assert shot_states[:done] == ["succeeded"] * done  # succeeded shots form a prefix
            assert (record.state == "succeeded") <= (done == len(shot_states))
            if done == len(shot_states):
                assert record.state in ("succeeded", "cancelled")
            assert ("paused" in shot_states) <= (record.state == "paused")
            assert (record.state == "queued") <= (not any(s.attempts for s in record.shots))
            assert (record.state == "running") <= any(s.attempts for s in record.shots)
            if record.id in self.final:  # succeeded is final; cancelled until a resume
                assert record.state == self.final[record.id]
            elif record.state in ("succeeded", "cancelled"):
                self.final[record.id] = record.state
            assert ("failed" in shot_states) == (record.state == "failed")
            if record.state in ("paused", "cancelled"):
                assert not {"queued", "waiting"} & set(shot_states)
            for shot in record.shots:
                assert (shot.state == "running") == (shot.id in running)
                if shot.state == "queued":
                    assert shot.index == 0 or record.shots[shot.index - 1].state == "succeeded"
                if shot.state == "waiting":
                    assert record.shots[shot.index - 1].state != "succeeded"
                if shot.id in self.succeeded:  # a succeeded shot never changes, nor runs again
                    assert (shot.state, shot.attempts) == ("succeeded", self.succeeded[shot.id])
                elif shot.state == "succeeded":
                    self.succeeded[shot.id] = shot.attempts
        events = self.store.events_since(None, after_seq=self.last_seq, limit=10_000)
        assert all(a.seq < b.seq for a, b in zip(events, events[1:]))
        self.last_seq = events[-1].seq if events else self.last_seq


Lifecycle.TestCase.settings = settings(max_examples=60, stateful_step_count=50, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])
test_lifecycle_invariants = Lifecycle.TestCase


def test_last_event_seq_per_story_and_overall(store):
    assert store.last_event_seq() == 0
    a = submit(store, 1)
    b = submit(store, 1)
    assert store.last_event_seq(a) == store.events_since(a)[-1].seq
    assert store.last_event_seq() == store.events_since(b)[-1].seq > store.last_event_seq(a)
    assert store.last_event_seq("st_0000000000000000") == 0
