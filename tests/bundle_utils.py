"""Helpers for the bundle tests: tiny synthetic CT datasets, tiny config overrides, running bundles as users do."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO / "bundles"
PYTHON = sys.executable
PRETRAINING = "misfm_ct_pretraining"
SEGMENTATION = ("misfm_headneck_ct_segmentation", "misfm_thorax_ct_segmentation", "misfm_abdomen_ct_segmentation")
ALL_BUNDLES = (PRETRAINING,) + SEGMENTATION
SPACING = (1.0, 1.0, 2.5)

# tiny network / schedule for CPU tests (PCT-Net runs in < 1 s at this size)
TINY_NET = {
    "feature_channels": [4, 8, 16, 32, 64],
    "num_heads": [2, 4, 8],
    "roi_size": [32, 32, 16],
    "num_workers": 0,
    "amp": False,
}
TINY_TRAIN = dict(TINY_NET, max_epochs=2, val_interval=1, batch_size=2, cache_rate=1.0, learning_rate=0.003)
TINY_PRETRAIN = dict(
    TINY_TRAIN, box_size_min=[4, 4, 4], box_size_max=[16, 16, 8], num_boxes=[2, 6],
    block_size_min=[4, 4, 2], block_size_max=[8, 8, 4],
)


def num_classes(bundle: str) -> int:
    return json.loads((BUNDLES_DIR / bundle / "params.json").read_text())["config"]["num_classes"]


def affine_for(spacing=SPACING, origin=(-40.0, 12.5, 100.0)) -> np.ndarray:
    aff = np.diag(list(spacing) + [1.0])
    aff[:3, 3] = origin
    return aff


def make_case(image_path: Path, label_path: Path | None, shape=(40, 40, 20), n_classes: int = 5, seed: int = 0,
              spacing=SPACING) -> None:
    """CT-like volume: air-ish background with noise, a 'body', and one bright sphere per class (label = class)."""
    rng = np.random.RandomState(seed)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    img = rng.normal(-900.0, 20.0, shape)
    body = ((x - shape[0] / 2) ** 2 / (0.45 * shape[0]) ** 2 + (y - shape[1] / 2) ** 2 / (0.45 * shape[1]) ** 2) < 1
    img[body] = rng.normal(0.0, 20.0, int(body.sum()))
    lab = np.zeros(shape, np.uint8)
    for k in range(1, n_classes):
        c = [rng.uniform(0.3, 0.7) * s for s in shape]
        r = max(3.0, min(shape[:2]) / 10)
        mask = (x - c[0]) ** 2 + (y - c[1]) ** 2 + ((z - c[2]) * spacing[2] / spacing[0]) ** 2 < r**2
        img[mask] = 150.0 * k + rng.normal(0, 10, int(mask.sum()))
        lab[mask] = k
    aff = affine_for(spacing)
    nib.save(nib.Nifti1Image(img.astype(np.int16), aff), str(image_path))
    if label_path is not None:
        nib.save(nib.Nifti1Image(lab, aff), str(label_path))


def make_dataset(root: Path, n_classes: int, n_train: int = 2, n_val: int = 1, n_test: int = 1,
                 shape=(40, 40, 20), labels: bool = True) -> Path:
    """Write NIfTI cases under root/data and a decathlon datalist (relative paths) to root/datalist.json."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    out: dict = {"training": [], "validation": [], "testing": []}
    i = 0
    for key, n in (("training", n_train), ("validation", n_val), ("testing", n_test)):
        for _ in range(n):
            img, lab = f"img_{i}.nii.gz", f"lab_{i}.nii.gz"
            with_label = labels and key != "testing"
            make_case(data / img, data / lab if with_label else None, shape, n_classes, seed=i)
            out[key].append({"image": img, "label": lab} if with_label else {"image": img})
            i += 1
    path = root / "datalist.json"
    path.write_text(json.dumps(out, indent=2))
    return path


def run_bundle(bundle_dir: Path, run_id: str, configs, overrides: dict, workdir: Path, env: dict | None = None,
               python: str = PYTHON, timeout: int = 300, extra_args: list | None = None,
               launcher: list | None = None) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run <run_id> --meta_file ... --config_file ... --args_file <overrides>``."""
    bundle_dir = Path(bundle_dir)
    args = {
        "meta_file": str(bundle_dir / "configs" / "metadata.json"),
        "config_file": [str(bundle_dir / "configs" / c) for c in configs],
        "logging_file": str(bundle_dir / "configs" / "logging.conf"),
        "bundle_root": str(bundle_dir),
    }
    args.update(overrides)
    workdir.mkdir(parents=True, exist_ok=True)
    args_file = workdir / f"args_{run_id}_{len(list(workdir.glob('args_*')))}.json"
    args_file.write_text(json.dumps(args))
    prefix = launcher if launcher is not None else [python, "-m"]
    cmd = prefix + ["monai.bundle", "run", run_id, "--args_file", str(args_file)] + (extra_args or [])
    # repo mode: misfm_nets / misfm_transforms from this checkout (works whether or not they are installed)
    full_env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1",
                    PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    full_env.update(env or {})
    return subprocess.run(cmd, cwd=str(workdir), env=full_env, capture_output=True, encoding="utf-8", errors="replace",
                          timeout=timeout)


def read_scalars(log_dir: Path, tag: str) -> list[float]:
    """Scalar values of ``tag`` from the TensorBoard event files under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: list[tuple[int, float]] = []
    for ev in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(ev))
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            values += [(e.step, e.value) for e in acc.Scalars(tag)]
    return [v for _, v in sorted(values)]


def free_port() -> int:
    """A TCP port free on loopback now (for torchrun rendezvous and test servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ok(result: subprocess.CompletedProcess) -> str:
    """The output of a command that must have succeeded (its tail in the failure message)."""
    assert result.returncode == 0, f"command failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def run_paths(root: Path, datalist: Path) -> dict:
    """The bundle overrides that place a run's data, outputs and checkpoints."""
    return {"data_list_file_path": str(datalist), "dataset_dir": str(datalist.parent / "data"),
            "output_dir": str(root / "eval"), "ckpt_dir": str(root / "models")}
