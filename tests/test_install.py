"""`pip install misfm` runs any bundle: the wheel built from this checkout, installed into a fresh virtual environment
(torch first, pinned, as the README does), trains a bundle for one tiny epoch and runs its inference, outside the
repository. Proves that the requirements are exactly what the packages and the bundles import."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import bundle_utils as bu

pytestmark = pytest.mark.slow

TORCH_PIN = "torch==2.13.0"  # the CPU build on this machine's disk (the Makefile's pin)


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, encoding="utf-8", errors="replace", **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", root / "dist", bu.REPO], timeout=600)
    (wheel,) = (root / "dist").glob("misfm-*.whl")
    _run([sys.executable, "-m", "venv", root / "venv"], timeout=300)
    python = root / "venv" / "bin" / "python"
    _run([python, "-m", "pip", "install", "--quiet", TORCH_PIN], timeout=900)
    _run([python, "-m", "pip", "install", "--quiet", wheel], timeout=900)
    return python, root


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return dict(env, PYTHONNOUSERSITE="1", OMP_NUM_THREADS="2", PYTHONPATH="")


def test_wheel_installs_only_what_the_bundles_need(installed):
    python, root = installed
    work = root / "outside"
    work.mkdir(exist_ok=True)
    probe = ("import importlib.util as u, misfm_nets, misfm_transforms, misfm_bundle_glue, fire, tensorboard, scipy, "
             "yaml, einops; print(misfm_nets.__file__); print([m for m in ('matplotlib', 'pymic', 'pytest') "
             "if u.find_spec(m)])")
    out = _run([python, "-c", probe], cwd=work, env=_env(), timeout=120).stdout.splitlines()
    assert "site-packages" in out[0] and str(bu.REPO) not in out[0]  # the installed copy, not the checkout
    assert out[1] == "[]"  # demo, benchmark and test packages stay in their extras
    for script in ("misfm-fetch-data", "misfm-convert"):
        assert "usage:" in _run([root / "venv" / "bin" / script, "--help"], cwd=work, env=_env(), timeout=120).stdout
    # the study needs the [demo] extra for its plot: said before any training, not after hours of it
    datalist = bu.make_dataset(work / "study", 5, n_train=1, n_val=1, n_test=0, shape=(8, 8, 4))
    study = subprocess.run([python, "-m", "misfm_demo.label_efficiency", "--bundle", "thorax", "--datalist", datalist,
                            "--output-dir", work / "study_out"], cwd=work, env=_env(), capture_output=True,
                           encoding="utf-8", errors="replace", timeout=300)
    assert study.returncode != 0 and "pip install 'misfm[demo]'" in study.stderr, study.stderr[-3000:]
    assert not (work / "study_out" / "runs").exists()


def test_installed_wheel_trains_and_infers_a_bundle_outside_the_repo(installed):
    python, root = installed
    name = "misfm_thorax_ct_segmentation"
    work = root / "outside"
    bundle = shutil.copytree(bu.BUNDLES_DIR / name, work / "bundles" / name)  # its _lib imports the installed glue
    datalist = bu.make_dataset(work / "data", bu.num_classes(name), n_train=2, n_val=1, n_test=1, shape=(36, 36, 18))
    common = dict(bu.TINY_NET, data_list_file_path=str(datalist), dataset_dir=str(datalist.parent / "data"))
    train = dict(common, max_epochs=1, val_interval=1, batch_size=1, cache_rate=0.0, ckpt_dir=str(work / "models"),
                 output_dir=str(work / "eval"))
    r = bu.run_bundle(bundle, "training", ["train.json"], train, work / "run", env=_env(), python=str(python),
                      timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert (work / "models" / "model.pt").is_file()
    infer = dict(common, ckpt_dir=str(work / "models"), output_dir=str(work / "pred"))
    r = bu.run_bundle(bundle, "run", ["inference.json"], infer, work / "run", env=_env(), python=str(python),
                      timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert len(list((work / "pred").rglob("*_seg.nii.gz"))) == 1
    assert json.loads((work / "eval" / "run.json").read_text())["bundle"] == name
