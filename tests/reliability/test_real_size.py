"""A story at the production shot size, end to end, as a user runs it: every byte path at real size.

The `tiny-480p` preset is the tiny random-weight model at 832x480, 81 frames, 16 fps (one step, no
CFG): the pictures mean nothing, the bytes are real. A real daemon process with its real worker
renders a story submitted through the command line; then, as a user would, the artifacts are
downloaded (interrupted after a few 1 MiB chunks, resumed by `storyfarm download`) and decoded back:
every clip 832x480 with its 81 frames, the story video with every shot's frames, keyframes at full
resolution, a contact sheet and manifest naming every shot, memory latents of a 480p shot inside
the latent pool's byte budget, and the worker's pool gauge on /metrics down to the shared entries
once the story has finished and its memory is released.

Fast mode (make test): two shots, a T2V first shot and a continuation that starts from its last
frame with the first shot's keyframes in memory (on 2 CPU cores the VAE, run on every frame at
full size, is nearly all of the time: a few minutes a story). Long mode: eight shots (cuts that
condition on memory alone too), and the daemon SIGKILLed once two shots are in; restarted, it
renders the rest and leaves the first takes untouched.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from helpers.daemon_proc import CLI, DaemonProcess
from storyfarm.daemon.client import StoryfarmClient
from storyfarm.m2v.video import probe_mp4, read_frame
from storyfarm.story.numbering import shot_number

pytestmark = pytest.mark.slow

MiB = 1 << 20
WIDTH, HEIGHT, FRAMES = 832, 480, 81
# A memory keyframe's VAE latent at 480p (16 channels, one latent frame, /8 spatially), float32:
# what the pool keeps per keyframe of the story's memory.
KEYFRAME_LATENT_BYTES = 16 * (HEIGHT // 8) * (WIDTH // 8) * 4
PROMPTS = ["a white lighthouse on a cliff at dusk", "the keeper opens the heavy door", "a red boat in a night storm",
           "a beam of light sweeps the waves", "the boat turns toward the light", "dawn over a calm harbour",
           "the keeper waves from the cliff", "gulls over the open sea"]


class Interrupted(Exception):
    pass


def story_file(folder: Path, shots: int) -> Path:
    scenes = [{"shots": [{"prompt": PROMPTS[i], **({"cut": False} if i % 3 == 1 else {})}
                         for i in range(start, min(start + 3, shots))]} for start in range(0, shots, 3)]
    path = folder / "real_size.yaml"
    path.write_text(json.dumps({"name": "Real size", "seed": 11, "scenes": scenes}))
    return path


def run_cli(d: DaemonProcess, *argv: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *argv, "--server", f"127.0.0.1:{d.port}"], capture_output=True, text=True, timeout=timeout)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


def test_a_real_size_story_renders_downloads_resumes_and_decodes(tmp_path, scale, figures):
    shots = 8 if scale.long else 2
    d = DaemonProcess(tmp_path / "data", config={"preset": "tiny-480p", "workers": 1}, grace=5).start(timeout=300)
    try:
        story = story_file(tmp_path, shots)
        started = time.monotonic()
        submitted = run_cli(d, "submit", str(story), "--json")
        assert submitted.returncode == 0, submitted.stderr
        sid = json.loads(submitted.stdout)["story_id"]
        first_takes: dict[str, str] = {}
        if scale.long:  # SIGKILL once two shots are in; the restarted daemon renders the rest
            with StoryfarmClient(f"127.0.0.1:{d.port}") as client:
                wait_for(lambda: client.get(sid, full=False)["succeeded_shot_count"] >= 2, 1500, "two shots never finished")
                first_takes = {a["name"]: a["sha256"] for a in client.get(sid)["artifacts"] if a["name"].startswith("shots/")}
            d.kill(signal.SIGKILL)
            d.start(timeout=300)
        watched = run_cli(d, "watch", sid)
        took = time.monotonic() - started
        assert watched.returncode == 0, watched.stdout + watched.stderr + d.tail()
        assert f"shot {shots} of {shots}" in watched.stdout  # the bars and lines number shots from 1

        with StoryfarmClient(f"127.0.0.1:{d.port}") as client:
            got = client.get(sid)
            artifacts = {a["name"]: a for a in got["artifacts"]}
            assert got["state"] == "succeeded" and got["succeeded_shot_count"] == shots
            for clip, sha in first_takes.items():  # the takes from before the kill were not rendered again
                assert artifacts[clip]["sha256"] == sha
            # a download interrupted after three 1 MiB chunks leaves a .part; `storyfarm download` resumes it
            out = tmp_path / "out"
            assert artifacts["story.mp4"]["size"] > 8 * MiB

            def stop_after_three_chunks(received: int, total: int) -> None:
                if received >= 3 * MiB:
                    raise Interrupted()

            with pytest.raises(Interrupted):
                client.download(sid, "story.mp4", out / "story.mp4", on_progress=stop_after_three_chunks)
            assert (out / "story.mp4.part").stat().st_size == 3 * MiB
        downloaded = run_cli(d, "download", sid, "--out", str(out), "--json")
        assert downloaded.returncode == 0, downloaded.stderr
        files = {f["name"]: f for f in json.loads(downloaded.stdout)}
        assert {n: f["sha256"] for n, f in files.items()} == {n: a["sha256"] for n, a in artifacts.items()}
        assert not list(out.rglob("*.part"))

        # decoded back: every clip at the production size, the story video holding every shot's frames
        manifest = json.loads((out / "manifest.json").read_text())
        entries = manifest["shots"]
        assert [e["index"] for e in entries] == list(range(shots))
        for entry in entries:
            clip = probe_mp4(out / entry["file"])
            assert (clip["width"], clip["height"], clip["frames"], clip["fps"]) == (WIDTH, HEIGHT, entry["frames"], 16)
            assert entry["rendered_frames"] == FRAMES and entry["file"].startswith(f"shots/{shot_number(entry['index']):03d}_")
            assert entry["frames"] == (FRAMES - 1 if entry["transition"] == "first_frame" else FRAMES)
        whole = probe_mp4(out / "story.mp4")
        assert (whole["width"], whole["height"], whole["frames"]) == (WIDTH, HEIGHT, sum(e["frames"] for e in entries))
        assert read_frame(out / "story.mp4", whole["frames"] - 1).shape == (HEIGHT, WIDTH, 3)
        assert all(e["memory_keyframes"] for e in entries[1:])  # every shot after the first remembers
        for keyframe in manifest["keyframes"]:
            with Image.open(out / keyframe["file"]) as image:
                assert image.size == (WIDTH, HEIGHT), keyframe
        with Image.open(out / "contact_sheet.png") as sheet:
            assert sheet.size[0] >= 2 * 160 and sheet.size[1] > 0
        pool = manifest["latent_pool"]  # as the last shot left it: its memory window's latents resident
        memory_bytes = len(entries[-1]["memory_keyframes"]) * KEYFRAME_LATENT_BYTES
        assert pool["device_bytes"] >= memory_bytes > 0 and pool["spills"] == 0 and pool["drops"] == 0
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=10).read().decode()
        resident = [float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("storyfarm_latent_pool_resident_bytes{")]
        # the story has finished: its worker released its memory; shared entries (the negative prompt, a
        # blank conditioning clip per size) stay for the next story
        assert resident and 0 < max(resident) <= pool["device_bytes"] - memory_bytes, (resident, pool)
        figures["real_size_story"] = {"shots": shots, "seconds": round(took, 1), "story_mp4_mb": round(artifacts["story.mp4"]["size"] / MiB, 1),
                                      "restarted": scale.long}
        print(f"\nreal-size story: {shots} shots at {WIDTH}x{HEIGHT}x{FRAMES} in {took:.0f} s")
    finally:
        d.stop()
