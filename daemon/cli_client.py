"""The `storyfarm` commands that talk to a running daemon, registered into cli.py's parser.

submit, watch, ls, get, cancel, pause, resume, priority, retry-shot, rerender, download, pool and drain each
parse their arguments, make one or two StoryfarmClient calls (client.py) and print; download lives
in cli_download.py (it decides about the files already in its folder). Every one
takes --server (else STORYFARM_SERVER, else 127.0.0.1:50051) and --token / --token-file (else
STORYFARM_TOKEN), and --tls-ca / --tls-cert / --tls-key for a TLS daemon.

Invariants:
- exit codes: 0 done; 2 bad input (a bad argument or file here, or INVALID_ARGUMENT,
  ALREADY_EXISTS or OUT_OF_RANGE from the daemon, every field violation printed on its own line);
  3 NOT_FOUND; 4 UNAUTHENTICATED or PERMISSION_DENIED; 1 anything else, including a story that
  ends FAILED or CANCELLED under `watch` or `submit --wait`; 5 (EXIT_PARTIAL) a `submit` of several
  files of which some went in and some were refused; 130 Ctrl-C (the story keeps rendering);
- `submit` checks every file (and the images it names) before sending any: one bad file sends none;
- with --json, stdout holds exactly one JSON document and nothing else; messages, warnings and
  errors go to stderr, so `storyfarm get ID --json | jq .state` always parses;
- shots are numbered from 1 in every argument and line of text (story/numbering.py); --json keeps
  the API's 0-based `index` and adds `number` beside it;
- importing this module is cheap: the gRPC client is imported only when a command runs, so
  `storyfarm render` pays nothing for it and `storyfarm submit` never loads torch.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from storyfarm.story.lifecycle import FINAL_STATES, STORY_STATES
from storyfarm.story.numbering import shot_index, shot_label, shot_number

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NOT_FOUND, EXIT_DENIED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
# 5, partly done: `submit` of several files without --batch, where the daemon created (or already
# had) some stories and refused others; each is named on stderr, and --json lists both.
EXIT_PARTIAL = 5
# 4, not allowed: no credentials or role for it, or not in the story's current state (pause or
# retry-shot on a finished story, resume while a cancelled shot is still stopping).
EXIT_BY_CODE = {"INVALID_ARGUMENT": EXIT_BAD_INPUT, "ALREADY_EXISTS": EXIT_BAD_INPUT, "OUT_OF_RANGE": EXIT_BAD_INPUT,
                "NOT_FOUND": EXIT_NOT_FOUND, "UNAUTHENTICATED": EXIT_DENIED, "PERMISSION_DENIED": EXIT_DENIED,
                "FAILED_PRECONDITION": EXIT_DENIED}


# --- plumbing ----------------------------------------------------------------------------------

def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


def say(console: Console, text: str) -> None:
    """One line of plain text: no markup (ids and field paths hold brackets), never hard-wrapped."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"not JSON: {type(value).__name__}")


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def _connect(args):
    from storyfarm.daemon.client import TLS, StoryfarmClient

    token = Path(args.token_file).read_text(encoding="utf-8").strip() if args.token_file else args.token
    tls = TLS(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key) if (args.tls_ca or args.tls_cert or args.tls_key) else None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together (the client certificate and its key)")
    return StoryfarmClient(args.server, token, tls=tls)


def _report(exc, server: str, what: str = "") -> int:
    err = _stderr()
    say(err, f"error: {what}{exc}")  # the field violations are part of the error's text
    if exc.code.name == "UNAVAILABLE":
        say(err, f"  (is the daemon running at {server}? retried before giving up)")
    elif exc.retry_after is not None:
        say(err, f"  retry after {exc.retry_after:g} s")
    return EXIT_BY_CODE.get(exc.code.name, EXIT_FAILED)


def _command(body: Callable[[Any, argparse.Namespace, Console], int]) -> Callable[[argparse.Namespace, Console], int]:
    """A client command: connect, run `body(client, args, console)`, turn failures into exit codes."""
    def run(args: argparse.Namespace, console: Console) -> int:
        from storyfarm.daemon.client import StoryfarmError

        server = args.server or "the default address"
        try:
            with _connect(args) as client:
                server = client.server
                return body(client, args, console)
        except StoryfarmError as exc:
            return _report(exc, server)
        except (ValueError, OSError) as exc:
            say(_stderr(), f"error: {exc}")
            return EXIT_BAD_INPUT
        except KeyboardInterrupt:
            say(_stderr(), "interrupted (the daemon keeps rendering)")
            return EXIT_INTERRUPTED
    run.__doc__ = body.__doc__
    return run


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"ETA {hours}:{minutes:02d}:{secs:02d}" if hours else f"ETA {minutes}:{secs:02d}"


# --- watching ----------------------------------------------------------------------------------

class WatchView:
    """Two rich bars for one story: its shots k/n with the story's ETA, and the running shot's
    stage with its steps s/S and the shot's ETA. Log lines for state changes and artifacts.
    Shots are named by their number, counting from 1 ("shot 6 of 6 (scene 1.3)"): the number
    `retry-shot`, `rerender` and `get` use (story/numbering.py); events carry the 0-based index."""

    def __init__(self, console: Console, story_id: str):
        self.console, self.story_id = console, story_id
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[eta]}"), console=console)
        self.story_bar = self.bars.add_task(story_id, total=None, eta="")
        self.shot_bar = self.bars.add_task("", total=None, eta="", visible=False)
        self.state: str | None = None
        self.shot_states: dict[int, str] = {}
        self.scenes: dict[int, tuple[int, int]] = {}  # index -> (scene, shot in scene), from the snapshot
        self.shot_count = 0
        self.step_shot: int | None = None  # the shot the step bar shows

    def __enter__(self) -> WatchView:
        self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.stop()

    def handle(self, event) -> None:
        data = event.data
        if event.kind == "snapshot":
            story = data["story"]
            self.state, self.shot_count = story["state"], story["shot_count"]
            self.shot_states = {s["index"]: s["state"] for s in story["shots"]}
            self.scenes = {s["index"]: (s["scene"], s["shot"]) for s in story["shots"]}
            self.bars.update(self.story_bar, eta=_eta(story["eta"]))
            for shot in story["shots"]:
                if shot["state"] == "running" and shot["progress"]:
                    self._step(shot["index"], shot["progress"]["stage"], shot["progress"]["step"],
                               shot["progress"]["total_steps"], shot["progress"]["eta"])
        elif event.kind == "story_state_changed":
            self.state = data["new_state"]
            self._log(f"story {data['old_state']} -> {data['new_state']}" + (f": {data['reason']}" if data["reason"] else ""))
        elif event.kind == "shot_state_changed":
            self.shot_states[data["shot_index"]] = data["new_state"]
            if data["new_state"] == "succeeded" and data["shot_index"] == self.step_shot:
                total = self.bars.tasks[self.shot_bar].total or 1
                self.bars.update(self.shot_bar, total=total, completed=total)
            if data["new_state"] in ("succeeded", "failed"):
                worker = f" on {data['worker']}" if data["worker"] else ""
                reason = f": {data['reason']}" if data["reason"] else ""
                attempt = f" (attempt {data['attempt']})" if data.get("attempt") else ""
                self._log(f"{self._label(data['shot_index'])} {data['new_state']}{worker}{attempt}{reason}")
        elif event.kind == "progress":
            self._step(data["shot_index"], data["stage"], data["step"], data["total_steps"], data["shot_eta"])
            self.bars.update(self.story_bar, eta=_eta(data["eta"]))
        elif event.kind == "artifact_published":
            artifact = data["artifact"]
            self._log(f"published {artifact['name']} ({artifact['size']} bytes)")
        done = sum(state == "succeeded" for state in self.shot_states.values())
        self.bars.update(self.story_bar, total=self.shot_count or None, completed=done,
                         description=f"{self.story_id} ({self.state or '...'})")

    def _step(self, index: int, stage: str, step: int, total: int, eta: float | None) -> None:
        self.step_shot = index
        self.bars.update(self.shot_bar, visible=True, description=f"{self._label(index)} {stage}",
                         total=total or None, completed=step, eta=_eta(eta))

    def _label(self, index: int) -> str:
        """"shot 6 of 6 (scene 1.3)": the shot's number, from 1 (its index is 5)."""
        return shot_label(index, self.shot_count or None, *self.scenes.get(index, (None, None)))

    def _log(self, text: str) -> None:
        say(self.console, text)  # the bars' console: the line goes above the live bars


def follow(client, story_id: str, console: Console, *, after_seq: int = 0, quiet: bool = False) -> str:
    """Watches a story until it finishes; returns its final state word."""
    view = WatchView(console if not quiet else Console(quiet=True), story_id)
    if after_seq:  # no snapshot comes when resuming: take the totals from the story as it stands
        view.handle(SimpleNamespace(kind="snapshot", data={"story": client.get(story_id)}))
    with view:
        for event in client.watch(story_id, after_seq=after_seq):
            view.handle(event)
    return view.state if view.state in FINAL_STATES else client.get(story_id, full=False)["state"]


# --- commands ----------------------------------------------------------------------------------

def cmd_watch(client, args, console: Console) -> int:
    state = follow(client, args.story_id, console, after_seq=args.after_seq)
    say(console, f"{args.story_id}: {state}")
    return EXIT_OK if state == "succeeded" else EXIT_FAILED


def _table(*columns: str, fit: dict[str, int] | None = None) -> Table:
    """A plain table. Ids, counts and times stay whole (and copyable); free text folds, or, for the
    columns in `fit` (name -> width, from _fit), stays on one line, cut with an ellipsis."""
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in columns:
        if fit and column in fit:
            table.add_column(column, no_wrap=True, overflow="ellipsis", max_width=fit[column])
        else:
            table.add_column(column, no_wrap=column not in ("NAME", "PROGRESS / ERROR"), overflow="fold")
    return table


def _fit(width: int, columns: list[str], rows: list[list[str]], free: dict[str, int]) -> dict[str, int]:
    """Widths for the `free` columns (name -> weight) that make the table `width` cells wide at
    most, the other columns whole (two cells between columns, as _table draws them): free columns
    narrower than their share keep their width, the others share the rest by weight, at least 4
    cells each (below that the table is wider than `width`: see _table_width)."""
    natural = _natural_widths(columns, rows)
    spare = width - 2 * (len(columns) - 1) - sum(w for c, w in natural.items() if c not in free)
    caps, left = {}, sorted(free, key=lambda c: natural[c] / free[c])
    while left:
        column = left.pop(0)
        share = spare * free[column] // (free[column] + sum(free[c] for c in left))
        caps[column] = max(4, min(natural[column], share))
        spare -= caps[column]
    return caps


def _natural_widths(columns: list[str], rows: list[list[str]]) -> dict[str, int]:
    """Each column's width in cells with nothing cut: its widest cell or its header."""
    from rich.cells import cell_len

    return {c: max([cell_len(c)] + [cell_len(row[i]) for row in rows]) for i, c in enumerate(columns)}


def _table_width(columns: list[str], rows: list[list[str]], fit: dict[str, int]) -> int:
    natural = _natural_widths(columns, rows)
    return 2 * (len(columns) - 1) + sum(fit.get(c, natural[c]) for c in columns)


def cmd_ls(client, args, console: Console) -> int:
    """One line per story at any width (a terminal's, or $COLUMNS, else 80, through a pipe): when
    the table is too wide, creation times drop the year and names and projects are cut with an
    ellipsis; story ids always stay whole (narrower than they need, lines grow past the width)."""
    from rich.text import Text

    from storyfarm.daemon.client_wire import parse_pairs

    states = [s for item in args.state or () for s in item.split(",") if s]
    stories = client.list(project=args.project, states=states, batch_id=args.batch, label=parse_pairs(args.label, "--label"))
    if args.json:
        print_json(stories)
        return EXIT_OK

    def rows(when: str) -> list[list[str]]:
        return [[s["story_id"], s["name"], s["project"], s["state"], f"{s['succeeded_shot_count']}/{s['shot_count']}",
                 str(s["priority"]), s["create_time"].astimezone().strftime(when) if s["create_time"] else ""]
                for s in stories]

    columns, free = ["STORY", "NAME", "PROJECT", "STATE", "SHOTS", "PRIORITY", "CREATED"], {"NAME": 2, "PROJECT": 1}
    lines = rows("%Y-%m-%d %H:%M")
    fit = _fit(console.width, columns, lines, free)
    cut = _table_width(columns, lines, fit) < _table_width(columns, lines, {})
    if cut and sum(fit.values()) < 40:  # cramped: the short forms leave the names more room
        columns[5], lines = "PRI", rows("%m-%d %H:%M")
        fit = _fit(console.width, columns, lines, free)
    table = _table(*columns, fit=fit)
    for line in lines:
        table.add_row(*(Text(cell) for cell in line))  # text, never markup: a name may hold [brackets]
    width = console.width  # below the narrowest table, rich would squash the ids: let lines grow instead
    console.width = max(width, _table_width(columns, lines, fit))
    try:
        console.print(table)
    finally:
        console.width = width
    return EXIT_OK


def _print_story(story: dict[str, Any], console: Console) -> None:
    say(console, f"{story['story_id']}  {story['name']!r}  project {story['project']}  priority {story['priority']}  "
                 f"[{story['state']}]  {story['succeeded_shot_count']}/{story['shot_count']} shots  {_eta(story['eta'])}")
    if story["error"]:
        say(console, f"error: {story['error']}")
    if story.get("waiting_reason"):
        say(console, f"waiting: {story['waiting_reason']}")
    if story["shots"]:
        table = _table("SHOT", "SCENE", "STATE", "ATTEMPTS", "WORKER", "PROGRESS / ERROR")
        for shot in story["shots"]:
            progress = shot["progress"]
            note = f"{progress['stage']} {progress['step']}/{progress['total_steps']}" if progress else shot["error"]
            table.add_row(str(shot_number(shot["index"])), f"{shot['scene']}.{shot['shot']}", shot["state"], str(shot["attempts"]),
                          shot["worker"], note)
        console.print(table)
    if story["artifacts"]:
        table = _table("ARTIFACT", "SIZE", "SHA256")
        for artifact in story["artifacts"]:
            table.add_row(artifact["name"], str(artifact["size"]), artifact["sha256"][:16])
        console.print(table)


def cmd_get(client, args, console: Console) -> int:
    story = client.get(args.story_id)
    if args.json:
        print_json(story)
    else:
        _print_story(story, console)
    return EXIT_OK


def _shot_arg(number: int) -> int:
    """The API's 0-based shot index for the SHOT a person typed (counting from 1); a ValueError,
    so exit 2, for 0 or less. The daemon checks the upper end against the story."""
    return shot_index(number, name="SHOT")


def _story_control(call: Callable[[Any, argparse.Namespace], dict]) -> Callable:
    def body(client, args, console: Console) -> int:
        story = call(client, args)
        if args.json:
            print_json(story)
        else:
            extra = f", priority {story['priority']}" if args.command == "priority" else ""
            extra += f": {story['error']}" if story.get("error") and story["state"] in ("cancelled", "failed") else ""
            say(console, f"{story['story_id']}: {story['state']}{extra}")
        return EXIT_OK
    return body


def cmd_cancel(client, args, console: Console) -> int:
    """Cancel; with --wait, return once no shot of the story runs any more (the running shot stops
    at its next denoising step), so that `resume` right after it is allowed: exit 1 past --timeout."""
    story = client.cancel(args.story_id, args.reason)
    if args.wait:
        deadline = time.monotonic() + args.timeout
        while any(shot["state"] == "running" for shot in client.get(args.story_id)["shots"]):
            if time.monotonic() > deadline:
                say(_stderr(), f"{args.story_id}: cancelled, but a shot was still stopping after --timeout {args.timeout:g} s")
                return EXIT_FAILED
            time.sleep(0.5)
    return _story_control(lambda c, a: story)(client, args, console)


def _print_pool(pool: dict[str, Any], console: Console) -> None:
    table = _table("WORKER", "STATE", "DEVICES", "SHOT", "PROGRESS", "RESIDENT", "MEMORY")
    for w in pool["workers"]:
        shot = (f"{w['current_shot']['story_id'] or '?'} {shot_label(w['current_shot']['shot_index'])}"
                if w["current_shot"] else "")
        progress = (f"{w['progress']['stage']} {w['progress']['step']}/{w['progress']['total_steps']} "
                    f"{_eta(w['progress'].get('eta'))}".strip() if w["progress"] else "")
        memory = f"{w['memory_used_bytes'] / 2**30:.1f}/{w['memory_total_bytes'] / 2**30:.1f} GiB" if w["memory_total_bytes"] else ""
        table.add_row(w["worker_id"], w["state"] + (f" ({w['error']})" if w["error"] else ""), ",".join(w["devices"]),
                      shot, progress, str(w["resident_story_count"]), memory)
    console.print(table)
    counts = ", ".join(f"{c['count']} {c['state']}" for c in pool.get("stories_by_state", ()) if c["count"])
    say(console, f"stories: {counts or 'none unfinished'}" + ("  (draining)" if pool["draining"] else ""))


def cmd_pool(client, args, console: Console) -> int:
    pool = client.pool()
    if args.json:
        print_json(pool)
    else:
        _print_pool(pool, console)
    return EXIT_OK


def cmd_drain(client, args, console: Console) -> int:
    import grpc

    from storyfarm.daemon.client import StoryfarmError

    try:
        reply = client.drain(args.worker, wait=args.wait, undrain=args.undrain, timeout=args.timeout)
    except StoryfarmError as exc:
        if not (args.wait and exc.code == grpc.StatusCode.DEADLINE_EXCEEDED):
            raise
        again = "storyfarm drain --wait" + "".join(f" --worker {w}" for w in args.worker or ())
        say(_stderr(), f"the drain is in effect, but shots were still running after --timeout {args.timeout:g} s "
                       f"(`storyfarm pool` shows them; run `{again}` again to keep waiting)")
        return EXIT_FAILED
    if args.json:
        print_json(reply)
    else:
        _print_pool(reply, console)
        say(console, f"{reply['running_shot_count']} shots still running on drained workers")
    return EXIT_OK


# --- registration ------------------------------------------------------------------------------

def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    conn = common.add_argument_group("daemon connection")
    conn.add_argument("--server", metavar="ADDR", help="daemon address (default: $STORYFARM_SERVER, else 127.0.0.1:50051)")
    token = conn.add_mutually_exclusive_group()
    token.add_argument("--token", help="bearer token (default: $STORYFARM_TOKEN)")
    token.add_argument("--token-file", metavar="FILE", help="read the bearer token from FILE")
    conn.add_argument("--tls-ca", metavar="PEM", help="use TLS, trusting these CA certificates")
    conn.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS (with --tls-key)")
    conn.add_argument("--tls-key", metavar="PEM", help="the client certificate's private key")
    return common


def add_commands(sub) -> None:
    """Adds the client commands to cli.py's subparsers; each sets `run`, its handler(args, console)."""
    common = _common()

    def add(name: str, body: Callable, help: str, json_flag: bool = True, story_id: bool = True) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help, parents=[common])
        if story_id:
            parser.add_argument("story_id", metavar="STORY_ID")
        if json_flag:
            parser.add_argument("--json", action="store_true", help="print JSON on stdout")
        parser.set_defaults(run=_command(body))
        return parser

    from storyfarm.daemon.cli_submit import add_submit_command  # here: cli_submit imports this module
    add_submit_command(add)

    p = add("watch", cmd_watch, "follow a story's progress until it finishes", json_flag=False)
    p.add_argument("--after-seq", type=int, default=0, metavar="SEQ", help="resume after this event")

    p = add("ls", cmd_ls, "list stories", story_id=False)
    p.add_argument("--project")
    p.add_argument("--state", action="append", metavar="STATE", help=", ".join(STORY_STATES))
    p.add_argument("--batch", metavar="ID")
    p.add_argument("--label", action="append", metavar="KEY=VALUE")

    add("get", cmd_get, "show one story with its shots and artifacts")
    p = add("cancel", cmd_cancel, "cancel a story")
    p.add_argument("--reason", default="", help="recorded as the story's error")
    p.add_argument("--wait", action="store_true", help="return once its running shot has stopped (then `resume` may follow)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait with --wait (default: 600)")
    add("pause", _story_control(lambda c, a: c.pause(a.story_id)), "pause a story (its running shot finishes)")
    add("resume", _story_control(lambda c, a: c.resume(a.story_id)),
        "resume a paused story, or a cancelled one from its last succeeded shot")
    p = add("priority", _story_control(lambda c, a: c.set_priority(a.story_id, a.priority)), "change a story's priority")
    p.add_argument("priority", type=int, metavar="N", help="-100..100")
    p = add("retry-shot", _story_control(lambda c, a: c.retry_shot(a.story_id, _shot_arg(a.shot), rerender=a.rerender, seed=a.seed)),
            "run a failed shot again (or re-render a succeeded one)")
    p.add_argument("shot", type=int, metavar="SHOT", help="the shot's number (the first shot is 1, as `get` shows)")
    p.add_argument("--rerender", action="store_true", help="re-render a succeeded shot (a new take)")
    p.add_argument("--seed", type=int, help="seed for the new attempt")
    p = add("rerender", _story_control(lambda c, a: c.rerender_shot(
                a.story_id, _shot_arg(a.shot), prompt=a.prompt, strength=a.strength, seed=a.seed, cascade=a.cascade,
                request_id=a.request_id)),
            "render a shot of a finished story again, optionally edited (a new take)")
    p.add_argument("shot", type=int, metavar="SHOT", help="the shot's number (the first shot is 1, as `get` shows)")
    p.add_argument("--prompt", help="the edited prompt (default: the shot's current prompt)")
    p.add_argument("--strength", type=float, metavar="S",
                   help="0 < S <= 1: start from the previous take pushed S of the way back to noise (default 1: from noise)")
    p.add_argument("--seed", type=int, help="a seed for the new take (default: the shot's seed)")
    p.add_argument("--cascade", action="store_true", help="also render every later shot again, after this one")
    p.add_argument("--request-id", metavar="ID", help="idempotency key (default: a new UUID)")

    from storyfarm.daemon.cli_download import add_download_command  # here: cli_download imports this module
    add_download_command(add)

    add("pool", cmd_pool, "show the worker pool and the queue", story_id=False)
    p = add("drain", cmd_drain, "drain the daemon or some workers for maintenance (admin)", story_id=False)
    p.add_argument("--worker", action="append", metavar="ID", help="drain only this worker (repeatable)")
    p.add_argument("--wait", action="store_true", help="return once no drained worker renders")
    p.add_argument("--undrain", action="store_true", help="end the drain")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait with --wait (default: 600)")
