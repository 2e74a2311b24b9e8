"""The workers as GetPool and Drain show them: pb.Worker messages from the executor's snapshot,
the dispatcher's drain state and the live progress of each running shot. Translation only."""

from __future__ import annotations

import socket

from storyfarm.daemon import convert
from storyfarm.v1 import render_pb2 as pb

STATES = {"starting": pb.WORKER_STATE_STARTING, "idle": pb.WORKER_STATE_IDLE, "busy": pb.WORKER_STATE_BUSY,
          "dead": pb.WORKER_STATE_FAILED, "out_of_service": pb.WORKER_STATE_STOPPED}
DRAINED = {"idle": pb.WORKER_STATE_STOPPED, "busy": pb.WORKER_STATE_DRAINING}


def add_workers(workers, dispatcher, hub, preset: str) -> None:
    """Every worker into `workers` (a repeated pb.Worker): its state (a drained worker is DRAINING
    while it finishes its shot, then STOPPED), its shot and that shot's progress and ETA."""
    for w in dispatcher.executor.snapshot():
        error = w.get("error", "") if w["state"] in ("dead", "out_of_service") else ""
        if w["state"] == "out_of_service":
            error = f"out of service after repeated failures ({error})"
        state = STATES[w["state"]]
        if dispatcher.is_drained(w["id"]):
            state = DRAINED.get(w["state"], state)
        worker = workers.add(worker_id=w["id"], devices=w.get("devices", [w["device"]]), state=state, preset=preset,
                             resident_story_count=w["resident_stories"], memory_used_bytes=w.get("gpu_memory_bytes", 0),
                             error=error, host=socket.gethostname())
        if w["story_id"]:
            worker.current_shot.CopyFrom(pb.ShotRef(story_id=w["story_id"], shot_index=w["shot_index"]))
            live = hub.latest(w["story_id"])
            if live is not None and live.shot_index == w["shot_index"]:
                worker.progress.CopyFrom(convert.progress(live))
                convert.set_eta(worker.progress.eta, dispatcher.shot_eta(w["story_id"]))
