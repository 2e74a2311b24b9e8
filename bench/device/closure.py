"""Check that the carried wheels plus the device image satisfy the project and each other.

    python bench/device/closure.py .whl bench/device/image-packages.txt

A device call that finds a package missing has already spent minutes of a 30-minute budget; this
check spends none. It reads the project's runtime dependencies (pyproject.toml) and every carried
wheel's Requires-Dist, evaluates their markers for the image (CPython 3.12, Linux x86-64), and
fails naming each requirement that neither a carried wheel nor the image provides. Versions are
checked against carried wheels only: the image's versions are not known here (the image's torch is
2.11, which the project's torch>=2.4 allows).
"""

from __future__ import annotations

import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

IMAGE_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
             "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
             "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
ROOT = Path(__file__).resolve().parents[2]


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(name).decode())
    return [Requirement(r) for r in meta.get_all("Requires-Dist") or []]


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def image_packages(image_list: Path) -> set[str]:
    """The canonical names listed in image-packages.txt (comments and blank lines skipped)."""
    return {canonicalize_name(line.strip()) for line in image_list.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def check(wheel_dir: Path, image_list: Path) -> list[str]:
    carried: dict[str, str] = {}
    problems = []
    for wheel in sorted(wheel_dir.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        if name in carried:
            problems.append(f"{wheel.name}: a second version of {name} (pip refuses two)")
        carried[name] = str(version)
    image = image_packages(image_list)
    needs = [("pyproject.toml", r) for r in project_requirements()]
    needs += [(w.name, r) for w in sorted(wheel_dir.glob("*.whl")) for r in wheel_requirements(w)]
    for source, req in needs:
        if req.marker is not None and not req.marker.evaluate(IMAGE_ENV):
            continue
        name = canonicalize_name(req.name)
        if name in carried:
            if req.specifier and not req.specifier.contains(carried[name], prereleases=True):
                problems.append(f"{source}: needs {req}, carried {name} {carried[name]}")
        elif name not in image:
            problems.append(f"{source}: needs {req}, which is neither carried nor in the image")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    wheel_dir, image_list = Path(argv[0]), Path(argv[1])
    problems = check(wheel_dir, image_list)
    for line in problems:
        print("closure:", line, file=sys.stderr)
    if not problems:
        print(f"closure: {len(list(wheel_dir.glob('*.whl')))} carried wheels and the image satisfy every requirement")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
