"""The layer rules of DESIGN.md §2: the import-linter contracts of pyproject.toml ([tool.importlinter])
hold, a planted violation of each is caught, and at run time the daemon's parent and the story
package load no torch, numpy, PIL or av.

The linter runs as `lint-imports` from this interpreter's bin folder, with --no-cache (each run
builds its graph afresh, well under a second). A planted violation is checked against a copy of the packages: a
folder holding a `storyfarm/` namespace with each package copied under its import name, put on
PYTHONPATH. The editable install's finder sits after the path finder on sys.meta_path, so the copy
wins; `packages_import_from` checks that it does.

No storyfarm import at module level: the contract tests must report even when a package is broken.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
LINT = Path(sys.executable).with_name("lint-imports")
HEAVY = ("torch", "numpy", "PIL", "av")


def package_dirs() -> dict[str, Path]:
    """Import name -> folder, from pyproject's [tool.setuptools] package-dir (top-level packages)."""
    mapping = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in mapping.items()}


def contract_ids() -> list[str]:
    return [c["id"] for c in tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]]


def lint(config: Path, *, cwd: Path, contracts: tuple[str, ...] = (), pythonpath: Path | None = None) -> tuple[int, str]:
    """Run lint-imports on `config`; returns its exit code and its output (a wide terminal, so that
    a chain's import stays on one line; match with `flat` all the same)."""
    env = {**os.environ, "COLUMNS": "300", "NO_COLOR": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    args = [str(LINT), "--no-cache", "--no-logo", *(f"--contract={c}" for c in contracts), str(config)]
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def flat(output: str) -> str:
    """Runs of whitespace made one space: the linter wraps long lines at the terminal's width."""
    return re.sub(r"\s+", " ", output)


def run_python(code: str, *, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, **kw)


# --- the contracts --------------------------------------------------------------------------------


def test_contracts_kept():
    assert LINT.is_file(), f"{LINT} missing: import-linter is in the dev extra"
    packages_import_from(ROOT)  # the linter reads this tree (an editable install), not a copy elsewhere
    code, output = lint(PYPROJECT, cwd=ROOT)
    assert code == 0, f"import-linter contracts broken (lint-imports exit {code}):\n{output}"
    assert f"Contracts: {len(contract_ids())} kept, 0 broken" in flat(output), output


# --- planted violations, in a copy ----------------------------------------------------------------

# name: (package, its module to plant in, the line appended, the contract it breaks, the import the
# linter must name in its report)
PLANTS = {
    "daemon-imports-torch": ("storyfarm.daemon", "dispatcher.py", "import torch", "daemon-parent",
                             "storyfarm.daemon.dispatcher -> torch"),
    "story-imports-daemon": ("storyfarm.story", "format.py", "import storyfarm.daemon", "layers",
                             "storyfarm.story.format -> storyfarm.daemon"),
    "story-imports-numpy": ("storyfarm.story", "files.py", "import numpy", "story-torch-free",
                            "storyfarm.story.files -> numpy"),
    "policy-imports-gpu-pool": ("storyfarm.scheduler", "policy.py", "import storyfarm.scheduler.gpu_pool",
                                "policy-pure", "storyfarm.scheduler.policy -> storyfarm.scheduler.gpu_pool"),
    "m2v-imports-proto": ("storyfarm.m2v", "video.py", "from storyfarm.v1 import render_pb2", "proto-daemon-only",
                          "storyfarm.m2v.video -> storyfarm.v1.render_pb2"),
    "executor-imports-worker": ("storyfarm.scheduler", "gpu_pool/processes.py",
                                "from storyfarm.scheduler.gpu_pool import worker", "gpu-pool-parent",
                                "storyfarm.scheduler.gpu_pool.processes -> storyfarm.scheduler.gpu_pool.worker"),
}


def copy_packages(dest: Path) -> Path:
    """dest/src/storyfarm/<name>: a copy of every package under its import name, plus the linter's
    config; returns dest/src (for PYTHONPATH)."""
    src = dest / "src"
    for name, folder in package_dirs().items():
        shutil.copytree(folder, src / name.replace(".", "/"), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(PYPROJECT, dest / "pyproject.toml")
    return src


def packages_import_from(where: Path, pythonpath: Path | None = None) -> None:
    """Every package, imported by a fresh interpreter (with `pythonpath` as PYTHONPATH when given),
    comes from a file under `where`."""
    names = list(package_dirs())
    env = os.environ if pythonpath is None else {**os.environ, "PYTHONPATH": str(pythonpath)}
    found = run_python(f"""
        import importlib.util, json
        print(json.dumps({{n: importlib.util.find_spec(n).origin for n in {names!r}}}))
    """, env=env, cwd=where)
    assert found.returncode == 0, found.stderr
    origins = json.loads(found.stdout)
    assert all(Path(o).resolve().is_relative_to(where.resolve()) for o in origins.values()), (where, origins)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layers-pristine")
    packages_import_from(root, pythonpath=copy_packages(root))
    return root


def test_copy_matches_the_tree(pristine):
    """Without a plant the copy gets the same verdict as the tree (same files, same imports), and
    none of the planted imports is reported."""
    tree_code, tree_out = lint(PYPROJECT, cwd=ROOT)
    copy_code, copy_out = lint(pristine / "pyproject.toml", cwd=pristine, pythonpath=pristine / "src")
    summary = re.compile(r"Analyzed \d+ files, \d+ dependencies|Contracts: \d+ kept, \d+ broken")
    tree_summary, copy_summary = summary.findall(flat(tree_out)), summary.findall(flat(copy_out))
    assert copy_summary == tree_summary and len(tree_summary) == 2, (tree_out, copy_out)
    assert copy_code == tree_code
    for *_, reported in PLANTS.values():
        assert reported not in flat(copy_out), copy_out


@pytest.mark.parametrize("plant", PLANTS)
def test_planted_violation_is_reported(plant, pristine, tmp_path):
    package, module, line, contract, reported = PLANTS[plant]
    shutil.copytree(pristine, tmp_path / "copy")
    target = tmp_path / "copy" / "src" / package.replace(".", "/") / module
    target.write_text(target.read_text() + f"\n{line}  # planted by test_layers\n")

    code, output = lint(tmp_path / "copy" / "pyproject.toml", cwd=tmp_path / "copy", contracts=(contract,),
                        pythonpath=tmp_path / "copy" / "src")
    assert code == 1, f"{contract} did not break on `{line}` in {package}.{module}:\n{output}"
    assert "Contracts: 0 kept, 1 broken" in flat(output), output
    assert reported in flat(output), output


# --- at run time ----------------------------------------------------------------------------------

FORBIDDEN_AT_RUNTIME = {
    "daemon-server": (["storyfarm.daemon.server"], HEAVY + ("storyfarm.m2v", "storyfarm.kernels")),
    "story": (["storyfarm.story"], HEAVY + ("storyfarm.daemon", "storyfarm.scheduler", "storyfarm.m2v",
                                             "storyfarm.kernels", "storyfarm.v1")),
    "policy": (["storyfarm.scheduler.policy", "storyfarm.scheduler.simulate"],
               HEAVY + ("storyfarm.m2v", "storyfarm.kernels", "storyfarm.scheduler.gpu_pool")),
}


@pytest.mark.parametrize("case", FORBIDDEN_AT_RUNTIME)
def test_imports_load_nothing_heavy(case):
    """A fresh interpreter imports the modules (a package: all its modules) and lists what of the
    forbidden set sys.modules holds; pydantic and yaml are allowed."""
    roots, forbidden = FORBIDDEN_AT_RUNTIME[case]
    result = run_python(f"""
        import importlib, json, pkgutil, sys
        imported = []
        for name in {roots!r}:
            module = importlib.import_module(name)
            imported.append(name)
            for info in pkgutil.walk_packages(getattr(module, "__path__", []), name + "."):
                importlib.import_module(info.name)
                imported.append(info.name)
        loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in {forbidden!r}))
        print(json.dumps({{"imported": imported, "loaded": loaded}}))
    """)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["loaded"] == [], f"importing {report['imported']} loaded {report['loaded']}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# `storyfarm serve` (cli.main) in the main thread; a watcher thread waits until the daemon is
# SERVING with an idle worker (its model loaded in the worker process) and its SIGTERM handler is
# in place, prints what the parent's sys.modules holds, then SIGTERMs its own process: the daemon
# shuts down gracefully and the command returns.
SERVE_AND_REPORT = """
import json, os, signal, sys, threading, time

HEAVY = {heavy!r}


def watch():
    port, timeout = int(sys.argv[1]), float(sys.argv[4])
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from storyfarm.v1 import render_pb2 as pb, render_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{{port}}")
    health, stub = health_pb2_grpc.HealthStub(channel), render_pb2_grpc.RenderServiceStub(channel)
    deadline, ready, workers = time.monotonic() + timeout, False, []
    while not ready and time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            serving = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING
            workers = [pb.WorkerState.Name(w.state) for w in stub.GetPool(pb.GetPoolRequest(), timeout=2).workers]
        except grpc.RpcError:
            continue
        ready = serving and "WORKER_STATE_IDLE" in workers and signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
    loaded = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in HEAVY))
    print("REPORT " + json.dumps({{"ready": ready, "workers": workers, "loaded": loaded}}), flush=True)
    channel.close()
    os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":  # the spawned worker imports this file again as __mp_main__
    threading.Thread(target=watch, daemon=True).start()
    from storyfarm.daemon.cli import main

    port, metrics_port, data = sys.argv[1:4]
    sys.exit(main(["serve", "--listen", f"127.0.0.1:{{port}}", "--metrics-listen", f"127.0.0.1:{{metrics_port}}",
                   "--data-dir", data, "--preset", "tiny", "--workers", "1", "--device", "cpu", "--grace-seconds", "5"]))
"""


def test_running_daemon_parent_loads_nothing_heavy(tmp_path):
    """A real `storyfarm serve` (tiny preset, one CPU worker, which loads torch in its own process):
    once the worker is idle, the parent holds none of torch, numpy, PIL, av, m2v or kernels."""
    heavy = HEAVY + ("storyfarm.m2v", "storyfarm.kernels")
    script = tmp_path / "serve_and_report.py"
    script.write_text(SERVE_AND_REPORT.format(heavy=heavy))
    proc = subprocess.Popen([sys.executable, str(script), str(_free_port()), str(_free_port()), str(tmp_path / "data"), "90"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the daemon did not stop:\n{output[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of its workers
        except ProcessLookupError:
            pass
    reports = [json.loads(line.split(" ", 1)[1]) for line in output.splitlines() if line.startswith("REPORT ")]
    assert reports, f"no report (exit {proc.returncode}):\n{output[-3000:]}"
    report = reports[0]
    assert report["ready"], f"the daemon never had an idle worker ({report['workers']}):\n{output[-3000:]}"
    assert report["loaded"] == [], f"the daemon's parent loaded {report['loaded']}"
    assert proc.returncode == 0, f"the daemon exited {proc.returncode} on SIGTERM:\n{output[-3000:]}"
