"""The start-up benchmark runs the real pretraining bundle on two datalist sizes and prints its ratio."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs real bundles / processes: minutes

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_startup.py"


def test_bench_startup_prints_both_sizes_and_the_ratio():
    done = subprocess.run([sys.executable, str(SCRIPT), "--large", "300", "--small", "10"], capture_output=True,
                          encoding="utf-8", errors="replace", timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert re.search(r"\b10 entries: first training step after +\d+\.\d s", done.stdout), done.stdout
    assert re.search(r"\b300 entries: first training step after +\d+\.\d s", done.stdout), done.stdout
    assert re.search(r"ratio 300 / 10 entries: \d+\.\d\dx", done.stdout), done.stdout
