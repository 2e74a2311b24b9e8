"""The daemon's safety rails over real sockets on 127.0.0.1: mutual TLS (only clients with a
certificate from the configured CA get in), size limits (refused before anything is written, each
refusal naming its field), and SIGTERM under load (NOT_SERVING at once, submits refused, running
shots finish within the grace, exit 0, and a restart finishes what was acknowledged).

Certificates are made per test session with the `openssl` command line (the `cryptography` package
is not a dependency); the test is skipped where there is no openssl binary.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from helpers.daemon_proc import CHANNEL_OPTIONS, NOT_SERVING, DaemonProcess, violations, wait_serving
from helpers.images import png
from storyfarm.daemon.config import ConfigError, DaemonConfig, check_exposure, load_config
from storyfarm.daemon.server import Daemon
from storyfarm.daemon.store import JobStore
from storyfarm.v1 import render_pb2 as pb
from storyfarm.v1 import render_pb2_grpc

SMALL_STORY = json.dumps({"resolution": "64x32", "frames": 9, "steps": 2, "shots": [{"prompt": "a lighthouse at night"}]})
# -- mutual TLS ----------------------------------------------------------------------------------

OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = storyfarm-test
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
"""


class PKI:
    """A throwaway CA (and a second, unrelated one) with server and client certificates."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.config = folder / "openssl.cnf"
        self.config.write_text(OPENSSL_CONFIG)
        self.serial = 1
        for ca in ("ca", "other_ca"):
            self._openssl("req", "-x509", *self._new_key(ca), "-out", f"{ca}.pem", "-days", "2",
                          "-subj", f"/CN=storyfarm test {ca}", "-extensions", "ca")
        self._issue("server", "ca", "server", "/CN=localhost")
        self._issue("client", "ca", "client", "/CN=pipeline-td")
        self._issue("stranger", "other_ca", "client", "/CN=pipeline-td")  # same name, wrong CA

    def _openssl(self, *args: str) -> None:
        done = subprocess.run(["openssl", *args], cwd=self.folder, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"openssl {' '.join(args)}: {done.stderr}"

    def _new_key(self, name: str) -> list[str]:
        return ["-config", str(self.config), "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-keyout", f"{name}.key"]

    def _issue(self, name: str, ca: str, extensions: str, subject: str) -> None:
        self._openssl("req", *self._new_key(name), "-out", f"{name}.csr", "-subj", subject)
        self.serial += 1
        self._openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                      "-set_serial", str(self.serial), "-days", "2", "-extfile", str(self.config),
                      "-extensions", extensions, "-out", f"{name}.pem")

    def path(self, name: str) -> Path:
        return self.folder / name

    def read(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()

    def tls(self) -> dict[str, str]:
        return {"cert": str(self.path("server.pem")), "key": str(self.path("server.key")), "client_ca": str(self.path("ca.pem"))}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> PKI:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make test certificates with")
    return PKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_daemon(pki, tmp_path_factory):
    config = load_config(None, {"listen": "127.0.0.1:0", "data_dir": str(tmp_path_factory.mktemp("data")), "device": "cpu",
                                "grace_seconds": 1, "tls": pki.tls()})
    assert config.mtls
    d = Daemon(config)
    d.start()
    try:
        yield d
    finally:
        d.shutdown()


def tls_channel(pki: PKI, port: int, client: str | None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.read("ca.pem"),
        private_key=pki.read(f"{client}.key") if client else None,
        certificate_chain=pki.read(f"{client}.pem") if client else None,
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=CHANNEL_OPTIONS)


def test_mtls_admits_a_client_with_a_certificate_from_the_ca(pki, mtls_daemon):
    with tls_channel(pki, mtls_daemon.port, "client") as channel:
        wait_serving(channel, what="mTLS daemon (seen through a client with a good certificate)")
        pool = render_pb2_grpc.RenderServiceStub(channel).GetPool(pb.GetPoolRequest(), timeout=10)
        assert [w.worker_id for w in pool.workers] == ["w0"]


@pytest.mark.parametrize("client", [None, "stranger", "insecure"])
def test_mtls_refuses_clients_without_a_certificate_from_the_ca(pki, mtls_daemon, client):
    with tls_channel(pki, mtls_daemon.port, "client") as good:  # the daemon is up and answers a good client
        wait_serving(good, what="mTLS daemon")
    if client == "insecure":
        channel = grpc.insecure_channel(f"127.0.0.1:{mtls_daemon.port}", options=CHANNEL_OPTIONS)
    else:
        channel = tls_channel(pki, mtls_daemon.port, client)
    with channel:
        for call in (lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10),
                     lambda: render_pb2_grpc.RenderServiceStub(channel).GetPool(pb.GetPoolRequest(), timeout=10)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (client, err.value)  # the handshake failed


def test_exposure_rule_admits_mtls_or_tokens_and_refuses_neither(pki, tmp_path):
    base = {"listen": "0.0.0.0:0", "data_dir": str(tmp_path / "data")}
    config = load_config(None, {**base, "tls": pki.tls()})  # mTLS alone is enough: no tokens
    assert config.mtls and not config.auth.tokens and config.listen == "0.0.0.0:0"

    with pytest.raises(ConfigError, match=r"listen: 0\.0\.0\.0:0 is not a loopback address"):
        load_config(None, base)
    with pytest.raises(ConfigError, match=r"listen: 0\.0\.0\.0:0"):  # TLS without client_ca identifies nobody
        load_config(None, {**base, "tls": {"cert": pki.tls()["cert"], "key": pki.tls()["key"]}})
    with pytest.raises(ConfigError, match=r"tls\.client_ca: no such file"):
        load_config(None, {**base, "tls": {**pki.tls(), "client_ca": str(tmp_path / "missing-ca.pem")}})
    with pytest.raises(ConfigError, match=r"listen: \[::\]:50051"):  # a config built in code, checked the same way
        check_exposure(DaemonConfig(listen="[::]:50051"))
    check_exposure(DaemonConfig(listen="[::1]:50051"))  # loopback needs neither


# -- size limits ---------------------------------------------------------------------------------

LIMITS = {"max_message_bytes": 65536, "max_story_bytes": 32768, "max_reference_bytes": 32768}


@pytest.fixture
def limited_daemon(tmp_path):
    data = tmp_path / "data"
    # No need to wait for SERVING: every check here happens before a worker is involved.
    d = Daemon(load_config(None, {"listen": "127.0.0.1:0", "data_dir": str(data), "device": "cpu", "grace_seconds": 1,
                                  "limits": LIMITS}))
    d.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{d.port}", options=CHANNEL_OPTIONS)
    try:
        yield d, render_pb2_grpc.RenderServiceStub(channel), data
    finally:
        channel.close()
        d.shutdown()


def padded_story(total_bytes: int) -> str:
    """A valid story whose JSON text is exactly `total_bytes` long (trailing whitespace, which JSON
    allows and no story field limit counts)."""
    text = SMALL_STORY + " " * (total_bytes - len(SMALL_STORY))
    assert len(text.encode()) == total_bytes
    return text


def test_oversized_and_malformed_requests_are_refused_before_anything_is_written(limited_daemon):
    d, stub, data = limited_daemon
    references = data / "references"
    files_before = {p for p in references.rglob("*")} if references.exists() else set()

    def refused(story: str = SMALL_STORY, images=()) -> grpc.RpcError:
        request = pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=story,
                                        reference_images=[pb.ReferenceImage(name=n, data=b) for n, b in images])
        with pytest.raises(grpc.RpcError) as err:
            stub.SubmitStory(request, timeout=30)
        return err.value

    # Control: a story and a reference image within every limit pass the same checks.
    small_image = png(64, 64)
    ok = stub.SubmitStory(pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=SMALL_STORY, validate_only=True,
                                                reference_images=[pb.ReferenceImage(name="ok.png", data=small_image)]))
    assert ok.shot_count == 1

    # 1. Over max_message_bytes: gRPC itself refuses it, so there is no storyfarm status detail.
    err = refused(padded_story(70_000))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert rpc_status.from_call(err) is None, "expected gRPC's own refusal, not the servicer's"

    # 2. Story text over max_story_bytes, the message within max_message_bytes.
    err = refused(padded_story(40_000))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    fields, _ = violations(err)
    assert "story_json" in fields and "32768" in fields["story_json"], fields
    refused_at_limit = refused(padded_story(32_769))  # one byte over
    assert refused_at_limit.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.SubmitStory(pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=padded_story(32_768),
                                                  validate_only=True)).shot_count == 1  # exactly at the limit is fine

    # 3. A real PNG over max_reference_bytes (it would decode: only the size limit can refuse it).
    big_image = png(128, 128, noise=True)
    assert 32768 < len(big_image) < 60_000
    err = refused(images=[("big.png", big_image)])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    fields, reason = violations(err)
    assert reason == "INVALID_REFERENCE_IMAGE" and "reference_images[0].data" in fields, (reason, fields)
    assert "32768" in fields["reference_images[0].data"], fields

    # 4. Random bytes named like a PNG.
    err = refused(images=[("x.png", os.urandom(4096))])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    fields, reason = violations(err)
    assert reason == "INVALID_REFERENCE_IMAGE" and "reference_images[0].data" in fields, (reason, fields)
    err = refused(images=[("ok.png", small_image), ("x.png", os.urandom(4096))])  # a good image does not carry a bad one
    assert set(violations(err)[0]) == {"reference_images[1].data"}

    assert list(stub.ListStories(pb.ListStoriesRequest(page_size=100)).stories) == []
    files_after = {p for p in references.rglob("*")} if references.exists() else set()
    assert files_after == files_before, sorted(map(str, files_after - files_before))


def test_a_small_message_limit_still_serves_artifacts_larger_than_it(limited_daemon):
    """The limit bounds what callers send; downloads (1 MiB chunks) must not be cut to it."""
    d, stub, _ = limited_daemon
    story_id = stub.SubmitStory(pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=SMALL_STORY)).story_id
    deadline = time.monotonic() + 120
    while (story := stub.GetStory(pb.GetStoryRequest(story_id=story_id))).state != pb.STORY_STATE_SUCCEEDED:
        assert story.state in (pb.STORY_STATE_QUEUED, pb.STORY_STATE_RUNNING) and time.monotonic() < deadline, story
        time.sleep(0.2)
    largest = max(story.artifacts, key=lambda a: a.size)
    assert largest.size > LIMITS["max_message_bytes"], [(a.name, a.size) for a in story.artifacts]  # else nothing is tested
    chunks = list(stub.DownloadArtifact(pb.DownloadArtifactRequest(story_id=story_id, name=largest.name), timeout=30))
    data = b"".join(c.data for c in chunks)
    assert len(data) == largest.size and hashlib.sha256(data).hexdigest() == largest.sha256


# -- SIGTERM under load --------------------------------------------------------------------------

GRACE = 8.0
# Four shots of a second or so each on an idle CPU worker (several on a busy machine). SIGTERM lands
# half-way through shot 1 (or 2): the worker is warm by then (a cold worker's first shot is much
# slower), so the running shot finishes within the grace, and a drain that let the next start shows.
LONG_STORY = json.dumps({"seed": 11, "resolution": "96x64", "frames": 17, "steps": 24,
                         "shots": [{"prompt": f"shot {i}: gulls circle the lighthouse", **({"cut": False} if i else {})}
                                   for i in range(4)]})


@pytest.mark.slow
def test_sigterm_under_load_drains_then_exits_and_a_restart_finishes_the_story(tmp_path):
    data = tmp_path / "data"
    daemon = DaemonProcess(data, grace=GRACE).start()
    try:
        story_id = daemon.stub.SubmitStory(pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=LONG_STORY)).story_id
        deadline = time.monotonic() + 90
        while True:  # shot 1 or 2 half-way through its denoising: it can finish within the grace
            story = daemon.stub.GetStory(pb.GetStoryRequest(story_id=story_id))
            if any(s.state == pb.SHOT_STATE_RUNNING and s.progress.step * 2 >= s.progress.total_steps > 0 for s in story.shots[1:3]):
                break
            assert time.monotonic() < deadline and story.shots[2].state != pb.SHOT_STATE_SUCCEEDED, "could not catch a shot mid-way"
            time.sleep(0.01)

        os.kill(daemon.pid, signal.SIGTERM)  # the daemon only: its workers are the daemon's to stop
        signalled, signalled_wall = time.monotonic(), time.time()
        not_serving_after, seen = None, []
        while not_serving_after is None and time.monotonic() - signalled < 1.0:
            try:
                status = daemon.health.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status
                seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
                if status == NOT_SERVING:
                    not_serving_after, not_serving_wall = time.monotonic() - signalled, time.time()
            except grpc.RpcError as exc:
                seen.append(exc.code().name)
            time.sleep(0.02)
        assert not_serving_after is not None, \
            f"health did not report NOT_SERVING within 1 s of SIGTERM: {seen}; {daemon.tail(2000)}"

        with pytest.raises(grpc.RpcError) as err:
            daemon.stub.SubmitStory(pb.SubmitStoryRequest(request_id=uuid.uuid4().hex, story_json=SMALL_STORY), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        reason = violations(err.value)[1]
        # SHUTTING_DOWN while the server still answers; no detail at all once it has stopped listening
        assert reason in ("SHUTTING_DOWN", None), reason

        try:
            code = daemon.proc.wait(timeout=GRACE + 10 - (time.monotonic() - signalled))
        except subprocess.TimeoutExpired:
            pytest.fail(f"daemon still running {GRACE + 10} s after SIGTERM: {daemon.tail(2000)}")
        exited_after = time.monotonic() - signalled
        assert code == 0, daemon.tail(2000)
    finally:
        daemon.stop()

    with JobStore.open(data / "storyfarm.db") as store:
        story = store.get_story(story_id)
        attempts = [a for s in story.shots for a in store.attempts(s.id)]
    assert story.state != "succeeded", "nothing left for the restart: the drain let new shots start"
    # Draining: once the shot that was running when the drain began has finished, no other starts.
    drained = [a.finished_at for a in attempts if a.finished_at is not None and a.finished_at > not_serving_wall]
    assert not drained or all(a.started_at < min(drained) for a in attempts), \
        [(a.shot_id, a.outcome, round(a.started_at - not_serving_wall, 2)) for a in attempts]
    # The running shot got its grace: it finished (as succeeded, not stopped) during the drain, or
    # it was still running when the whole grace had passed and is left to re-run after the restart.
    for a in attempts:
        if a.finished_at is None:
            assert exited_after >= GRACE, f"the daemon exited {exited_after:.1f} s after SIGTERM with a shot still running"
        elif a.finished_at > signalled_wall:
            assert a.outcome == "succeeded", a
    finished_in_grace = {a.shot_id for a in attempts if a.outcome == "succeeded"}

    daemon = DaemonProcess(data, grace=GRACE).start()  # the same data dir
    try:
        deadline = time.monotonic() + 120
        while (story := daemon.stub.GetStory(pb.GetStoryRequest(story_id=story_id))).state != pb.STORY_STATE_SUCCEEDED:
            assert story.state in (pb.STORY_STATE_QUEUED, pb.STORY_STATE_RUNNING), story
            assert time.monotonic() < deadline, "the story did not finish after the restart"
            time.sleep(0.2)
        assert [s.state for s in story.shots] == [pb.SHOT_STATE_SUCCEEDED] * 4
        assert [s.story_id for s in daemon.stub.ListStories(pb.ListStoriesRequest(page_size=100)).stories] == [story_id]
        os.kill(daemon.pid, signal.SIGTERM)
        assert daemon.proc.wait(timeout=GRACE + 10) == 0, daemon.tail(2000)
    finally:
        daemon.stop()
    with JobStore.open(data / "storyfarm.db") as store:
        for shot in store.get_story(story_id).shots:
            outcomes = [a.outcome for a in store.attempts(shot.id)]
            if shot.id in finished_in_grace:
                assert outcomes == ["succeeded"], (shot.index, outcomes)  # never rendered again
            else:  # interrupted after the grace (recorded lost, budget intact), or never started before
                assert outcomes in (["lost", "succeeded"], ["succeeded"]), (shot.index, outcomes)
