"""`storyfarm submit`: story files to the daemon, every file checked here before any is sent.

Its own module because a submit of several files decides what a partial outcome means: one bad
file (or an image it names that is missing) sends nothing, exit 2; --batch sends all in one call,
all or none, under request ids derived from the batch id and each story (a re-run creates
nothing); otherwise one call per file, and a story the daemon refuses is named while the others
still go (exit 5, EXIT_PARTIAL, when some went in). The exit codes are cli_client's. With -q,
stdout holds only the ids of the stories submitted (created or already there), one per line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from storyfarm.daemon.cli_client import (EXIT_BAD_INPUT, EXIT_BY_CODE, EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, _report,
                                         _stderr, follow, print_json, say)


def _references(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or ():
        name, sep, path = item.partition("=")
        name, path = (name, path) if sep else (Path(item).name, item)
        if not name or not path:
            raise ValueError(f"--reference {item!r}: expected NAME=PATH or PATH")
        out[name] = path
    return out


# A daemon's answer that refuses one story (its text, images, budget, request id) rather than the
# whole command: submitting the other files still makes sense.
_STORY_REFUSALS = ("INVALID_ARGUMENT", "ALREADY_EXISTS", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED")


def _error_json(exc) -> dict[str, Any]:
    return {"code": exc.code.name, "reason": exc.reason, "message": exc.message,
            "field_violations": [list(v) for v in exc.field_violations]}


def _read_stories(paths: list[str], references: dict[str, str]) -> list | None:
    """Every story file read and checked here, with the images it names, before anything is sent:
    a StoryFile per path, or None after one error line per problem, each naming its file."""
    from storyfarm.daemon.client_story import StoryFileError, check_story_file, read_story_file

    err, files, bad = _stderr(), [], 0
    for path in paths:
        try:
            story_file = read_story_file(path, references)
            check_story_file(story_file)  # its warnings come back from the daemon
            files.append(story_file)
        except StoryFileError as exc:
            bad += 1
            for line in str(exc).splitlines():
                say(err, f"error: {line}")
        except (OSError, UnicodeDecodeError) as exc:
            bad += 1
            say(err, f"error: {path}: {exc}" if path not in str(exc) else f"error: {exc}")
    if bad:
        say(err, f"{bad} of {len(paths)} story files refused; nothing was submitted")
        return None
    return files


def cmd_submit(client, args, console: Console) -> int:
    """Every file is read and checked first (one bad file: exit 2, nothing sent). --batch sends all
    in one call, all or none, under request ids derived from the batch id and each story, so the
    same command run again creates nothing. Otherwise one call per file: a story the daemon refuses
    is reported and the others still go; some in and some refused is EXIT_PARTIAL."""
    from storyfarm.daemon.client import StoryfarmError
    from storyfarm.daemon.client_wire import parse_pairs

    if args.request_id and (len(args.story) > 1 or args.batch):
        raise ValueError("--request-id names one story's submission: give one story and no --batch")
    if args.quiet and args.json:
        raise ValueError("--quiet prints the story ids, --json everything: give one of them")
    references = _references(args.reference)
    common = dict(project=args.project, priority=args.priority, labels=parse_pairs(args.label, "--label"),
                  validate_only=args.validate_only)
    files = _read_stories(args.story, references)
    if files is None:
        return EXIT_BAD_INPUT
    err = _stderr()
    again = f"already submitted in batch {args.batch}" if args.batch else "already submitted (same request id)"

    def show(path: str, result: dict[str, Any]) -> None:
        result["path"] = path
        for warning in result["warnings"]:
            say(err, f"warning: {path}: {warning}")
        if args.quiet:  # the id alone, created or already there: ID=$(storyfarm submit story.yaml -q)
            if result["story_id"]:
                say(console, result["story_id"])
        elif not args.json:
            what = "valid" if args.validate_only else "created" if result["created"] else again
            say(console, f"{result['story_id'] or '-'}  {what}, {result['shot_count']} shots  ({path})")

    refused: list[tuple[str, Any]] = []  # (path, StoryfarmError or None: not sent after another error)
    if args.batch:  # one call, all or none
        try:
            reply = client.submit_batch(files, args.batch, args.deadline, **common)
        except StoryfarmError as exc:
            code = _report(exc, client.server)
            for i, path in enumerate(args.story):  # the daemon names stories by position
                if any(f.startswith(f"stories[{i}].") for f, _ in exc.field_violations):
                    say(err, f"  stories[{i}] is {path}")
            return code
        results, shown = reply["stories"], reply
        for path, result in zip(args.story, results):
            show(path, result)
    else:  # one call per story, each shown as soon as it is in
        results, entries, stopped = [], [], False
        for path, story_file in zip(args.story, files):
            if stopped:  # the daemon is unreachable, or refuses us rather than a story: stop sending
                refused.append((path, None))
                entries.append({"path": path, "story_id": None, "created": False,
                                "error": {"code": "NOT_SENT", "message": "not sent after an earlier error"}})
                continue
            try:
                result = client.submit(story_file, request_id=args.request_id, deadline=args.deadline, **common)
            except StoryfarmError as exc:
                _report(exc, client.server, f"{path}: ")
                refused.append((path, exc))
                entries.append({"path": path, "story_id": None, "created": False, "error": _error_json(exc)})
                stopped = exc.code.name not in _STORY_REFUSALS
                continue
            show(path, result)
            results.append(result)
            entries.append({**result, "error": None} if len(files) > 1 else result)
        shown = entries[0] if len(entries) == 1 else entries
    status = EXIT_OK
    if args.wait and not args.validate_only:
        for result in results:
            result["state"] = follow(client, result["story_id"], console, quiet=args.json or args.quiet)
            status = status if result["state"] == "succeeded" else EXIT_FAILED
    if refused:
        first = next(exc for _, exc in refused if exc is not None)
        status = EXIT_PARTIAL if results else EXIT_BY_CODE.get(first.code.name, EXIT_FAILED)
        if len(args.story) > 1:
            not_sent = [path for path, exc in refused if exc is None]
            say(err, f"{len(results)} of {len(args.story)} stories submitted; refused: "
                     + ", ".join(path for path, exc in refused if exc is not None)
                     + (f"; not sent: {', '.join(not_sent)}" if not_sent else ""))
        if len(args.story) == 1:
            return status  # one story refused: nothing on stdout, as for any failed command
    if args.json:
        if not args.batch and len(files) > 1:  # the list's entries take the states --wait added
            for entry, result in zip((e for e in entries if e["error"] is None), results):
                entry.update(result)
        print_json(shown)
    return status


def add_submit_command(add) -> None:
    """Registers `submit` through cli_client's `add(name, body, help)`."""
    p = add("submit", cmd_submit, "submit stories to the daemon", story_id=False)
    p.add_argument("story", nargs="+", metavar="STORY", help="story files: StoryMem JSON or storyfarm YAML/JSON")
    p.add_argument("--request-id", metavar="ID", help="idempotency key (default: a new UUID, reused on retries)")
    p.add_argument("--project", help="project (default: the token's)")
    p.add_argument("--priority", type=int, default=0, help="-100..100, higher runs first (default: 0)")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="a label (repeatable)")
    p.add_argument("--reference", action="append", metavar="NAME=PATH", help="a reference image the story names (repeatable)")
    p.add_argument("--batch", metavar="ID", help="submit all stories as one batch, all or none")
    p.add_argument("--deadline", metavar="HH:MM|ISO", help="when the story (or batch) should be finished")
    p.add_argument("--validate-only", action="store_true", help="let the daemon check the stories; store nothing")
    p.add_argument("--wait", action="store_true", help="watch until every story finishes; exit 1 unless all succeed")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print only the story ids, one per line, for ID=$(storyfarm submit story.yaml -q); "
                        "warnings and errors still go to stderr")
