"""`storyfarm serve`: the daemon process, CUDA-free, with its workers, store and gRPC server.

Start-up order: lock the data dir, open the store, bind the listen address, then recover (shots
left running by a dead daemon go back to the queue), sweep temporary files, start the workers, the
dispatcher and the gRPC server; health says SERVING only once a worker has loaded and warmed its
model. A data dir another daemon holds, or a listen address another process holds, stops the start
before anything in the data dir changes: one line naming it and the holder, exit 2 (StartupError).
A busy `metrics_listen` does not: the daemon renders without /metrics. SIGTERM/SIGINT: health goes
NOT_SERVING at once, new submits are refused, running shots get `grace_seconds` to finish (else
they are left to re-run after restart, each logged as a WARNING: nothing acknowledged is lost),
then the process exits 0.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from storyfarm.daemon.artifacts import ArtifactStore
from storyfarm.daemon.auth import AuthInterceptor, Authorizer
from storyfarm.daemon.config import DaemonConfig, parse_address
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
from storyfarm.daemon.store import JobStore, SchemaTooNew
from storyfarm.story.numbering import shot_number
from storyfarm.story.presets import load_preset
from storyfarm.v1 import render_pb2, render_pb2_grpc

log = logging.getLogger(__name__)
SERVICE = render_pb2.DESCRIPTOR.services_by_name["RenderService"].full_name
# limits.max_message_bytes bounds what callers send; the daemon's own responses must still fit a
# DownloadArtifact chunk (1 MiB of data plus its fields), or a small request limit would make every
# artifact larger than it undownloadable.
RESPONSE_FLOOR_BYTES = CHUNK_BYTES + (64 << 10)


class StartupError(RuntimeError):
    """The daemon cannot start here now: its listen address or data dir is held by another process,
    or its store is from a newer release. `serve` logs the one-line message and exits 2 (as for a
    configuration error); nothing in the data dir has changed and the other process is untouched."""


def listener_of(port: int) -> str | None:
    """'pid N (command line)' of the process listening on TCP `port` of this host, when /proc shows
    it (Linux; another user's processes only to root); None otherwise. Only to name it in an error."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = [line.split() for line in f.read().splitlines()[1:]]
        except OSError:
            continue
        inodes |= {f"socket:[{r[9]}]" for r in rows if len(r) > 9 and r[3] == "0A" and int(r[1].rsplit(":", 1)[1], 16) == port}
    if not inodes:
        return None
    try:
        pids = sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int)
    except OSError:
        return None
    for pid in pids:
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                return f"pid {pid} ({command[:120]})" if command else f"pid {pid}"
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return None


def bind_problem(address: str) -> str | None:
    """Why `address` cannot be bound, as the operating system says it (gRPC's error does not), or
    None when it can be: like gRPC, one bindable address of those a name resolves to is enough."""
    try:
        parsed = parse_address(address)
    except ValueError as exc:
        return str(exc)
    if parsed is None or parsed[1] == 0:
        return None  # a unix socket (gRPC says why), or any free port
    host, port = parsed
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        return f"{host}: {exc.strerror or exc}"
    problems = []
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
            try:
                probe.bind(sockaddr)
                return None
            except OSError as exc:
                problems.append(exc)
    if any(exc.errno == errno.EADDRINUSE for exc in problems):
        holder = listener_of(port)
        return (f"address already in use by {holder}" if holder else
                f"address already in use by another process (`ss -ltnp 'sport = :{port}'` shows which)")
    return f"{problems[0].strerror or problems[0]} (not an address of this host?)" if problems else None


class Daemon:
    def __init__(self, config: DaemonConfig):
        self.config = config
        self.preset = load_preset(config.preset)
        self._lock_data_dir()
        try:
            self.store = JobStore.open(config.data_dir / "storyfarm.db", max_attempts=config.max_attempts)
        except SchemaTooNew as exc:
            self._lock_file.close()
            raise StartupError(f"data_dir: {config.data_dir / 'storyfarm.db'}: {exc}") from None
        except BaseException:
            self._lock_file.close()
            raise
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
        """One daemon per data dir: a second one would 'recover' the first one's running shots.
        The holder writes its pid into the lock file once it holds the lock, never before: a
        refused start only reads it (to name the holder) and leaves the file as it was."""
        import fcntl

        data_dir = self.config.data_dir
        path = data_dir / "daemon.lock"
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(path, "a+")  # "a+": opening never truncates the holder's pid
        except OSError as exc:
            raise StartupError(f"data_dir: cannot use {data_dir}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip()
            self._lock_file.close()
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StartupError(f"data_dir: cannot lock {path}: {exc.strerror or exc}") from None
            pid = f"pid {holder}" if holder.isdigit() else "its pid not yet written"
            raise StartupError(f"data_dir: {data_dir} is in use by another storyfarm daemon ({pid} holds {path})") from None
        self._lock_file.truncate(0)
        self._lock_file.write(f"{os.getpid()}\n")
        self._lock_file.flush()

    def _abandon_start(self) -> None:
        """A start that failed before anything ran: close the store and release the data dir (the
        lock file stays, so a daemon that starts meanwhile still finds and locks the same file)."""
        if self.server is not None:
            self.server.stop(None)
        self.metrics_server.stop()
        self.store.close()
        self._lock_file.close()

    def start(self) -> None:
        try:  # bind first: a daemon that cannot listen changes nothing in its data dir
            self._bind()
        except BaseException:
            self._abandon_start()
            raise
        recovered = self.store.recover()
        if recovered:
            log.warning("recovered %d shot(s) left running by a previous daemon", recovered)
        self.artifacts.sweep_temporaries()
        try:
            self.metrics_server.start()
        except RuntimeError as exc:  # metrics observe the farm; they never keep it from running
            log.error("%s; serving without /metrics (Prometheus will report this daemon down)", exc)
        self.executor.start()
        self.dispatcher.start()
        self.server.start()
        threading.Thread(target=self._mark_serving, name="storyfarm-health", daemon=True).start()
        log.info("storyfarm listening on %s (preset %s, %d worker(s))", self.config.listen, self.preset.name, len(self.executor.workers))

    def _bind(self) -> None:
        """The gRPC server, bound to `listen` (not yet serving). StartupError: the address cannot be
        bound here now, naming it, why and, when this host shows it, the process holding it."""
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
        problem = bind_problem(self.config.listen)  # asked first: gRPC would also log a C-core error line
        if problem is None:
            try:
                self.port = self._add_port()
            except RuntimeError:  # grpcio raises where older versions returned 0; its text says nothing useful
                self.port = 0
        if not self.port:
            problem = problem or bind_problem(self.config.listen) or (
                "the socket file cannot be made there (no such folder, or not writable)"
                if self.config.listen.startswith("unix") else "in use, or not an address here")
            raise StartupError(f"listen: cannot bind {self.config.listen}: {problem}")

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
        self._log_abandoned()  # the dispatcher records nothing more: what still runs is cut off
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

    def _log_abandoned(self) -> None:
        """One WARNING per shot still running when the grace ran out: its worker is stopped now,
        the store keeps the attempt open, and the next start records it `lost` and re-queues it."""
        grace = self.config.grace_seconds
        for worker in list(self.executor.workers.values()):
            task = worker.task
            if task is None:
                continue
            log.warning("shot %d of story %s abandoned on worker %s: still rendering when the %g s SIGTERM grace "
                        "(grace_seconds) ran out; it re-runs after the restart", shot_number(task.shot_index),
                        task.story_id, worker.id, grace,
                        extra={"story_id": task.story_id, "shot_id": task.shot_id, "shot_index": task.shot_index,
                               "attempt_id": task.attempt_id, "worker": worker.id, "device": worker.device})


def serve(config: DaemonConfig) -> int:
    """Run the daemon until SIGTERM/SIGINT (exit 0); 2 when it cannot start (StartupError, one line)."""
    try:
        daemon = Daemon(config)
        daemon.start()  # a signal during start-up keeps its default action: the process just ends
    except StartupError as exc:
        log.error("%s; not starting", exc)
        return 2
    done = threading.Event()

    def on_signal(signum, frame):
        log.info("signal %d: shutting down", signum)
        threading.Thread(target=lambda: (daemon.shutdown(), done.set()), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
    return 0
