"""Pretraining data path: VF samples per second per worker, from NIfTI on disk through the bundle's own transforms.

The transforms are taken from ``bundles/misfm_ct_pretraining/configs/train.json`` (parsed with MONAI's
``ConfigParser``, as ``monai.bundle run`` does, with ``vf_v2.json`` or ``fuse_on_device.json`` layered on it for
those modes): the deterministic preprocessing (load, RAS, spacing, HU window, pad) and the random part of VF-v1 (two
crops + ``RandVolumeFusiond``), VF-v2 (pair crop + grid fusion) or the "device" mode (one crop; fusion happens on the
GPU in the trainer with ``volume_fusion_batch``).
One process, one thread = one DataLoader worker. Cases, each timed over ``--samples`` samples:

  disk, no cache     every sample reads and resamples its volume(s) (Dataset / CacheDataset cache_rate 0)
  PersistentDataset  preprocessed volumes cached on disk (timed after the first pass wrote the cache)
  CacheDataset       preprocessed volumes in memory (cache_rate 1): only the random part runs per sample

and, for the device mode, the CPU-side cost of ``volume_fusion_batch`` per sample (what the GPU would run).
With ``--before REV`` the CacheDataset case and ``volume_fusion_batch`` are also timed with ``misfm_transforms`` as
it was at git revision REV, sample by sample interleaved with ours (the other cases are dominated by reading).

    python benchmarks/bench_data_path.py [--datalist data/datalists/pretraining.json] [--samples 20] [--before main]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "misfm_ct_pretraining"


_FUSION_CLASSES = ("RandVolumeFusiond", "RandPairCropForVolumeFusiond", "RandVolumeFusionGridd")
_VARIANT_FILES = {"v1": [], "v2": ["vf_v2.json"], "device": ["fuse_on_device.json"]}


def bundle_parts(datalist: Path, roi: list[int], pixdim: list[float], mode: str, transforms=None):
    """(train datalist, deterministic transform, random transform) of the pretraining bundle; with ``transforms``
    (a ``misfm_transforms`` package) the random part is built from that package's fusion classes."""
    import misfm_ct_pretraining_lib as lib
    from monai.bundle import ConfigParser

    import misfm_transforms

    for name in _FUSION_CLASSES:  # the config's _target_ names resolve to the bundle library's attributes
        setattr(lib, name, getattr(transforms or misfm_transforms, name))
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / name) for name in ["train.json", *_VARIANT_FILES[mode]]])
    parser.update({
        "bundle_root": str(BUNDLE), "dataset_dir": str(datalist.parent), "data_list_file_path": str(datalist),
        "roi_size": roi, "pixdim": pixdim, "cache_rate": 0.0, "num_workers": 0,
    })
    data = parser.get_parsed_content("train_datalist")
    deterministic = parser.get_parsed_content("train#volumes").transform
    random_part = parser.get_parsed_content("train#dataset").transform
    return data, deterministic, random_part


def time_samples(datasets, samples: int) -> list[float]:
    """Seconds per sample of each dataset over ``samples`` accesses cycling through it, the datasets' accesses
    interleaved (so that load from other processes hits them alike)."""
    for dataset in datasets:
        dataset[0]  # warm-up (imports, first file)
    seconds = [0.0] * len(datasets)
    for i in range(samples):
        for j, dataset in enumerate(datasets):
            start = time.perf_counter()
            dataset[i % len(dataset)]
            seconds[j] += time.perf_counter() - start
    return [s / samples for s in seconds]


def package_at(revision: str, into: str):
    """``misfm_transforms`` as it was at git ``revision`` (see ``bench_volume_fusion.py``)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_volume_fusion import _package_at

    return _package_at(revision, into)


def main() -> None:
    import torch
    from monai.data import CacheDataset, Dataset, PersistentDataset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalist", type=Path, default=REPO / "data" / "datalists" / "pretraining.json")
    parser.add_argument("--roi", type=int, nargs=3, default=[128, 128, 64], help="x y z (paper: 128 128 64)")
    parser.add_argument("--pixdim", type=float, nargs=3, default=[1.0, 1.0, 2.5])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--before", metavar="REV", help="also time misfm_transforms as of git revision REV")
    args = parser.parse_args()
    if not args.datalist.is_file():
        raise SystemExit(f"{args.datalist} not found: run `python -m misfm_demo.fetch_data` first")
    torch.set_num_threads(1)

    sys.path.insert(0, str(BUNDLE))
    import misfm_ct_pretraining_lib as lib  # the bundle's own code

    with tempfile.TemporaryDirectory() as tmp:
        before = package_at(args.before, tmp) if args.before else None
        print(f"VF samples per worker (1 process, 1 thread), roi {args.roi} (x, y, z) at {args.pixdim} mm, "
              f"{args.samples} samples per case, volumes of {args.datalist}")
        print(f"{'mode':<8}{'cache':<20}{'ms/sample':>11}{'samples/s':>11}{'vs disk':>9}")
        for mode in ("v1", "v2", "device"):
            data, deterministic, random_part = bundle_parts(args.datalist, args.roi, args.pixdim, mode)
            random_before = bundle_parts(args.datalist, args.roi, args.pixdim, mode, before)[2] if before else None

            def dataset(volumes, transform=random_part):
                return lib.VolumePairDataset(volumes, transform) if mode == "v1" else Dataset(volumes, transform)

            with tempfile.TemporaryDirectory() as cache_dir:
                persistent = PersistentDataset(data, deterministic, cache_dir=cache_dir)
                [persistent[i] for i in range(len(persistent))]  # first pass writes the cache
                cached = CacheDataset(data, deterministic, cache_rate=1.0, progress=False)
                cases = {
                    "disk, no cache": [dataset(Dataset(data, deterministic))],
                    "PersistentDataset": [dataset(persistent)],
                    "CacheDataset": [dataset(cached)] + ([dataset(cached, random_before)] if before else []),
                }
                base = None
                for name, datasets in cases.items():
                    for label, seconds in zip(("", f" ({args.before})"), time_samples(datasets, args.samples)):
                        base = base or seconds
                        print(f"{mode:<8}{name + label:<20}{seconds * 1e3:>11.1f}{1 / seconds:>11.1f}"
                              f"{base / seconds:>8.1f}x")
        images = torch.randn(4, 1, *args.roi)
        fusions = {"": lib.volume_fusion_batch} | ({f" ({args.before})": before.volume_fusion_batch} if before else {})
        for label, per_sample in zip(fusions, time_samples([_BatchCalls(f, images) for f in fusions.values()], 5)):
            print(f"device mode: volume_fusion_batch{label} on this CPU {per_sample / 4 * 1e3:.1f} ms/sample "
                  "(batch 4); on a GPU it runs inside the training step (benchmarks/gpu_check.py measures its "
                  "samples/s)")


class _BatchCalls:
    """``volume_fusion_batch`` on one batch as a one-item "dataset", for :func:`time_samples`."""

    def __init__(self, fusion, images):
        self.fusion, self.images = fusion, images

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        return self.fusion(self.images)


if __name__ == "__main__":
    main()
