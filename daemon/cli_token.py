"""`storyfarm token create`: a bearer token for a client and the `auth.tokens` entry for the daemon.

Why a command: the daemon keeps tokens only as sha256 hashes (daemon/config.py), so whoever adds a
pipeline or a user must make a random token, hash it and write a config entry that the daemon
accepts; done by hand that was a Python one-liner and a YAML edit where a typo in the project or
role shows up only when the daemon refuses to start. This prints the token once (it is not stored
anywhere) and the entry as one YAML line, checked by the same model the daemon loads
(`TokenEntry`), so a bad `--project`, `--role` or `--name` is refused here, naming the flag and
what is allowed (exit 2), never at the daemon's next start.
"""

from __future__ import annotations

import json
import sys

import yaml
from pydantic import ValidationError

from storyfarm.daemon.auth import ROLE_RANK, new_token
from storyfarm.daemon.config import ALL_PROJECTS, TokenEntry

EXIT_OK, EXIT_BAD_INPUT = 0, 2
NAME_RULE = "1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
ALLOWED = {
    "name": NAME_RULE,
    "project": f"a project name ({NAME_RULE}), or '{ALL_PROJECTS}' for every project",
    "role": ", ".join(ROLE_RANK),
}


def add_token_parser(sub) -> None:
    token = sub.add_parser("token", help="make bearer tokens for the daemon's auth.tokens")
    actions = token.add_subparsers(dest="token_command", required=True)
    create = actions.add_parser(
        "create", help="print a new token (once) and its auth.tokens entry (the token's sha256)",
        description="Print a new bearer token, shown only this once, and the YAML line to add under auth.tokens "
                    "in the daemon config; the daemon keeps only the token's sha256.")
    create.add_argument("--project", help=f"the project the token acts for: {ALLOWED['project']} "
                                          f"(admin tokens: '{ALL_PROJECTS}', the default for --role admin)")
    create.add_argument("--role", required=True, choices=tuple(ROLE_RANK),
                        help="viewer (read), submitter (its project's stories), admin (everything, drain)")
    create.add_argument("--name", help=f"the entry's name in logs and as a story's submitter ({NAME_RULE}; "
                                       "default PROJECT-ROLE-<first 6 hex of the hash>)")
    create.add_argument("--json", action="store_true", help="one JSON object: token, name, project, role, sha256, entry")
    create.set_defaults(run=cmd_token_create)


def _refuse(flag: str, message: str) -> int:
    print(f"storyfarm token create: error: argument --{flag}: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def cmd_token_create(args, console) -> int:
    project = args.project if args.project is not None else (ALL_PROJECTS if args.role == "admin" else None)
    if project is None:
        return _refuse("project", f"required for role {args.role}: {ALLOWED['project']}")
    if args.role == "admin" and project != ALL_PROJECTS:
        return _refuse("project", f"admin tokens act on every project: give '{ALL_PROJECTS}' or leave it out, not {project!r}")
    token, digest = new_token()
    label = "all" if project == ALL_PROJECTS else project[:40]
    name = args.name or f"{label}-{args.role}-{digest[:6]}"
    try:
        entry = TokenEntry(name=name, project=project, role=args.role, sha256=digest)
    except ValidationError as exc:
        wrong = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
        field = next(f for f in ("project", "role", "name") if f in wrong)  # a bad project spoils the default name too
        given = {"name": name, "project": project, "role": args.role}[field]
        return _refuse(field, f"{given!r} is not allowed: expected {ALLOWED[field]}")
    fields = entry.model_dump()
    line = "- " + yaml.safe_dump(fields, default_flow_style=True, sort_keys=False, width=10_000).strip()
    if args.json:
        print(json.dumps({"token": token, **fields, "entry": line}))
        return EXIT_OK
    print(f"token for {name} (shown only now: give it to the client as STORYFARM_TOKEN or in a --token-file):")
    print(token)
    print("add under auth.tokens in the daemon config (the daemon keeps only the sha256):")
    print(line)
    if args.role == "admin":
        print(f"or, for configs/production.yaml's admin entry: STORYFARM_ADMIN_TOKEN_SHA256={digest}")
    return EXIT_OK
