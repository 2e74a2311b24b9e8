"""`storyfarm serve`: the daemon process, CUDA-free, with its workers, store and gRPC server.

Start-up order: open the store and recover (shots left running by a dead daemon go back to the
queue), sweep temporary files, start the workers, the dispatcher and the gRPC server; health says
SERVING only once a worker has loaded and warmed its model. SIGTERM/SIGINT: health goes
NOT_SERVING at once, new submits are refused, running shots get `grace_seconds` to finish (else
they are left to re-run after restart: nothing acknowledged is lost), then the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from storyfarm.daemon.artifacts import ArtifactStore
from storyfarm.daemon.auth import AuthInterceptor, Authorizer
from storyfarm.daemon.config import DaemonConfig
from storyfarm.daemon.dispatcher import Dispatcher
from storyfarm.daemon.events import EventHub
from storyfarm.daemon.farm import build_executor, cost_model, policy_config, xid_watcher
from storyfarm.daemon.logs import LogObserver
from storyfarm.daemon.metrics import DaemonMetrics
from storyfarm.daemon.metrics_http import MetricsServer
from storyfarm.daemon.observers import Observers
from storyfarm.daemon.reflection import enable_reflection
from storyfarm.daemon.downloads import CHUNK_BYTES
from storyfarm.daemon.servicer import RenderServicer
from storyfarm.daemon.store import JobStore
from storyfarm.story.presets import load_preset
from storyfarm.v1 import render_pb2, render_pb2_grpc

log = logging.getLogger(__name__)
SERVICE = render_pb2.DESCRIPTOR.services_by_name["RenderService"].full_name
# limits.max_message_bytes bounds what callers send; the daemon's own responses must still fit a
# DownloadArtifact chunk (1 MiB of data plus its fields), or a small request limit would make every
# artifact larger than it undownloadable.
RESPONSE_FLOOR_BYTES = CHUNK_BYTES + (64 << 10)


class Daemon:
    def __init__(self, config: DaemonConfig):
        self.config = config
        self.preset = load_preset(config.preset)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_data_dir()
        self.store = JobStore.open(config.data_dir / "storyfarm.db", max_attempts=config.max_attempts)
        self.artifacts = ArtifactStore(config.data_dir)
        self.hub = EventHub()
        self.executor = build_executor(config)
        self.metrics = DaemonMetrics(preset=self.preset.name)
        self.dispatcher = Dispatcher(self.store, self.executor, self.artifacts, self.hub,
                                     observers=Observers(self.metrics, LogObserver()), policy=policy_config(config),
                                     cost=cost_model(config, self.preset), xid_watcher=xid_watcher(config))
        self.metrics.watch_farm(self.store, self.dispatcher)
        self.metrics_server = MetricsServer(self.metrics.registry, config.metrics_listen)
        self.servicer = RenderServicer(config, self.preset, self.store, self.artifacts, self.hub, self.dispatcher,
                                       metrics=self.metrics)
        self.health = health.HealthServicer()
        self.server: grpc.Server | None = None
        self.stopped = threading.Event()
        self.port: int | None = None

    def _lock_data_dir(self) -> None:
        """One daemon per data dir: a second one would 'recover' the first one's running shots."""
        import fcntl

        self._lock_file = open(self.config.data_dir / "daemon.lock", "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RuntimeError(f"data_dir: {self.config.data_dir} is in use by another storyfarm daemon") from None

    def start(self) -> None:
        recovered = self.store.recover()
        if recovered:
            log.warning("recovered %d shot(s) left running by a previous daemon", recovered)
        self.artifacts.sweep_temporaries()
        for name in ("", SERVICE):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        limits = self.config.limits
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=min(64, limits.max_concurrent_rpcs), thread_name_prefix="rpc"),
            interceptors=[AuthInterceptor(Authorizer(self.config.auth))],
            options=[("grpc.max_receive_message_length", limits.max_message_bytes),
                     ("grpc.max_send_message_length", max(limits.max_message_bytes, RESPONSE_FLOOR_BYTES)),
                     # gRPC sets SO_REUSEPORT by default: a second daemon (another data dir) could bind the
                     # same address and silently take half the connections. Refuse to start instead.
                     ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
        )
        render_pb2_grpc.add_RenderServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.config.reflection:
            enable_reflection(self.server, (SERVICE, health.SERVICE_NAME))  # v1 and v1alpha
        try:
            self.port = self._add_port()
        except RuntimeError as exc:  # grpcio raises where older versions returned 0
            raise RuntimeError(f"listen: cannot bind {self.config.listen} (in use, or not an address here): {exc}") from None
        if not self.port:
            raise RuntimeError(f"listen: cannot bind {self.config.listen}")
        try:
            self.metrics_server.start()
        except RuntimeError as exc:  # metrics observe the farm; they never keep it from running
            log.error("%s; serving without /metrics (Prometheus will report this daemon down)", exc)
        self.executor.start()
        self.dispatcher.start()
        self.server.start()
        threading.Thread(target=self._mark_serving, name="storyfarm-health", daemon=True).start()
        log.info("storyfarm listening on %s (preset %s, %d worker(s))", self.config.listen, self.preset.name, len(self.executor.workers))

    def _add_port(self) -> int:
        tls = self.config.tls
        if tls is None:
            return self.server.add_insecure_port(self.config.listen)
        credentials = grpc.ssl_server_credentials(
            [(open(tls.key, "rb").read(), open(tls.cert, "rb").read())],
            root_certificates=open(tls.client_ca, "rb").read() if tls.client_ca else None,
            require_client_auth=tls.client_ca is not None,
        )
        return self.server.add_secure_port(self.config.listen, credentials)

    def _mark_serving(self) -> None:
        while not self.stopped.is_set() and not self.executor.ready:
            time.sleep(0.1)
        if not self.stopped.is_set():
            for name in ("", SERVICE):
                self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
            log.info("workers ready: SERVING")

    def shutdown(self) -> None:
        """Graceful stop: NOT_SERVING, refuse submits, let running shots finish within the grace."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        self.executor.stopping = True  # from here on a worker that dies is not replaced
        self.servicer.accepting = False  # first: no submit slips in after health says NOT_SERVING
        self.health.enter_graceful_shutdown()
        self.dispatcher.draining = True
        deadline = time.monotonic() + self.config.grace_seconds
        while time.monotonic() < deadline and any(w.task is not None for w in self.executor.workers.values()):
            time.sleep(0.2)
        self.dispatcher.stop()
        self.dispatcher.join(timeout=5)
        self.executor.stop(grace=2.0)
        if self.server is not None:
            self.server.stop(grace=1.0).wait(5)
        self.metrics_server.stop()
        if self.dispatcher.is_alive():  # a turn still running would write to a closed store
            self.dispatcher.join(timeout=30)
        if self.dispatcher.is_alive():
            log.error("dispatcher did not stop within 35 s; leaving the job store to the process exit")
        else:
            self.store.close()
        self._lock_file.close()
        log.info("storyfarm stopped")


def serve(config: DaemonConfig) -> int:
    daemon = Daemon(config)
    done = threading.Event()

    def on_signal(signum, frame):
        log.info("signal %d: shutting down", signum)
        threading.Thread(target=lambda: (daemon.shutdown(), done.set()), daemon=True).start()

    daemon.start()  # a signal during start-up keeps its default action: the process just ends
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
    return 0
