"""Packaging: storyfarm.* import names, packaged presets, no bare top-level daemon/kernels/... modules."""

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

FORBIDDEN_TOP_LEVEL = {"daemon", "kernels", "scheduler", "proto", "m2v", "configs"}


def test_import_names_live_under_storyfarm(repo):
    import storyfarm.daemon
    import storyfarm.kernels
    import storyfarm.m2v
    import storyfarm.scheduler

    for mod in (storyfarm.daemon, storyfarm.kernels, storyfarm.m2v, storyfarm.scheduler):
        assert Path(mod.__file__).resolve().is_relative_to(repo)
    for name in FORBIDDEN_TOP_LEVEL:
        spec = importlib.util.find_spec(name)
        assert spec is None or not str(spec.origin or "").startswith(str(repo)), f"bare module {name} importable from the repo"


def test_story_module_needs_no_torch():
    code = "import sys; import storyfarm.story.format, storyfarm.scheduler.policy; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_wheel_holds_only_the_storyfarm_namespace(tmp_path, repo):
    # build from a copy: setuptools leaves build/ behind in the source tree it builds
    source = tmp_path / "src"
    shutil.copytree(repo, source, ignore=shutil.ignore_patterns(".venv", ".git", "out", "var", "build", "*.egg-info", "__pycache__", ".hypothesis", ".pytest_cache"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        capture_output=True, text=True,
    )
    if out.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{out.stderr[-3000:]}")
    wheel = next(tmp_path.glob("storyfarm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"storyfarm"}, top
    assert "storyfarm/configs/models/tiny.yaml" in names
    assert "storyfarm/configs/stories/lighthouse.yaml" in names
    assert "storyfarm/daemon/cli.py" in names and "storyfarm/m2v/render/engine.py" in names
    assert "storyfarm/story/format.py" in names and "storyfarm/scheduler/gpu_pool/worker.py" in names
    assert "storyfarm/v1/render_pb2.py" in names and "storyfarm/v1/render.proto" in names
    assert not any(n.startswith("storyfarm/__init__") for n in names)  # implicit namespace
