"""`storyfarm serve`: run the daemon. Flags override the config file, which overrides defaults."""

from __future__ import annotations

import json
import logging
import os


def add_serve_parser(sub) -> None:
    serve = sub.add_parser("serve", help="run the render daemon (gRPC API, workers, job store)")
    serve.add_argument("--config", help="daemon config YAML (default: embedded defaults; `production` for the packaged production config)")
    serve.add_argument("--listen", help="gRPC address (default 127.0.0.1:50051)")
    serve.add_argument("--metrics-listen", help="metrics address (default 127.0.0.1:9400)")
    serve.add_argument("--data-dir", help="SQLite database and artifacts (default var/)")
    serve.add_argument("--preset", help="model preset (default tiny)")
    serve.add_argument("--workers", type=int, help="worker processes (default 1)")
    serve.add_argument("--device", choices=("auto", "cpu", "cuda"), help="worker devices (default auto)")
    serve.add_argument("--grace-seconds", type=float, help="SIGTERM grace for running shots")
    serve.add_argument("--print-config", action="store_true", help="print the merged configuration and exit")
    serve.set_defaults(run=cmd_serve)


def cmd_serve(args, console) -> int:
    from storyfarm.daemon.config import ConfigError, load_config

    overrides = {"listen": args.listen, "metrics_listen": args.metrics_listen, "data_dir": args.data_dir,
                 "preset": args.preset, "workers": args.workers, "device": args.device, "grace_seconds": args.grace_seconds}
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False)
        return 2
    if args.print_config:
        console.print(json.dumps(config.redacted_dict(), indent=2, default=str), markup=False, highlight=False)
        return 0
    from storyfarm.daemon.logs import LOG_FORMAT_ENV, configure_logging
    from storyfarm.daemon.metrics_http import scrape_address

    try:
        scrape_address(config.metrics_listen)
    except ValueError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False)
        return 2
    configure_logging(config.log_format, logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    os.environ[LOG_FORMAT_ENV] = config.log_format  # spawned workers write the same lines
    from storyfarm.daemon.server import serve

    return serve(config)
