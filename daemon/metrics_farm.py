"""Scrape-time gauges: the farm as it is at the moment Prometheus asks.

Why at scrape time: queue depth, worker states, quota use and batch deadlines are facts held by
the store and the dispatcher; copying them into gauges on every change would duplicate that
bookkeeping and drift from it. Each scrape reads the store (two read-only queries, one snapshot
each) and the dispatcher's `farm_snapshot()`; when the dispatcher has none (an older build), the
worker pool's own snapshot stands in and quotas and ETAs are simply not exported. Series are
emitted for every priority class and open state, zeros included, so alert expressions always have
a series to compare. A part that fails to read (a store closing during shutdown) is logged and left
out of that scrape; the scrape itself never fails.
"""

from __future__ import annotations

import logging
import time
from functools import cached_property
from typing import Callable, Iterable

from prometheus_client.core import GaugeMetricFamily

from storyfarm.story.lifecycle import OPEN_SHOT_STATES, OPEN_STORY_STATES
from storyfarm.daemon.metrics_nvml import Nvml

log = logging.getLogger(__name__)

PRIORITY_CLASSES = ("high", "normal", "low")


def priority_class(priority: int) -> str:
    """Bounded label for a story priority (-100..100): high above 0, normal at 0, low below."""
    return "high" if priority > 0 else "low" if priority < 0 else "normal"


class _Scrape:
    def __init__(self, collector: FarmCollector):
        self._collector = collector

    @cached_property
    def depth(self) -> dict:
        return self._collector.store.queue_depth()

    @cached_property
    def farm(self) -> dict:
        return self._collector.snapshot()


class FarmCollector:
    """A prometheus_client collector; `specs` (name -> MetricSpec) gives each family its help and
    label names, so what is exported is exactly what the catalog says."""

    def __init__(self, specs: dict, store, dispatcher=None, reports=None, nvml: Nvml | None = None,
                 clock: Callable[[], float] = time.time):
        self.specs, self.store, self.dispatcher, self.reports = specs, store, dispatcher, reports
        self.nvml = nvml if nvml is not None else Nvml()
        self.clock = clock

    def describe(self) -> Iterable:
        return [self._family(name) for name, spec in self.specs.items() if spec.source == "scrape"]

    def _family(self, name: str) -> GaugeMetricFamily:
        spec = self.specs[name]
        return GaugeMetricFamily(name, spec.help, labels=spec.labels)

    def _add(self, family: GaugeMetricFamily, value: float, **labels) -> None:
        family.add_metric([str(labels[name]) for name in self.specs[family.name].labels], float(value))

    def collect(self) -> Iterable:
        scrape = _Scrape(self)  # each source is read at most once per scrape
        for part in (self._queue, self._workers, self._projects, self._batches):
            try:
                yield from list(part(scrape))
            except Exception:  # noqa: BLE001 - one unreadable part must not cost the whole scrape
                log.exception("metrics: reading %s failed", part.__name__)

    # -- sources ---------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """The dispatcher's farm snapshot, or the pool's worker list when it has none."""
        farm = getattr(self.dispatcher, "farm_snapshot", None)
        if callable(farm):
            return farm()
        pool = getattr(self.dispatcher, "executor", None)
        return {"workers": pool.snapshot() if pool is not None else [], "projects": {}, "batches": []}

    # -- parts -----------------------------------------------------------------------------------
    def _queue(self, scrape: _Scrape):
        depth = scrape.depth
        for kind, states in (("shots", OPEN_SHOT_STATES), ("stories", OPEN_STORY_STATES)):
            counts = {(c, s): 0 for c in PRIORITY_CLASSES for s in states}
            for priority, state, n in depth[kind]:
                if state in states:
                    counts[priority_class(priority), state] += n
            family = self._family(f"storyfarm_queue_{kind}")
            for (cls, state), n in counts.items():
                self._add(family, n, priority_class=cls, state=state)
            yield family
        oldest = self._family("storyfarm_queue_oldest_shot_age_seconds")
        since = depth["oldest_queued_at"]
        self._add(oldest, 0.0 if since is None else max(0.0, self.clock() - since))
        yield oldest
        draining = self._family("storyfarm_draining")
        self._add(draining, 1.0 if getattr(self.dispatcher, "draining", False) else 0.0)
        yield draining

    def _workers(self, scrape: _Scrape):
        workers = scrape.farm.get("workers") or []
        names = ("storyfarm_worker_up", "storyfarm_worker_running_shots", "storyfarm_worker_out_of_service",
                 "storyfarm_worker_gpu_memory_used_bytes", "storyfarm_worker_info", "storyfarm_latent_pool_stories")
        f = {name: self._family(name) for name in names}
        # NVML sees this host's GPUs only: Ray actors live on other nodes, so they are known by their reports.
        local = getattr(getattr(self.dispatcher, "executor", None), "kind", "mp") != "ray"
        by_pid = self.nvml.process_memory() if local else {}
        reported = dict(getattr(self.reports, "reported_gpu_bytes", {}))
        uuids = dict(getattr(self.reports, "reported_gpu_uuid", {}))
        out_of_service = set(getattr(self.reports, "out_of_service", ()))
        for w in workers:
            wid, device = w["id"], w["device"]
            oos = bool(w.get("out_of_service", wid in out_of_service))
            up = w["state"] in ("idle", "busy") and not oos
            self._add(f["storyfarm_worker_up"], 1 if up else 0, worker=wid, device=device)
            self._add(f["storyfarm_worker_running_shots"], 1 if w.get("story_id") else 0, worker=wid)
            self._add(f["storyfarm_worker_out_of_service"], 1 if oos else 0, worker=wid, device=device)
            uuid = uuids.get(wid) or (self.nvml.uuid(device) if local else "")
            self._add(f["storyfarm_worker_info"], 1, worker=wid, device=device, gpu_uuid=uuid)
            self._add(f["storyfarm_latent_pool_stories"], w.get("resident_stories") or 0, worker=wid)
            if not device.startswith("cuda"):
                continue  # no GPU memory series for CPU workers
            used = by_pid.get(w.get("pid"))
            if used is None:
                used = w.get("gpu_memory_bytes", reported.get(wid))
            if used is not None:
                self._add(f["storyfarm_worker_gpu_memory_used_bytes"], used, worker=wid, device=device)
        yield from f.values()

    def _projects(self, scrape: _Scrape):
        projects = scrape.farm.get("projects") or {}
        running = self._family("storyfarm_project_running_shots")
        guaranteed = self._family("storyfarm_project_quota_guaranteed_shots")
        burst = self._family("storyfarm_project_quota_burst_shots")
        # projects with unfinished work show up with 0 running; the dispatcher's view adds quotas
        counted = {p: {"running": n} for p, n in scrape.depth["running_by_project"].items()} | projects
        for project, use in counted.items():
            self._add(running, use.get("running", 0), project=project)
            if use.get("guaranteed") is not None:
                self._add(guaranteed, use["guaranteed"], project=project)
            if use.get("burst") is not None:
                self._add(burst, use["burst"], project=project)
        yield from (running, guaranteed, burst)

    def _batches(self, scrape: _Scrape):
        remaining = self._family("storyfarm_batch_remaining_stories")
        deadline = self._family("storyfarm_batch_deadline_timestamp_seconds")
        eta = self._family("storyfarm_batch_eta_timestamp_seconds")
        planned = {b["batch_id"]: b for b in scrape.farm.get("batches") or []}
        for batch_id, open_count, stored_deadline in self.store.open_batches():
            plan = planned.get(batch_id, {})
            self._add(remaining, open_count, batch=batch_id)
            when = plan.get("deadline", stored_deadline)
            if when is not None:
                self._add(deadline, when, batch=batch_id)
            if plan.get("eta") is not None:
                self._add(eta, plan["eta"], batch=batch_id)
        yield from (remaining, deadline, eta)
