"""The PCT-Net benchmarks run end to end on the CPU (tiny settings) and print their tables; no timing asserts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs real bundles / processes: minutes

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(*args: str, timeout: int = 180) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, encoding="utf-8", errors="replace",
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_pctnet_one_step():
    out = _run(str(BENCH / "bench_pctnet.py"), "--preset", "tiny", "--steps", "1", "--variants", "baseline,misfm",
               "--check")
    assert "time ratio" in out and "mem ratio" in out
    assert "original algorithm" in out and "misfm (" in out
    diff = float(out.split("one step (eval mode):")[1].split()[0])
    assert diff < 1e-4  # the benchmark baseline computes the same network


def test_bench_inference_quick():
    out = _run(str(BENCH / "bench_inference.py"), "--quick", "--device", "cpu")
    assert "argmax agree %" in out
    for case in ("default", "buffered", "bf16", "fp16out"):
        assert any(line.startswith(case) for line in out.splitlines()), out
