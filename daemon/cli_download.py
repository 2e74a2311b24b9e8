"""`storyfarm download`: a story's artifacts into a folder, resumable and sha256-checked.

Its own module because a download decides about the files already in its folder (an earlier
download, another take, a local render); the rules are client_download.py's, and this module puts
them into words and exit codes: 0 every file is there and verified; 2 files in the way and no
--force (each named with why, none touched); 3 a --name the story does not have (with what it has);
otherwise cli_client's codes. Files removed or left alone are named on stderr, so --json stdout
stays one JSON document (the files, as StoryfarmClient.download returns them).
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from storyfarm.daemon.cli_client import EXIT_BAD_INPUT, EXIT_OK, _stderr, print_json, say


def cmd_download(client, args, console: Console) -> int:
    from storyfarm.daemon.client_download import DownloadConflict, download_story

    try:
        watched = console.is_terminal and not args.json  # bars only for a person: a pipe gets the file lines
        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      console=console if watched else Console(quiet=True), transient=True) as bars:
            tasks: dict[str, int] = {}

            def show(name: str, got: int, total: int) -> None:
                if name not in tasks:
                    tasks[name] = bars.add_task(name, total=total)
                bars.update(tasks[name], completed=got, total=total)
            done = download_story(client, args.story_id, args.out, names=args.name, force=args.force, on_progress=show)
    except DownloadConflict as exc:
        err = _stderr()
        say(err, f"error: {len(exc.problems)} file(s) in {args.out} are in the way of story {exc.story_id}; "
                 "none was touched")
        for path, why in exc.problems:
            say(err, f"  {path}: {why}")
        say(err, "  use --force to replace them; files an earlier download of this story wrote that it no "
                 "longer has are then removed, other files are left alone")
        return EXIT_BAD_INPUT
    notes = _stderr()
    for path in done.removed:
        say(notes, f"removed {path} (an earlier download's file the story no longer has)")
    for path in done.kept:
        say(notes, f"left alone: {path} (not written by a download of this story; not part of its take)")
    if not done.files:
        say(notes, f"story {args.story_id} has no artifacts yet")
    if args.json:
        print_json(done.files)
    else:
        for f in done.files:
            say(console, f"{f['path']}  {f['size']} bytes  sha256 {f['sha256'][:16]}")
    return EXIT_OK


def add_download_command(add) -> None:
    """Registers `download` through cli_client's `add(name, body, help)`."""
    p = add("download", cmd_download, "download a story's artifacts (resumable, sha256-checked)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--name", action="append", metavar="NAME", help="only this artifact (repeatable)")
    p.add_argument("--force", action="store_true",
                   help="replace files in the way (another take, a local render) and remove the files an earlier "
                        "download of this story wrote that it no longer has")
