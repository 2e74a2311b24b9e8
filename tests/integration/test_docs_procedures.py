"""The docs' shell procedures run as written, against a real daemon, so they cannot drift from the
product: README.md's worked example and ops/RUNBOOK.md's "Procedures".

A fenced ```sh block right after a `<!-- procedure: NAME -->` line is executable
(helpers/doc_blocks.py finds them). Each runs as ONE `bash -euo pipefail` script in a temporary
folder holding a copy of configs/stories, with the venv's bin first on PATH, STORYFARM_SERVER naming
a real `storyfarm serve` process (helpers/daemon_proc.py) and the variables the docs' prose names:
`$ID` (the story the procedure is about) and `$STORYFARM_CONFIG` (the daemon's config file). A flag
the CLI lacks, a command that fails or a story that does not end `succeeded` under `watch` fails
the script; the outcome is then checked here, through the Python client and the script's output,
never by assertions written into the docs. A marked block this file does not run, or a procedure
it runs that the docs lost, fails `test_every_marked_block_is_run_here`.

Workers: the worked example runs on a real worker, the tiny preset's random-weight model on CPU at
64x32, 9 frames, 4 steps (small_tiny_preset: at tiny's own sizes its 12 shots took 3.7 minutes on
two busy cores, VAE decoding most of it; like this, about a minute). The runbook's procedures run
on the fake worker (`scheduler.worker: fake`: no model, placeholder clips with real hashes;
`fake:slow=S` in a prompt makes each denoising step take S seconds), so that a shot is reliably
mid-render when a procedure starts. The whole file takes about a minute and a half.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from helpers.daemon_proc import DaemonProcess
from helpers.doc_blocks import procedures
from storyfarm.daemon.artifacts import ArtifactStore
from storyfarm.daemon.client import StoryfarmClient
from storyfarm.daemon.store import JobStore

REPO = Path(__file__).resolve().parents[2]
README, RUNBOOK = REPO / "README.md", REPO / "ops" / "RUNBOOK.md"
BIN = Path(sys.executable).parent
FAKE = {"scheduler": {"worker": "fake"}}
MiB = 1 << 20
DOWNLOAD_RECORD = ".storyfarm-download.json"


# --- running a doc block ------------------------------------------------------------------------

def block(doc: Path, name: str) -> str:
    found = procedures(doc)
    assert name in found, (f"{doc.relative_to(REPO)} has no ```sh block marked `<!-- procedure: {name} -->` "
                           f"(it has: {', '.join(sorted(found)) or 'none'})")
    return found[name]


class Ran:
    def __init__(self, script: str, returncode: int, stdout: str, stderr: str):
        self.script, self.returncode, self.stdout, self.stderr = script, returncode, stdout, stderr

    def report(self) -> str:
        return (f"exit {self.returncode}\n--- script\n{self.script}--- stdout (end)\n{self.stdout[-6000:]}\n"
                f"--- stderr (end)\n{self.stderr[-6000:]}")


@pytest.fixture
def run_block(tmp_path):
    """run_block(doc, name, daemon, **env) -> Ran: the block as one `bash -euo pipefail` script in
    tmp_path/"work" (a copy of configs/stories inside), against `daemon`. Every script runs in its
    own process group, killed afterwards with whatever it left running (a daemon it started)."""
    work = tmp_path / "work"
    shutil.copytree(REPO / "configs" / "stories", work / "configs" / "stories")
    groups: list[int] = []

    def run(doc: Path, name: str, daemon: DaemonProcess, *, timeout: float = 240, **env) -> Ran:
        script = block(doc, name)
        environ = {k: v for k, v in os.environ.items() if not k.startswith("STORYFARM_")}  # no token, no other server
        environ.update(PATH=f"{BIN}{os.pathsep}{environ.get('PATH', '')}", STORYFARM_SERVER=f"127.0.0.1:{daemon.port}",
                       COLUMNS="160", **env)
        proc = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=environ, text=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        groups.append(proc.pid)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            raise AssertionError(f"procedure {name!r} still running after {timeout:g} s\n"
                                 + Ran(script, -1, out, err).report() + f"\n--- daemon\n{daemon.tail()}") from None
        ran = Ran(script, proc.returncode, out, err)
        assert ran.returncode == 0, f"procedure {name!r} of {doc.name} failed: {ran.report()}\n--- daemon\n{daemon.tail()}"
        return ran

    def kill_all() -> None:
        for group in groups:
            kill_group(group)

    run.work, run.kill_all = work, kill_all
    yield run
    kill_all()


def kill_group(group: int, timeout: float = 30) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


@pytest.fixture
def fake_daemon(tmp_path):
    daemon = DaemonProcess(tmp_path / "data", config=FAKE).start()
    try:
        yield daemon
    finally:
        daemon.stop()


def client_of(daemon: DaemonProcess) -> StoryfarmClient:
    return StoryfarmClient(f"127.0.0.1:{daemon.port}")


def story_json(name: str, *prompts: str, steps: int = 4) -> str:
    return json.dumps({"name": name, "resolution": "64x32", "frames": 9, "steps": steps,
                       "shots": [{"prompt": p} for p in prompts]})


def wait_for(predicate, what: str, timeout: float = 60.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def final(client: StoryfarmClient, story_id: str, timeout: float = 120) -> dict:
    def finished():
        story = client.get(story_id)
        return story if story["state"] in ("succeeded", "failed", "cancelled") else None
    return wait_for(finished, f"story {story_id} to finish", timeout, 0.2)


def shot_record(story: dict, index: int) -> dict:
    """What re-rendering a shot would change: its attempts, take and published files (with the
    time each was published)."""
    shot = story["shots"][index]
    return {"attempts": shot["attempts"], "take": shot["take"],
            "artifacts": sorted((a["name"], a["sha256"], a["create_time"]) for a in story["artifacts"]
                                if a.get("shot_index") == index)}


def shot_history(data: Path, story_id: str) -> list[tuple[float, int, str]]:
    """(time, shot index, new state) of every shot state change of a story, oldest first: the job
    store's durable events (what WatchStory replays), read from its database, read-only."""
    db = sqlite3.connect(f"file:{data / 'storyfarm.db'}?mode=ro", uri=True, timeout=30)
    try:
        rows = db.execute("SELECT time, payload FROM events WHERE story_id = ? AND kind = 'shot_state' ORDER BY seq",
                          (story_id,)).fetchall()
    finally:
        db.close()
    return [(t, (p := json.loads(payload))["index"], p["to"]) for t, payload in rows]


def times(history: list[tuple[float, int, str]], index: int, state: str) -> list[float]:
    return [t for t, i, s in history if i == index and s == state]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def command(script: str, prefix: str) -> list[str]:
    """The words of the script's first line starting with `prefix` (its comment dropped)."""
    line = next((line for line in script.splitlines() if line.startswith(prefix)), None)
    assert line is not None, f"the procedure has no `{prefix} ...` line:\n{script}"
    return shlex.split(line, comments=True)


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


# --- the markers themselves ---------------------------------------------------------------------

# Every marked block of the docs; each is run by one test below (checked in its source).
RUN_HERE = {README: {"worked-example"},
            RUNBOOK: {"drain", "restart-after-sigkill", "cancel-and-resume", "batch-rerun", "download-resume"}}


def test_every_marked_block_is_run_here():
    source = Path(__file__).read_text()
    for doc, names in RUN_HERE.items():
        found = set(procedures(doc))
        assert not names - found, f"{doc.relative_to(REPO)} lost its procedures {sorted(names - found)}"
        assert not found - names, f"{doc.relative_to(REPO)}: no test runs its procedures {sorted(found - names)}"
        for name in names:  # and some test here really runs it
            assert re.search(rf'run_block\({"README" if doc == README else "RUNBOOK"}, "{re.escape(name)}"', source), name


def test_the_marker_parser(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("text\n<!-- procedure: a -->\n\n```sh\necho a  # a comment\n\necho b\n```\n"
                   "```sh\nnot marked\n```\n<!-- procedure: b-2 -->\n```bash\nls\n```\n")
    assert procedures(doc) == {"a": "echo a  # a comment\n\necho b\n", "b-2": "ls\n"}
    for bad, why in (("<!-- procedure: a -->\ntext\n```sh\nx\n```\n", "not followed by a ```sh block"),
                     ("<!-- procedure: a -->\n```python\nx\n```\n", "not followed by a ```sh block"),
                     ("<!-- procedure: a -->\n```sh\nx\n", "never closes"),
                     ("<!-- procedure: a -->\n```sh\nx\n```\n<!-- procedure: a -->\n```sh\ny\n```\n", "marked twice")):
        doc.write_text(bad)
        with pytest.raises(ValueError, match=re.escape(why)):
            procedures(doc)


# --- README: the worked example -----------------------------------------------------------------

def small_tiny_preset(folder: Path) -> Path:
    """The tiny preset at 64x32, 9 frames, 4 steps: the same model and stages, about a tenth of the
    work per shot (at tiny's 160x96 and 17 frames, VAE decoding alone takes 4 to 12 s a shot on two
    busy cores, and the worked example renders 12 shots)."""
    data = yaml.safe_load((REPO / "configs" / "models" / "tiny.yaml").read_text())
    data["name"] = "tiny-small"
    data["render"].update(resolution=[64, 32], frames=9, steps=4)
    path = folder / "tiny-small.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_readme_worked_example(tmp_path, run_block):
    """The README's worked example on a real worker (the tiny preset's random-weight model, CPU,
    smaller frames: small_tiny_preset): submit (-q into $ID), priority, pause, resume, watch, get,
    download, ls, a re-render of shot 2 with --cascade, a batch, pool, drain."""
    daemon = DaemonProcess(tmp_path / "data", config={"preset": str(small_tiny_preset(tmp_path))}).start(timeout=180)
    try:
        ran = run_block(README, "worked-example", daemon, timeout=420)
        script = block(README, "worked-example")
        with client_of(daemon) as client:
            mine = client.list(project="lighthouse")
            assert len(mine) == 1, mine
            sid = mine[0]["story_id"]
            story = client.get(sid)
            pool = client.pool()
            batch_id = option(command(script, "storyfarm submit configs/stories/*"), "--batch")
            batch = client.list(batch_id=batch_id)
            listing = {a["name"]: a["sha256"] for a in client.artifacts(sid)}
    finally:
        daemon.stop()
    assert story["state"] == "succeeded" and story["shot_count"] == 6, story
    assert story["priority"] == int(command(script, "storyfarm priority")[3])
    assert ran.stdout.count(f"{sid}: succeeded") == 2  # both watches saw it finish
    # `rerender "$ID" 2 ... --cascade`: shot 2 (index 1) has the edited prompt, shots 2 to 6 a second take
    rerender = command(script, "storyfarm rerender")
    first = int(rerender[3])
    assert story["shots"][first - 1]["prompt"] == option(rerender, "--prompt")
    assert [s["take"] for s in story["shots"]] == [1] * (first - 1) + [2] * (6 - first + 1)
    # the download (of the first take): every file there, verified, no part file left
    out = run_block.work / option(command(script, "storyfarm download"), "--out")
    recorded = json.loads((out / DOWNLOAD_RECORD).read_text())
    assert recorded["story_id"] == sid
    assert all(sha(out / name) == digest for name, digest in recorded["files"].items())
    clips = {n for n in listing if not n.startswith("keyframes/")}  # keyframe names change with a take
    assert clips == {n for n in recorded["files"] if not n.startswith("keyframes/")} and "story.mp4" in clips
    assert not list(out.rglob("*.part"))
    shot1 = [n for n in listing if n.startswith("shots/001_")]
    assert shot1 and all(recorded["files"][n] == listing[n] for n in shot1)  # shot 1 was not re-rendered
    # the batch: one story per file the glob matched; the drain was lifted at the end
    assert len(batch) == len(list((REPO / "configs" / "stories").glob("*.yaml"))) >= 2
    assert "0 shots still running on drained workers" in ran.stdout
    assert pool["draining"] is False


# --- RUNBOOK: the procedures --------------------------------------------------------------------

def test_runbook_drain(fake_daemon, run_block):
    """A slow shot renders when the drain starts: `drain --wait` returns only after it finished,
    nothing else starts while drained (sampled through GetPool and GetStory all along), and after
    `drain --undrain` the story completes."""
    with client_of(fake_daemon) as client:
        sid = client.submit(story_json("keeper", "the keeper climbs fake:slow=2", "the lamp is lit"))["story_id"]
        wait_for(lambda: client.get(sid)["shots"][0]["state"] == "running", "shot 1 running")
        # (asked, answered, draining, the story's running shots): GetStory, then GetPool, both
        # answered between the two times. The drain goes on once and off once, so a shot seen
        # running before a GetPool that says draining started while drained.
        samples: list[tuple[float, float, bool, list[int]]] = []
        stop = threading.Event()

        def sample() -> None:
            with client_of(fake_daemon) as watcher:
                while not stop.is_set():
                    asked = time.time()
                    running = [s["index"] for s in watcher.get(sid)["shots"] if s["state"] == "running"]
                    draining = watcher.pool()["draining"]
                    samples.append((asked, time.time(), draining, running))
                    time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            ran = run_block(RUNBOOK, "drain", fake_daemon)
        finally:
            stop.set()
            sampler.join(timeout=10)
        story = final(client, sid)
        history = shot_history(fake_daemon.data, sid)
    assert story["state"] == "succeeded", story
    on = [sample for sample in samples if sample[2]]
    assert on, "the daemon was never seen draining"
    still_on = on[-1][0]  # the drain was on after this time...
    lifted = next(answered for asked, answered, draining, _ in samples if not draining and asked > on[-1][0])  # ...off before this
    # drain --wait waited: shot 1 (8 s of steps) finished before the undrain, which the script runs after the wait
    [finished] = times(history, 0, "succeeded")
    assert finished < lifted, (history, samples)
    assert story["shots"][0]["attempts"] == 1
    assert "0 shots still running on drained workers" in ran.stdout and "(draining)" in ran.stdout
    # nothing new started while drained: shot 2 started after the last moment the drain was seen on
    [started] = times(history, 1, "running")
    assert started > still_on, (history, samples)
    assert not [sample for sample in samples if sample[2] and 1 in sample[3]]


def test_runbook_restart_after_sigkill(tmp_path, run_block):
    """SIGKILL (daemon and workers) while shot 2 renders; the procedure starts the daemon again
    from the same config file. The story succeeds; shot 1 was not rendered again (same attempts,
    take, files and publish times, the same clip file on disk); the interrupted attempt is
    recorded `lost` and shot 2 ran again."""
    data = tmp_path / "data"
    daemon = DaemonProcess(data, config=FAKE).start()
    try:
        with client_of(daemon) as client:
            sid = client.submit(story_json("tide", "the tide comes in", "the tide turns fake:slow=1",
                                           "the tide goes out"))["story_id"]
            wait_for(lambda: client.get(sid)["shots"][1]["state"] == "running", "shot 2 running")
            before = client.get(sid)
        assert before["shots"][0]["state"] == "succeeded"
        clip = next(data.glob(f"stories/{sid}/shots/001_*.mp4"))
        clip_stat = clip.stat()
        daemon.kill()  # SIGKILL to the daemon's process group: the daemon and its workers
        config = max(tmp_path.glob("daemon-*.yaml"), key=lambda p: p.stat().st_mtime_ns)
        assert f"127.0.0.1:{daemon.port}" in config.read_text()
        ran = run_block(RUNBOOK, "restart-after-sigkill", daemon, ID=sid, STORYFARM_CONFIG=str(config))
        with client_of(daemon) as client:
            after = final(client, sid)
    finally:
        daemon.stop()
        run_block.kill_all()  # the daemon the procedure started (in the script's process group)
    assert after["state"] == "succeeded", after
    assert shot_record(after, 0) == shot_record(before, 0)  # shot 1 kept: no new attempt, take or file
    assert (clip.stat().st_ino, clip.stat().st_mtime_ns) == (clip_stat.st_ino, clip_stat.st_mtime_ns)
    assert sid in ran.stdout  # `ls --state running,queued` listed it, `watch` followed it
    assert f"{sid}: succeeded" in ran.stdout
    with JobStore.open(data / "storyfarm.db") as store:
        attempts = {s.index: [a.outcome for a in store.attempts(s.id)] for s in store.get_story(sid).shots}
    assert attempts == {0: ["succeeded"], 1: ["lost", "succeeded"], 2: ["succeeded"]}


def test_runbook_cancel_and_resume(fake_daemon, run_block):
    """Cancel while shot 2 renders, resume, watch: the story ends succeeded and shot 1, finished
    before the cancel, was not rendered again."""
    with client_of(fake_daemon) as client:
        sid = client.submit(story_json("storm", "a boat in the storm", "the beam sweeps the waves fake:slow=1",
                                       "dawn over the harbour"))["story_id"]
        wait_for(lambda: client.get(sid)["shots"][1]["state"] == "running", "shot 2 running")
        before = client.get(sid)
        ran = run_block(RUNBOOK, "cancel-and-resume", fake_daemon, ID=sid)
        after = client.get(sid)
        history = shot_history(fake_daemon.data, sid)
    reason = option(command(block(RUNBOOK, "cancel-and-resume"), "storyfarm cancel"), "--reason")
    assert f"{sid}: cancelled: {reason}" in ran.stdout  # the cancel took, with its reason
    assert "[cancelled]" in ran.stdout  # and `get` showed it
    assert after["state"] == "succeeded" and not after["error"], after
    assert [s["state"] for s in after["shots"]] == ["succeeded"] * 3
    assert shot_record(after, 0) == shot_record(before, 0)  # finished before the cancel: kept as it was
    assert len(times(history, 0, "running")) == 1  # and never started again
    assert [s for _, i, s in history if i == 1] == ["queued", "running", "cancelled", "queued", "running", "succeeded"]


def test_runbook_batch_rerun(fake_daemon, run_block):
    """The same `submit --batch` command twice: each story exists once."""
    script = block(RUNBOOK, "batch-rerun")
    submits = [shlex.split(line, comments=True) for line in script.splitlines() if line.startswith("storyfarm submit")]
    assert len(submits) == 2 and submits[0] == submits[1], "the procedure runs one command twice"
    batch_id = option(submits[0], "--batch")
    files = [arg for arg in submits[0][2:] if arg.endswith((".yaml", ".json"))]
    ran = run_block(RUNBOOK, "batch-rerun", fake_daemon)
    with client_of(fake_daemon) as client:
        stories = client.list(batch_id=batch_id)
    assert len(stories) == len(files) == 2, stories
    assert ran.stdout.count(" created,") == 2 and ran.stdout.count(f"already submitted in batch {batch_id}") == 2
    assert all(s["story_id"] in ran.stdout for s in stories)  # `ls --batch` listed them


def test_runbook_download_resume(fake_daemon, run_block):
    """An earlier download stopped mid-way left .part files: story.mp4 (republished as a 2.5 MiB
    take, 3 chunks of 1 MiB) after its first chunk, and shot 1's clip (smaller than a chunk) with
    half its bytes. The procedure finishes the download: every file there has the
    listing's sha256 and no .part is left."""
    data = fake_daemon.data
    with client_of(fake_daemon) as client:
        sid = client.submit(story_json("review", "the keeper at the door", "the door shuts"))["story_id"]
        assert final(client, sid)["state"] == "succeeded"
        big = os.urandom(5 * MiB // 2)
        republish(data, sid, "story.mp4", big)
        out = run_block.work / option(command(block(RUNBOOK, "download-resume"), "storyfarm download"), "--out")

        class Interrupted(Exception):  # stands for Ctrl-C or a dropped connection
            pass

        def stop_after(limit: int):
            def progress(got: int, total: int) -> None:
                if got >= limit:
                    raise Interrupted()
            return progress

        with pytest.raises(Interrupted):
            client.download(sid, "story.mp4", out / "story.mp4", on_progress=stop_after(MiB))
        assert (out / "story.mp4.part").stat().st_size == MiB and not (out / "story.mp4").exists()
        clip = next(a["name"] for a in client.artifacts(sid) if a["name"].startswith("shots/001_"))
        whole = client.download(sid, clip, run_block.work.parent / "scratch" / "clip.mp4")
        cut = Path(whole["path"]).read_bytes()[:whole["size"] // 2]
        (out / f"{clip}.part").parent.mkdir(parents=True, exist_ok=True)
        (out / f"{clip}.part").write_bytes(cut)
        ran = run_block(RUNBOOK, "download-resume", fake_daemon, ID=sid)
        listing = {a["name"]: a["sha256"] for a in client.artifacts(sid)}
    assert len(listing) >= 4  # clips, story.mp4, contact sheet, manifest
    assert not list(out.rglob("*.part"))
    files = {p.relative_to(out).as_posix(): sha(p) for p in out.rglob("*") if p.is_file() and p.name != DOWNLOAD_RECORD}
    assert files == listing
    assert (out / "story.mp4").read_bytes() == big
    assert all(name in ran.stdout for name in listing)  # one line per file


def republish(data: Path, story_id: str, name: str, content: bytes) -> None:
    """A new take of `name` as a worker publishes one: the file atomically, then the job store's
    record of its size and sha256 (what the dispatcher writes when the worker reports)."""
    info = ArtifactStore(data).publish(story_id, name, content)
    db = sqlite3.connect(data / "storyfarm.db", timeout=30)
    try:
        with db:
            changed = db.execute("UPDATE artifacts SET size = ?, sha256 = ? WHERE story_id = ? AND name = ?",
                                 (info.size, info.sha256, story_id, name)).rowcount
    finally:
        db.close()
    assert changed == 1


# --- `submit -q`, which the worked example's first line relies on ----------------------------------

def test_submit_quiet_prints_only_the_story_ids(fake_daemon, capsys, tmp_path):
    from storyfarm.daemon import cli

    server = ["--server", f"127.0.0.1:{fake_daemon.port}"]
    for name in ("a", "b"):
        (tmp_path / f"{name}.yaml").write_text(f"name: quiet-{name}\nresolution: 64x32\nframes: 9\nsteps: 2\n"
                                               f"shots:\n  - prompt: a kite over the sea {name}\n")
    files = [str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")]
    with client_of(fake_daemon) as client:
        assert cli.main(["submit", *files, "-q", *server]) == 0
        out = capsys.readouterr().out
        ids = {s["name"]: s["story_id"] for s in client.list()}
        assert out == f"{ids['quiet-a']}\n{ids['quiet-b']}\n"
        for _ in range(2):  # a batch, and the same batch again: the same ids, nothing else
            assert cli.main(["submit", *files, "--batch", "quiet-0412", "--quiet", *server]) == 0
            batch = [s["story_id"] for s in client.list(batch_id="quiet-0412")]
            assert capsys.readouterr().out.splitlines() == batch and len(batch) == 2
    assert cli.main(["submit", files[0], "-q", "--json", *server]) == 2  # one or the other
    assert capsys.readouterr().out == ""
