"""Start-up of the pretraining bundle against the size of its datalist: seconds to the first training step.

Runs ``python -m monai.bundle run training`` of ``bundles/misfm_ct_pretraining`` exactly as users do (tiny
network, ``cache_rate`` 0 as for a large set, one iteration) on a datalist of ``--small`` entries and on one of
``--large`` entries (default 100,000), and prints both times and their ratio. The volumes are small synthetic CTs
(hard links of a few files, so 100,000 entries cost no disk). Start-up that grew with the dataset (a pass that
reads every image before training) would show as a ratio far above 1.

    python benchmarks/bench_startup.py [--large 100000] [--small 100]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "misfm_ct_pretraining"
TINY = {"feature_channels": [4, 8, 16, 32, 64], "num_heads": [2, 4, 8], "roi_size": [32, 32, 16],
        "box_size_min": [4, 4, 4], "box_size_max": [16, 16, 8], "num_boxes": [2, 6], "num_workers": 0, "amp": False,
        "cache_rate": 0.0, "batch_size": 2, "max_epochs": 1, "epoch_length": 1, "val_interval": 1,
        "checkpoint_interval": 0}
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*Epoch: 1/1, Iter: 1/1", re.M)


def write_volumes(folder: Path, count: int, distinct: int = 4) -> list[str]:
    """``count`` file names: ``distinct`` small synthetic CTs, the rest hard links to them."""
    import nibabel as nib
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    for i in range(distinct):
        rng = np.random.RandomState(i)
        volume = rng.normal(-300.0, 300.0, (40, 40, 20)).astype(np.int16)
        path = folder / f"src_{i}.nii.gz"
        nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 2.5, 1.0])), str(path))
        sources.append(path)
    names = []
    for i in range(count):
        name = f"ct_{i:06d}.nii.gz"
        os.link(sources[i % distinct], folder / name)
        names.append(name)
    return names


def time_to_first_step(root: Path, entries: int) -> float:
    """Seconds from the command's start to the log line of training iteration 1."""
    data = root / f"data_{entries}"
    names = write_volumes(data, entries)
    datalist = root / f"datalist_{entries}.json"
    datalist.write_text(json.dumps({"training": [{"image": n} for n in names],
                                    "validation": [{"image": n} for n in names[:2]]}))
    args = {"meta_file": str(BUNDLE / "configs" / "metadata.json"),
            "config_file": str(BUNDLE / "configs" / "train.json"),
            "logging_file": str(BUNDLE / "configs" / "logging.conf"), "bundle_root": str(BUNDLE),
            "dataset_dir": str(data), "data_list_file_path": str(datalist), "ckpt_dir": str(root / f"models_{entries}"),
            "output_dir": str(root / f"eval_{entries}"), **TINY}
    args_file = root / f"args_{entries}.json"
    args_file.write_text(json.dumps(args))
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    started = datetime.now()
    begin = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "training", "--args_file", str(args_file)],
                          capture_output=True, encoding="utf-8", errors="replace", env=env, cwd=root)
    total = time.perf_counter() - begin
    if done.returncode != 0:
        raise SystemExit(f"the bundle failed on {entries} entries:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    match = _STAMP.search(done.stdout)
    if match is None:
        raise SystemExit(f"no training iteration logged on {entries} entries:\n{done.stdout[-3000:]}")
    first_step = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
    print(f"  {entries:>7} entries: first training step after {(first_step - started).total_seconds():6.1f} s "
          f"(whole run {total:.1f} s)", flush=True)
    return (first_step - started).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=100)
    args = parser.parse_args()
    print(f"pretraining bundle start-up, tiny network, cache_rate 0, {os.cpu_count()} CPU cores")
    with tempfile.TemporaryDirectory(prefix="misfm_startup_") as tmp:
        small = time_to_first_step(Path(tmp), args.small)
        large = time_to_first_step(Path(tmp), args.large)
    print(f"ratio {args.large} / {args.small} entries: {large / small:.2f}x "
          f"({'under' if large < 60 else 'OVER'} one minute to the first step with {args.large} entries)")


if __name__ == "__main__":
    main()
