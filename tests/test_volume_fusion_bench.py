"""Smoke test of benchmarks/bench_volume_fusion.py (no timing assertions)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # runs real bundles / processes: minutes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_quick_prints_table():
    pytest.importorskip("pymic")
    script = os.path.join(ROOT, "benchmarks", "bench_volume_fusion.py")
    result = subprocess.run([sys.executable, script, "--quick", "--before", "HEAD", "--stages", "--choices"],
                            capture_output=True, encoding="utf-8", errors="replace", timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for words in ("ours s", "pymic s", "speed-up", "target", "VF-v2", "VF-v1", "GB/s", "memory floor"):
        assert words in out, out
    assert out.count("PASS") + out.count("FAIL") == 2, out  # a verdict for our two rows, none for "before"
    assert out.count("  before ") == 3 and "our stages" in out and "implementation choices" in out, out
