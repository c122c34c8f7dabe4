"""The GPU acceptance script cannot rot: on a CPU it runs every step at tiny sizes (the bundles through
`python -m monai.bundle`, resume, evaluate, inference), the CUDA-only steps reported SKIPPED, and its figures table
is printed. A FAIL in any step fails this test (the script exits 1)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs the bundles: minutes

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
CUDA_ONLY = ("train step CUDA fp32", "SDPA backends", "Volume Fusion on CUDA", "volume_fusion_batch on CUDA",
             "torchrun --nproc_per_node 1, NCCL")


def test_gpu_check_quick_mode_on_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=tmp_path, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=1200)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    lines = re.findall(r"^ *(PASS|FAIL|SKIPPED)  (.+)$", done.stdout, re.M)
    assert lines and not [text for status, text in lines if status == "FAIL"], out[-5000:]
    for name in CUDA_ONLY:  # without CUDA these say so, they do not pass vacuously
        (status,) = [s for s, text in lines if text.startswith(name)]
        assert status == "SKIPPED", name
    passed = [text for status, text in lines if status == "PASS"]
    assert any(t.startswith("pretraining VF-v1, fused on CPU workers") for t in passed), passed
    assert any(t.startswith("pretraining VF-v1 fused on the device") for t in passed), passed
    assert any(t.startswith("thorax bundle: train, SIGKILL after a checkpoint, resume") for t in passed), passed
    assert re.search(r"^steps: \d+ PASS, 0 FAIL, 5 SKIPPED", done.stdout, re.M), out[-3000:]
    table = done.stdout.split("\nfigure")[1]
    assert "train step fp32 eager (baseline)" in table and "Volume Fusion" in table and "inference" in table, table
