"""`storyfarm serve` as a real process for tests: started in its own session on a free port,
waited for until SERVING (or until it dies), killed the way a test asks.

Why a helper: crash, restart, shutdown and load tests all need the daemon as a separate process
(SIGKILL and SIGTERM must hit a real process, and its workers must be its own children), and
they need the same care: a port another process took in between is retried, a daemon that exits
during start-up is reported with its log, and nothing is left running after a test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from storyfarm.daemon.client_wire import StoryfarmError
from storyfarm.v1 import render_pb2_grpc

CLI = str(Path(sys.executable).with_name("storyfarm"))
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Private channels: gRPC would otherwise share one connection between channels with equal settings.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def violations(error: grpc.RpcError) -> tuple[dict[str, str], str | None]:
    """Field violations and the ErrorInfo reason from a rich status, read as the client library does."""
    parsed = StoryfarmError.from_rpc_error(error)
    return dict(parsed.field_violations), parsed.reason


def wait_serving(channel: grpc.Channel, timeout: float = 120, what: str = "daemon", metadata=None) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=2, metadata=metadata).status == SERVING:
                return
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, f"{what} never became SERVING"
        time.sleep(0.1)


class PortTaken(Exception):
    pass


class DaemonProcess:
    """One `storyfarm serve` process. `config` (a dict) is written to a YAML file next to the data
    dir; `env` adds environment variables (fault injection). Use `start()`; `stop()` always."""

    def __init__(self, data: Path, *, config: dict | None = None, env: dict | None = None, grace: float = 5.0):
        self.data, self.config, self.env, self.grace = Path(data), dict(config or {}), dict(env or {}), grace
        self.proc: subprocess.Popen | None = None
        self.channel: grpc.Channel | None = None
        self.port = self.metrics_port = 0
        self.log: Path | None = None

    def start(self, *, wait: bool = True, timeout: float = 120) -> DaemonProcess:
        """Start and wait for SERVING; with wait=False return once the process runs. A daemon that
        dies during start-up raises AssertionError with its log (see `start_expecting_death`)."""
        for _ in range(3):
            try:
                self._launch()
                if wait:
                    self._wait_serving(timeout)
                return self
            except PortTaken:
                self.stop()
        raise AssertionError("no free port could be bound in three tries")

    def start_expecting_death(self, timeout: float = 120) -> int:
        """Start a daemon that is meant to die before it serves (a crash point during recovery);
        returns its exit code (negative: the signal)."""
        self._launch()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the daemon did not die during start-up: {self.tail()}") from None

    def _launch(self) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.data.parent.mkdir(parents=True, exist_ok=True)
        stamp = time.time_ns()
        config_file = self.data.parent / f"daemon-{stamp}.yaml"
        config = {"device": "cpu", "grace_seconds": self.grace, **self.config,
                  "listen": f"127.0.0.1:{self.port}", "metrics_listen": f"127.0.0.1:{self.metrics_port}",
                  "data_dir": str(self.data)}
        config_file.write_text(yaml.safe_dump(config))
        self.log = self.data.parent / f"daemon-{self.port}-{stamp}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([CLI, "serve", "--config", str(config_file)], stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, env={**os.environ, **self.env})
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}", options=CHANNEL_OPTIONS)

    def _wait_serving(self, timeout: float) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                if "cannot bind" in self.log.read_text():
                    raise PortTaken()
                raise AssertionError(f"daemon exited {self.proc.returncode} during start-up: {self.tail()}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"daemon never SERVING: {self.tail()}"
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stub(self) -> render_pb2_grpc.RenderServiceStub:
        return render_pb2_grpc.RenderServiceStub(self.channel)

    @property
    def health(self) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.channel)

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text()[-chars:] if self.log and self.log.exists() else ""

    def kill(self, sig: int = signal.SIGKILL, *, group: bool = True, timeout: float = 30) -> int:
        """Signal the daemon (with its workers when `group`) and wait for the daemon to exit."""
        try:
            (os.killpg if group else os.kill)(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Whatever is left of this daemon and its workers is SIGKILLed (cleanup, not a test step)."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
