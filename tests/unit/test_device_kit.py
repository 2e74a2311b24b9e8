"""The device kit (bench/device): what a GPU session carries must install there without a network.

A device call costs minutes of a 30-minute budget, so the wheel list and its closure are checked
here, on CPU, where they cost nothing."""

import importlib.util
import subprocess
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

KIT = Path(__file__).resolve().parents[2] / "bench" / "device"
spec = importlib.util.spec_from_file_location("device_closure", KIT / "closure.py")
closure = importlib.util.module_from_spec(spec)
spec.loader.exec_module(closure)


def pinned() -> dict[str, str]:
    pins = {}
    for line in (KIT / "wheels.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (op_version,) = req.specifier
            assert op_version.operator == "==", line
            name = canonicalize_name(req.name)
            assert name not in pins, f"{name} pinned twice"
            pins[name] = op_version.version
    return pins


def fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"] + [f"Requires-Dist: {r}" for r in requires]
        zf.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(meta) + "\n")
    return path


def test_the_pins_never_carry_the_images_torch_stack():
    pins = pinned()
    assert not {"torch", "triton", "torchvision"} & set(pins)
    assert not [name for name in pins if name.startswith("nvidia-")]
    assert {"diffusers", "torchao", "grpcio", "protobuf", "av"} <= set(pins)


def test_every_project_dependency_is_carried_or_in_the_image():
    missing = [str(r) for r in closure.project_requirements()
               if canonicalize_name(r.name) not in set(pinned()) | closure.image_packages(KIT / "image-packages.txt")]
    assert missing == []


def test_closure_names_what_is_missing_mismatched_or_doubled(tmp_path):
    image_list = tmp_path / "image.txt"
    image_list.write_text("# the image\nnumpy\ntorch\n")
    wheels = tmp_path / "whl"
    wheels.mkdir()
    for r in closure.project_requirements():  # the project's own needs, satisfied by fakes
        if canonicalize_name(r.name) not in {"numpy", "torch"}:
            version = next(iter(r.specifier)).version if r.specifier else "1.0"
            fake_wheel(wheels, canonicalize_name(r.name).replace("-", "_"), version, [])
    assert closure.check(wheels, image_list) == []
    fake_wheel(wheels, "needy", "1.0", ["numpy", "absent-package>=2", "pillow>=999", "colorama; sys_platform == 'win32'"])
    problems = closure.check(wheels, image_list)
    assert any("absent-package>=2, which is neither carried nor in the image" in p for p in problems), problems
    assert any("needs pillow>=999, carried pillow" in p for p in problems), problems
    assert not any("colorama" in p or "numpy" in p for p in problems), problems  # markers, image packages
    fake_wheel(wheels, "needy", "2.0", [])
    assert any("a second version of needy" in p for p in closure.check(wheels, image_list))


@pytest.mark.parametrize("script", ["run.sh", "fetch-wheels.sh"])
def test_kit_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(KIT / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
