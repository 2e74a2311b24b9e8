#!/usr/bin/env bash
# Here (a CPU machine with pip access): download the wheels of wheels.txt for the device image
# (CPython 3.12, manylinux x86-64) into .whl/ at the repo root, then check that every requirement
# of every wheel is either carried or already in the image (closure.py). Run once per session
# before the first device call; `.whl` is ignored by git and travels with `carry: [".whl"]`.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
here="$root/bench/device"
dest="$root/.whl"
python=${PYTHON:-"$root/.venv/bin/python"}
rm -rf "$dest" && mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
grep -v '^\s*#' "$here/wheels.txt" | grep -v '^\s*$' | xargs "$python" -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp "${platforms[@]}" -d "$dest"
"$python" "$here/closure.py" "$dest" "$here/image-packages.txt"
du -sh "$dest"
