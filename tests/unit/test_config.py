"""Daemon config: merge order, unknown keys, ${VAR}, the loopback rule, default vs production."""

import json
import sys
from pathlib import Path

import pytest

from storyfarm.daemon.config import ConfigError, DaemonConfig, is_loopback, load_config

SHA = "ab" * 32
TOKENS = {"require": True, "tokens": [{"name": "ci", "project": "p1", "role": "submitter", "sha256": SHA}]}


def write(tmp_path: Path, text: str) -> str:
    f = tmp_path / "daemon.yaml"
    f.write_text(text)
    return str(f)


def test_embedded_defaults():
    c = load_config(None, {})
    assert (c.listen, c.metrics_listen, c.preset, c.device, c.workers) == ("127.0.0.1:50051", "127.0.0.1:9400", "tiny", "auto", 1)
    assert (c.grace_seconds, c.max_attempts, c.reflection, c.log_format) == (30, 3, True, "text")
    assert c.data_dir == Path.cwd() / "var"
    assert not c.auth.require and c.auth.tokens == () and c.tls is None
    lim = c.limits
    assert (lim.max_message_bytes, lim.max_story_bytes, lim.max_reference_bytes) == (64 << 20, 1 << 20, 16 << 20)
    assert (lim.max_shots, lim.max_references, lim.max_reference_pixels, lim.max_prompt_chars) == (1000, 64, 40_000_000, 4000)
    assert lim.admits_work(832, 480, 81, 40) and lim.admits_work(1280, 720, 81, 40)
    assert not lim.admits_work(832, 480, 321, 40) and not lim.admits_work(1920, 1080, 321, 200)


def test_default_yaml_spells_out_the_embedded_defaults(repo):
    assert load_config(str(repo / "configs" / "default.yaml")) == load_config(None) == DaemonConfig()


def test_production_turns_reflection_off_and_needs_a_token(monkeypatch):
    monkeypatch.delenv("STORYFARM_LISTEN", raising=False)
    monkeypatch.delenv("STORYFARM_ADMIN_TOKEN_SHA256", raising=False)
    with pytest.raises(ConfigError, match=r"auth.tokens.0.sha256: environment variable STORYFARM_ADMIN_TOKEN_SHA256 is not set"):
        load_config("production")
    monkeypatch.setenv("STORYFARM_ADMIN_TOKEN_SHA256", SHA)
    prod = load_config("production")
    assert prod.reflection is False and load_config("default").reflection is True
    assert prod.listen == "0.0.0.0:50051" and prod.auth.require and prod.auth.tokens[0].role == "admin"
    assert prod.log_format == "json"


def test_merge_order_flags_over_file_over_defaults(tmp_path):
    path = write(tmp_path, "workers: 3\npreset: from-file\nlimits: {max_shots: 10}\n")
    c = load_config(path, {"preset": "from-flag", "listen": None, "limits.max_prompt_chars": 99})
    assert c.preset == "from-flag"  # flag beats file
    assert c.workers == 3  # file beats default
    assert c.listen == "127.0.0.1:50051"  # None: flag not given
    assert (c.limits.max_shots, c.limits.max_prompt_chars, c.limits.max_references) == (10, 99, 64)  # nested sections merge


def test_flags_replace_token_lists_whole(tmp_path):
    path = write(tmp_path, json.dumps({"auth": TOKENS}))
    other = {"name": "other", "project": "p2", "role": "viewer", "sha256": "cd" * 32}
    c = load_config(path, {"auth": {"tokens": [other]}})
    assert [t.name for t in c.auth.tokens] == ["other"] and c.auth.require


@pytest.mark.parametrize(
    "body, needle",
    [
        ("listne: 1.2.3.4:1\n", r"daemon.yaml: listne: Extra inputs are not permitted"),
        ("limits: {max_shotz: 3}\n", r"limits.max_shotz: Extra inputs"),
        ("auth: {tokens: [{name: a, project: p, role: owner, sha256: " + SHA + "}]}\n", r"auth.tokens.0.role"),
        ("auth: {tokens: [{name: a, project: p, role: viewer, sha256: hunter2}]}\n", r"sha256: must be the token's sha256"),
        ("auth: {tokens: [{name: a, project: p, role: admin, sha256: " + SHA + "}]}\n", r"admin tokens act on every project"),
        ("auth: {require: true}\n", r"no caller could be admitted"),
        ("device: tpu\n", r"device: Input should be 'auto', 'cpu' or 'cuda'"),
        ("workers: 0\n", r"workers: Input should be greater than or equal to 1"),
        ("listen: nowhere\n", r"listen: 'nowhere': expected HOST:PORT"),
        ("limits: {max_message_bytes: 2048}\n", r"max_story_bytes .* exceeds max_message_bytes"),
        ("tls: {cert: a.pem, key: b.pem}\n", r"tls.cert: no such file"),
        ("- a\n", r"expected a mapping"),
        ("listen: [\n", r"not valid YAML"),
    ],
)
def test_bad_files_name_the_field(tmp_path, body, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(write(tmp_path, body))


def test_flag_errors_name_the_command_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^command line: grace_seconds: Input should be greater than or equal to 0$"):
        load_config(write(tmp_path, "workers: 2\n"), {"grace_seconds": -1})
    with pytest.raises(ConfigError, match=r"command line: limits.nope: Extra inputs"):
        load_config(None, {"limits.nope": 1})
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "missing.yaml"))


def test_variables_expand_and_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.setenv("SF_TEST_DATA", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    c = load_config(write(tmp_path, "data_dir: ${SF_TEST_DATA}/x\nworkers: ${SF_TEST_UNSET:-4}\n"))
    assert c.data_dir == tmp_path / "data" / "x" and c.workers == 4
    assert load_config(None, {"data_dir": "rel"}).data_dir == tmp_path / "rel"  # flags: the same rule


@pytest.mark.parametrize(
    "address, loopback",
    [
        ("127.0.0.1:50051", True), ("127.8.9.10:1", True), ("[::1]:50051", True), ("localhost:1", True),
        ("[::ffff:127.0.0.1]:1", True), ("unix:/run/storyfarm.sock", True),
        ("0.0.0.0:50051", False), ("[::]:50051", False), ("192.168.1.20:50051", False),
        ("10.0.0.5:1", False), ("farm01.studio.lan:1", False),
    ],
)
def test_loopback_addresses(address, loopback):
    assert is_loopback(address) is loopback


@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "192.168.1.20:50051", "[::]:50051"])
def test_non_loopback_listen_needs_tokens_or_mtls(listen, tmp_path):
    with pytest.raises(ConfigError, match="not a loopback address; refusing"):
        load_config(None, {"listen": listen})
    with pytest.raises(ConfigError, match="not a loopback address"):  # tokens present but not required
        load_config(None, {"listen": listen, "auth": {**TOKENS, "require": False}})
    assert load_config(None, {"listen": listen, "auth": TOKENS}).listen == listen
    for name in ("cert", "key", "ca"):
        (tmp_path / name).write_text("x")
    with pytest.raises(ConfigError, match="not a loopback address"):  # server TLS alone proves nothing about callers
        load_config(None, {"listen": listen, "tls": {"cert": str(tmp_path / "cert"), "key": str(tmp_path / "key")}})
    mtls = {"cert": str(tmp_path / "cert"), "key": str(tmp_path / "key"), "client_ca": str(tmp_path / "ca")}
    assert load_config(None, {"listen": listen, "tls": mtls}).mtls


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "[::1]:6000", "127.0.0.2:7"])
def test_loopback_listen_runs_without_auth(listen):
    assert load_config(None, {"listen": listen}).listen == listen


def test_redacted_dict_hides_token_hashes():
    c = load_config(None, {"listen": "0.0.0.0:1", "auth": TOKENS})
    out = c.redacted_dict()
    assert SHA not in json.dumps(out)
    assert out["auth"]["tokens"][0] == {"name": "ci", "project": "p1", "role": "submitter", "sha256": "<redacted>"}
    assert out["data_dir"] == str(c.data_dir) and out["limits"]["max_shots"] == 1000


def test_config_module_needs_no_torch():
    import subprocess

    code = ("import sys; import storyfarm.daemon.config, storyfarm.daemon.auth, storyfarm.daemon.artifacts; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
