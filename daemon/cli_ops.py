"""`storyfarm ops render-alerts`: the alert rules with their runbook links on this site's runbook URL.

Why: Alertmanager, its receivers and Grafana show an alert's `runbook_url` as a link, and only an
absolute URL opens there. Where the runbook lives (the team's git host, a wiki, an intranet copy of
ops/RUNBOOK.md) differs per site, and Prometheus rule files cannot read environment variables or
include a base. So ops/prometheus/alerts.yml (and its rule tests) carry absolute links on a
documented placeholder base, DEFAULT_RUNBOOK_BASE, and this command writes a copy with the site's
base, changing nothing but the part of each `runbook_url` before its `#anchor` (comments, order
and every other line stay as they are). The anchors are the alert names in lower case, the heading
slugs git hosts and Markdown renderers give ops/RUNBOOK.md's `## <AlertName>` sections.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import yaml

EXIT_OK, EXIT_BAD_INPUT = 0, 2
DEFAULT_RUNBOOK_BASE = "https://git.example.com/storyfarm/blob/main/ops/RUNBOOK.md"
DEFAULT_RULES = "ops/prometheus/alerts.yml"
# `runbook_url: "<base>#<anchor>"`, as the rule files write it: one per line, double-quoted
LINK = re.compile(r'^(?P<key>[ \t]*runbook_url:[ \t]*)"(?P<base>[^"#]*)#(?P<anchor>[a-z0-9_-]+)"[ \t]*$', re.M)


def check_base(url: str) -> str:
    """`url` if it is an absolute http(s) URL without a fragment that fits a double-quoted YAML string."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment or re.search(r'[\s"\\#]', url):
        raise ValueError(f"{url!r}: expected the absolute http(s) URL of the runbook page, without a #fragment "
                         f"(the alert's anchor is added), e.g. {DEFAULT_RUNBOOK_BASE}")
    return url


def render_runbook_links(text: str, base: str) -> str:
    """`text` (a rule file or a rule test file) with every runbook_url on `base`."""
    check_base(base)
    unmatched = [line.strip() for line in text.splitlines() if "runbook_url:" in line and not LINK.match(line)]
    if unmatched:
        raise ValueError(f"runbook_url lines not of the form runbook_url: \"<base>#<anchor>\": {unmatched}")
    rendered, count = LINK.subn(lambda m: f'{m["key"]}"{base}#{m["anchor"]}"', text)
    if not count:
        raise ValueError("no runbook_url annotations found")
    rules = [r for g in (yaml.safe_load(rendered) or {}).get("groups", ()) for r in g.get("rules", ()) if "alert" in r]
    missing = [r["alert"] for r in rules if "runbook_url" not in r.get("annotations", {})]
    if missing:
        raise ValueError(f"alerts without a runbook_url: {missing}")
    return rendered


def _write(path: str, text: str) -> None:
    """Atomically, so Prometheus reloading meanwhile reads the old file or the new, never half."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(tmp, 0o644)  # Prometheus, often another user, reads it
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def _refuse(flag: str, exc: Exception) -> int:
    print(f"storyfarm ops render-alerts: error: argument {flag}: {exc}", file=sys.stderr)
    return EXIT_BAD_INPUT


def cmd_render_alerts(args, console) -> int:
    try:
        base = check_base(args.runbook_base)
    except ValueError as exc:
        return _refuse("--runbook-base", exc)
    try:
        rendered = render_runbook_links(Path(args.rules).read_text(), base)
    except (ValueError, OSError, yaml.YAMLError) as exc:
        return _refuse("--rules", exc)
    if args.out == "-":
        sys.stdout.write(rendered)
        return EXIT_OK
    try:
        _write(args.out, rendered)
    except OSError as exc:
        return _refuse("--out", exc)
    return EXIT_OK


def add_ops_parser(sub) -> None:
    ops = sub.add_parser("ops", help="operations files (ops/) for this site")
    actions = ops.add_subparsers(dest="ops_command", required=True)
    render = actions.add_parser(
        "render-alerts", help="write the alert rules with runbook links on this site's runbook URL",
        description="Copy a rule file (or its rule tests) with every runbook_url on --runbook-base; nothing else changes.")
    render.add_argument("--runbook-base", required=True, metavar="URL",
                        help="absolute URL of ops/RUNBOOK.md as this site serves it (each alert adds #its-name)")
    render.add_argument("--rules", default=DEFAULT_RULES,
                        help=f"rule file, or rule test file, to read (default {DEFAULT_RULES})")
    render.add_argument("--out", default="-", help="where to write (default: stdout; may be --rules itself)")
    render.set_defaults(run=cmd_render_alerts)
