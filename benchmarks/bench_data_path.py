"""Pretraining data path: VF samples per second per worker, from NIfTI on disk through the bundle's own transforms.

The transforms are taken from ``bundles/misfm_ct_pretraining/configs/train.json`` (parsed with MONAI's
``ConfigParser``, as ``monai.bundle run`` does): the deterministic preprocessing (load, RAS, spacing, HU window,
pad) and the random part of VF-v1 (two crops + ``RandVolumeFusiond``), VF-v2 (pair crop + grid fusion) or the
"device" mode (one crop; fusion happens on the GPU in the trainer with ``volume_fusion_batch``).
One process, one thread = one DataLoader worker. Cases, each timed over ``--samples`` samples:

  disk, no cache     every sample reads and resamples its volume(s) (Dataset / CacheDataset cache_rate 0)
  PersistentDataset  preprocessed volumes cached on disk (timed after the first pass wrote the cache)
  CacheDataset       preprocessed volumes in memory (cache_rate 1): only the random part runs per sample

and, for the device mode, the CPU-side cost of ``volume_fusion_batch`` per sample (what the GPU would run).

    python benchmarks/bench_data_path.py [--datalist data/datalists/pretraining.json] [--samples 20]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "misfm_ct_pretraining"


def bundle_parts(datalist: Path, roi: list[int], pixdim: list[float], mode: str):
    """(train datalist, deterministic transform, random transform) of the pretraining bundle."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update({
        "bundle_root": str(BUNDLE), "dataset_dir": str(datalist.parent), "data_list_file_path": str(datalist),
        "roi_size": roi, "pixdim": pixdim, "fusion_version": "v2" if mode == "v2" else "v1",
        "fuse_on_device": mode == "device", "cache_rate": 0.0, "num_workers": 0,
    })
    data = parser.get_parsed_content("train_datalist")
    deterministic = parser.get_parsed_content("train#volumes").transform
    random_part = parser.get_parsed_content("train#random_transforms")
    return data, deterministic, random_part


def time_samples(dataset, samples: int) -> float:
    """Seconds per sample over ``samples`` accesses cycling through the dataset."""
    dataset[0]  # warm-up (imports, first file)
    start = time.perf_counter()
    for i in range(samples):
        dataset[i % len(dataset)]
    return (time.perf_counter() - start) / samples


def main() -> None:
    import torch
    from monai.data import CacheDataset, Dataset, PersistentDataset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalist", type=Path, default=REPO / "data" / "datalists" / "pretraining.json")
    parser.add_argument("--roi", type=int, nargs=3, default=[128, 128, 64], help="x y z (paper: 128 128 64)")
    parser.add_argument("--pixdim", type=float, nargs=3, default=[1.0, 1.0, 2.5])
    parser.add_argument("--samples", type=int, default=20)
    args = parser.parse_args()
    if not args.datalist.is_file():
        raise SystemExit(f"{args.datalist} not found: run `python -m misfm_demo.fetch_data` first")
    torch.set_num_threads(1)

    import sys

    sys.path.insert(0, str(BUNDLE))
    from misfm_ct_pretraining_lib import VolumePairDataset, volume_fusion_batch  # the bundle's own code

    print(f"VF samples per worker (1 process, 1 thread), roi {args.roi} (x, y, z) at {args.pixdim} mm, "
          f"{args.samples} samples per case, volumes of {args.datalist}")
    print(f"{'mode':<8}{'cache':<20}{'ms/sample':>11}{'samples/s':>11}{'vs disk':>9}")
    for mode in ("v1", "v2", "device"):
        data, deterministic, random_part = bundle_parts(args.datalist, args.roi, args.pixdim, mode)

        def dataset(volumes):
            return VolumePairDataset(volumes, random_part) if mode == "v1" else Dataset(volumes, random_part)

        with tempfile.TemporaryDirectory() as cache_dir:
            persistent = PersistentDataset(data, deterministic, cache_dir=cache_dir)
            [persistent[i] for i in range(len(persistent))]  # first pass writes the cache
            cases = {
                "disk, no cache": dataset(Dataset(data, deterministic)),
                "PersistentDataset": dataset(persistent),
                "CacheDataset": dataset(CacheDataset(data, deterministic, cache_rate=1.0, progress=False)),
            }
            base = None
            for name, ds in cases.items():
                seconds = time_samples(ds, args.samples)
                base = base or seconds
                print(f"{mode:<8}{name:<20}{seconds * 1e3:>11.1f}{1 / seconds:>11.1f}{base / seconds:>8.1f}x")
    images = torch.randn(4, 1, *args.roi)
    volume_fusion_batch(images)
    start = time.perf_counter()
    for _ in range(5):
        volume_fusion_batch(images)
    per_sample = (time.perf_counter() - start) / 5 / images.shape[0]
    print(f"device mode: volume_fusion_batch on this CPU {per_sample * 1e3:.1f} ms/sample (batch 4); on a GPU it "
          "runs inside the training step (benchmarks/gpu_check.py measures its samples/s)")


if __name__ == "__main__":
    main()
