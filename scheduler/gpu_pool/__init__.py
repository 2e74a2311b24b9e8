"""The GPU pool: one worker per device group, supervised, behind one Executor interface.

- executor: supervision shared by every executor (heartbeats, replacement, out of service);
- processes: the `mp` executor (spawned processes on this host); ray_actors: the `ray` executor;
- worker_loop: the loop a worker runs and the factory seam (`worker_factory`, a dotted path imported
  only inside the worker) that builds what renders: `render`, worker.WorkerRuntime (the model), in
  production; `fake`, fake.FakeWorker (renders nothing), where only the daemon is measured or tested;
- messages: what the daemon and its workers say to each other; gpus: NVML discovery;
- faults: injected faults for the reliability suite; logfmt: the log formats daemon and workers share.
"""
