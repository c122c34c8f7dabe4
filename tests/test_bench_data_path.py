"""The data-path benchmark runs on the real fetched CT and prints its table (no timing asserted)."""

import subprocess
import sys
from pathlib import Path

import pytest

from misfm_demo.fetch_data import fetch_all

pytestmark = pytest.mark.slow  # runs real bundles / processes: minutes

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_data_path.py"


def test_bench_data_path_prints_every_case():
    datalist = fetch_all(quiet=True)["pretraining"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--datalist", str(datalist), "--samples", "2", "--roi", "32", "32", "16",
         "--pixdim", "4", "4", "4", "--before", "HEAD"],
        capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split()[0] for line in done.stdout.splitlines() if line.rstrip().endswith("x")]  # table rows
    assert rows == ["v1"] * 4 + ["v2"] * 4 + ["device"] * 4, done.stdout  # CacheDataset also as of HEAD
    assert "samples/s" in done.stdout and done.stdout.count("volume_fusion_batch") == 2
