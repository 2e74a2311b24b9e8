"""The daemon's /metrics endpoint on `metrics_listen`, served from the daemon process.

Why a separate listener (not a gRPC method): Prometheus scrapes plain HTTP, and a scrape must
keep working while the gRPC server is saturated or draining. The endpoint is read-only and
unauthenticated, as Prometheus endpoints usually are: it exposes project names and worker ids,
never story content, ids or tokens. Bind it to loopback or a monitoring network.

prometheus_client's threaded WSGI server serves the daemon's own registry (never the global
one, so one process can host several daemons in tests). Port 0 picks a free port (`port` tells
which). A unix socket cannot be scraped, so `unix:` addresses are refused with what is allowed.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, start_http_server

from storyfarm.daemon.config import parse_address

log = logging.getLogger(__name__)


def scrape_address(address: str, field: str = "metrics_listen") -> tuple[str, int]:
    """(host, port) of a metrics address; ValueError naming `field` and what is allowed."""
    try:
        parsed = parse_address(address)
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from None
    if parsed is None:
        raise ValueError(f"{field}: {address!r} is a unix socket, which Prometheus cannot scrape; "
                         "use HOST:PORT, e.g. 127.0.0.1:9400")
    return parsed


class MetricsServer:
    def __init__(self, registry: CollectorRegistry, address: str, field: str = "metrics_listen"):
        self.registry, self.address, self.field = registry, address, field
        self.port: int | None = None
        self._httpd = self._thread = None

    def start(self) -> int:
        """Bind and serve; returns the port. ValueError: the address cannot serve metrics (a
        configuration error). RuntimeError: it could not be bound now (in use)."""
        host, port = scrape_address(self.address, self.field)
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise RuntimeError(f"{self.field}: cannot bind {self.address} (in use, or not an address here): {exc}") from None
        self.port = self._httpd.server_address[1]
        log.info("metrics on http://%s/metrics", f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}")
        return self.port

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = self._thread = None
