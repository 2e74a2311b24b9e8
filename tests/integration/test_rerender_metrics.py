"""/metrics across a re-render, scraped over HTTP from a daemon with fake workers: a story that is
re-rendered after it finished is not counted as a story finished again, and is not observed in the
submit-to-end story duration; the re-render has its own counter and a duration measured from the
re-render's request (ops/README.md, Metrics)."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid

from prometheus_client.parser import text_string_to_metric_families

from helpers.daemon_inproc import running_daemon, wait_final, wait_for
from storyfarm.v1 import render_pb2 as pb

STORY = json.dumps({"name": "ferry", "resolution": "64x32", "frames": 9, "steps": 2,
                    "shots": [{"prompt": "the ferry docks"}, {"prompt": "cars roll off the ferry"}]})
GAP_S = 2.0  # between the story's end and the re-render: a duration from the submit would include it


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def scrape_when(port: int, predicate, what: str) -> dict:
    """The first scrape for which `predicate(samples)` holds (the dispatcher records a story's end
    at its next turn, a moment after GetStory shows it)."""
    return wait_for(lambda: (lambda m: m if predicate(m) else None)(scrape(port)), what)


def total(samples: dict, name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def test_a_rerender_is_not_a_story_finished_again_and_is_timed_from_its_request(tmp_path):
    with running_daemon(tmp_path / "data", metrics_listen="127.0.0.1:0", **{"scheduler.worker": "fake"}) as (d, stub):
        port = d.metrics_server.port
        submitted = time.time()
        sid = stub.SubmitStory(pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=STORY)).story_id
        assert wait_final(stub, sid, timeout=60).state == pb.STORY_STATE_SUCCEEDED
        before = scrape_when(port, lambda m: total(m, "storyfarm_stories_finished_total") == 1, "the story's end in /metrics")
        assert total(before, "storyfarm_stories_finished_total", state="succeeded", reason="ok", project="default") == 1
        assert total(before, "storyfarm_story_duration_seconds_count", state="succeeded") == 1
        assert total(before, "storyfarm_rerenders_finished_total") == 0
        assert total(before, "storyfarm_rerender_duration_seconds_count") == 0  # present at zero from the start

        time.sleep(GAP_S)
        requested = time.time()
        reply = stub.RerenderShot(pb.RerenderShotRequest(story_id=sid, shot_index=1, prompt="cars roll off in the rain",
                                                         request_id=uuid.uuid4().hex))
        assert reply.state == pb.STORY_STATE_RUNNING
        assert wait_final(stub, sid, timeout=60).state == pb.STORY_STATE_SUCCEEDED
        ended = time.time()
        ends = ("storyfarm_stories_finished_total", "storyfarm_rerenders_finished_total")
        after = scrape_when(port, lambda m: sum(total(m, n) for n in ends) == 2, "the re-render's end in /metrics")

        # the story finished once, and was observed once, from its submission
        assert total(after, "storyfarm_stories_finished_total") == 1
        assert total(after, "storyfarm_story_duration_seconds_count") == 1
        assert total(after, "storyfarm_story_duration_seconds_sum") == total(before, "storyfarm_story_duration_seconds_sum")
        # the re-render: its own series, timed from its request (a time from the submit would be
        # at least GAP_S longer than the whole re-render took)
        assert total(after, "storyfarm_rerenders_finished_total", state="succeeded", reason="ok", project="default") == 1
        assert total(after, "storyfarm_rerender_duration_seconds_count", state="succeeded") == 1
        took = total(after, "storyfarm_rerender_duration_seconds_sum", state="succeeded")
        assert 0 < took <= ended - requested + 0.05, (took, ended - requested, ended - submitted)
        # the new take is work done: it counts like any other shot
        assert total(after, "storyfarm_shots_finished_total", state="succeeded") == 3
