#!/usr/bin/env bash
# On the GPU machine (the device tool's `run`, from the repo root, with carry: [".whl"]):
#
#     bash bench/device/run.sh STAGE [STAGE ...]
#
# Installs the carried wheels (bench/device/fetch-wheels.sh made them here) and the project into
# /tmp/site beside the image's own torch, then runs each stage, writing logs and JSON to $OUT
# (./out/device outside the device tool). Stages, each within one 10-minute call on an H100/H200:
#   check        the environment: GPU, torch/triton/diffusers versions, attention backends found
#   tests        pytest -m gpu tests/gpu (junit XML and log)
#   expert       bench/gpu_expert.py gemm,attention,stock,expert at M = 0,3,5,10
#   compile-fp8  bench/gpu_expert.py gemm,attention,compile,fp8 at M = 5
#   vae          bench/gpu_expert.py vae (81 frames at 832x480, untiled and tiled)
#   shot         bench/gpu_expert.py shot (a whole 40-step CFG shot at M = 5: about 190 PFLOP,
#                5-8 minutes; run it alone)
# A stage that fails still leaves its log; the script exits non-zero if any stage failed.
set -uo pipefail
out=${OUT:-out/device}
mkdir -p "$out"
site=/tmp/site
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

# The wheels once per machine; the project on every call (a warm machine must run this tree's code).
install() {
  if [ ! -f "$site/.wheels-installed" ]; then
    ls .whl/*.whl > /dev/null 2>&1 || { echo "no wheels in .whl/: run bench/device/fetch-wheels.sh here and carry .whl" >&2; return 1; }
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || return 1
    touch "$site/.wheels-installed"
  fi
  PYTHONPATH="$site" "$python" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$site" . || return 1
}

device_tag() {
  "$python" -c 'import torch; print(torch.cuda.get_device_name(0).replace(" ", "-"))' 2>/dev/null || echo unknown
}

stage() {
  local name=$1 tag day
  tag=$(device_tag)
  day=$(date -u +%Y-%m-%d)
  case "$name" in
    check)
      nvidia-smi -L
      "$python" - <<'EOF'
import importlib, torch
from storyfarm.kernels import attention
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
      "device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
for name in ("triton", "diffusers", "transformers", "peft", "torchao", "grpc", "av", "pydantic"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # report, keep going
        print(name, "MISSING", exc)
print("attention backends", attention.available_backends(torch.device("cuda"), torch.bfloat16, 128),
      "auto:", attention.resolve("auto", torch.device("cuda"), torch.bfloat16, 128))
EOF
      ;;
    tests)
      "$python" -m pytest -m gpu tests/gpu -q -p no:cacheprovider --junitxml "$out/gpu-tests.xml" ;;
    expert)
      "$python" bench/gpu_expert.py --parts gemm,attention,stock,expert --out "$out/gpu-expert-$tag-$day.json" ;;
    compile-fp8)
      "$python" bench/gpu_expert.py --parts gemm,attention,compile,fp8 --memory 5 --out "$out/gpu-compile-fp8-$tag-$day.json" ;;
    vae)
      "$python" bench/gpu_expert.py --parts vae --out "$out/gpu-vae-$tag-$day.json" ;;
    shot)
      "$python" bench/gpu_expert.py --parts gemm,attention,shot --shot-steps 40 --memory 5 --out "$out/gpu-shot-$tag-$day.json" ;;
    *)
      echo "unknown stage '$name'; allowed: check, tests, expert, compile-fp8, vae, shot" >&2; return 2 ;;
  esac
}

[ $# -gt 0 ] || { sed -n 2,15p "$0"; exit 2; }
install > "$out/install.log" 2>&1 || { tail -40 "$out/install.log"; echo "install failed (log: $out/install.log)" >&2; exit 1; }
status=0
for name in "$@"; do
  echo "=== $name ($(date -u +%H:%M:%S))"
  stage "$name" 2>&1 | tee "$out/$name.log"
  rc=${PIPESTATUS[0]}
  echo "=== $name exit $rc"
  [ "$rc" -eq 0 ] || status=1
done
exit $status
