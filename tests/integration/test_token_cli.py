"""`storyfarm token create` end to end: the printed entry, pasted into a daemon config file as is,
admits the printed token with the role it was made for; bad flags are refused with exit 2, naming
the flag and what is allowed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml

from storyfarm.daemon.auth import hash_token
from storyfarm.daemon.cli import main
from storyfarm.v1 import render_pb2 as pb
from helpers.daemon_inproc import running_daemon

CLI = str(Path(sys.executable).with_name("storyfarm"))


def create(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "token", "create", *flags], capture_output=True, text=True, timeout=60)


def test_a_created_token_admits_its_caller_with_its_role(tmp_path):
    made = create("--project", "film", "--role", "submitter")
    assert made.returncode == 0, made.stderr
    lines = made.stdout.splitlines()
    token = next(line for line in lines if line.startswith("sft_"))
    entry = next(line for line in lines if line.startswith("- {"))
    assert token not in entry and hash_token(token) in entry and len(lines) == 4
    admin = json.loads(create("--role", "admin", "--json").stdout)  # a second entry, from the JSON form
    assert (admin["project"], admin["sha256"]) == ("*", hash_token(admin["token"]))
    config = tmp_path / "daemon.yaml"
    config.write_text(f"auth:\n  require: true\n  tokens:\n    {entry}\n    {admin['entry']}\n")
    assert [t["role"] for t in yaml.safe_load(config.read_text())["auth"]["tokens"]] == ["submitter", "admin"]
    with running_daemon(tmp_path / "data", config_file=str(config)) as (daemon, stub):
        assert daemon.config.auth.require and len(daemon.config.auth.tokens) == 2
        bearer = [("authorization", f"Bearer {token}")]
        assert len(stub.GetPool(pb.GetPoolRequest(), metadata=bearer, timeout=30).workers) == 1
        assert stub.ListStories(pb.ListStoriesRequest(project="film"), metadata=bearer, timeout=30).stories == []
        for metadata, code in ((None, grpc.StatusCode.UNAUTHENTICATED), (bearer, grpc.StatusCode.PERMISSION_DENIED)):
            with pytest.raises(grpc.RpcError) as refused:  # drain needs admin
                stub.Drain(pb.DrainRequest(undrain=True), metadata=metadata, timeout=30)
            assert refused.value.code() == code
        stub.Drain(pb.DrainRequest(undrain=True), metadata=[("authorization", f"Bearer {admin['token']}")], timeout=30)


@pytest.mark.parametrize("flags, flag, allowed", [
    (["--project", "film", "--role", "boss"], "--role", "'viewer', 'submitter', 'admin'"),
    (["--project", "bad name", "--role", "viewer"], "--project", "letters, digits, '_', '.' or '-'"),
    (["--project", "film/../x", "--role", "submitter"], "--project", "or '*' for every project"),
    (["--role", "submitter"], "--project", "required for role submitter"),
    (["--project", "film", "--role", "admin"], "--project", "admin tokens act on every project"),
    (["--project", "film", "--role", "viewer", "--name", "a b"], "--name", "starting with a letter or digit"),
])
def test_bad_flags_name_the_flag_and_what_is_allowed(flags, flag, allowed, capsys):
    try:
        code = main(["token", "create", *flags])
    except SystemExit as exit_:  # argparse's own refusal (a role not among the choices)
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 2 and not out, out
    assert f"argument {flag}:" in err and allowed in err, err
