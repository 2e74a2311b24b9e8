"""The benchmark scripts run end to end on CPU, so a device session never finds them broken.

bench/gpu_expert.py is written for an H100/H200 (it has never had one in CI); its CPU smoke mode
runs every part through the same code on a small model, and the JSON it writes must carry every
figure BENCHMARKS.md reports. The figures themselves are not checked (they mean nothing on CPU),
only that they are there, computed from the run, and consistent with each other.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALL_PARTS = "gemm,attention,stock,expert,compile,vae,shot,fp8"


def run_bench(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_gpu_expert_benchmark_runs_every_part_on_cpu(tmp_path):
    out = tmp_path / "gpu-expert.json"
    run_bench("gpu_expert.py", "--device", "cpu", "--config", "mid", "--frames", "5", "--height", "64", "--width", "64",
              "--memory", "0,2", "--repeats", "1", "--shot-steps", "2", "--parts", ALL_PARTS, "--out", str(out))
    result = json.loads(out.read_text())
    assert result["environment"]["device"].startswith("CPU") and result["memory"] == [0, 2]
    assert result["gemm"]["best_tflops"] > 0
    attention = result["attention"]
    assert {"sdpa", "sdpa_flash"} <= {row["backend"] for row in attention["backends"]}
    assert all(row["max_abs_error_vs_math_fp32"] < 2e-2 for row in attention["backends"])  # bf16 inputs
    assert attention["floor_tflops"] == max(650.0, attention["best_exact_tflops"])
    for part in ("stock", "expert", "compile"):
        rows = result[part]
        assert [row["memory"] for row in rows] == [0, 2], part
        for row in rows:
            assert row["seconds"] > 0 and row["floor_seconds"] > 0, (part, row)
            assert row["percent_of_floor"] == pytest.approx(100 * row["floor_seconds"] / row["seconds"], rel=0.02, abs=0.1)
        assert rows[1]["pflop"] >= rows[0]["pflop"] and rows[1]["tokens"] > rows[0]["tokens"]
    for part in ("expert", "compile"):
        assert all("speedup_vs_stock" in row and row["attention"] for row in result[part]), part
        assert result[part][0]["max_abs_diff_vs_stock"] < 0.1, part  # bf16, same weights and inputs at M = 0
    assert result["attention_ran"]["ran"]
    assert result["compile_stats"]["eager_fallbacks"] == 0 and result["compile_stats"]["compiles"] >= 1
    assert [row["tiling"] for row in result["vae"]["rows"]] == [False, True]
    assert result["shot"]["steps"] == 2 and result["shot"]["percent_of_floor"] > 0
    assert "skipped" in result["fp8"] or result["fp8"]["relative_l2_error"] < 0.1  # torchao absent on CPU CI


def test_gpu_expert_benchmark_refuses_bad_arguments():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_expert.py"), "--device", "cpu", "--parts", "warp"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--parts: unknown ['warp']" in done.stderr
