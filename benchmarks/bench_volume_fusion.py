"""Single-thread CPU timing of our Volume Fusion transforms against pymic 0.6.2.

(a) VF-v2: RandPairCropForVolumeFusion + RandVolumeFusionGrid vs pymic Crop4VolumeFusion + VolumeFusion,
    one sample 1x96x192x192 -> 64x128x128 (target: 20x faster).
(b) VF-v1: volume_fusion_batch vs pymic's volume_fusion, batch 4 at 64x128x128 (target: 3x faster).

Usage: python benchmarks/bench_volume_fusion.py [--quick]   (--quick: tiny sizes, 1 repeat, smoke test only)
"""

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from misfm_transforms import RandPairCropForVolumeFusion, RandVolumeFusionGrid, volume_fusion_batch  # noqa: E402


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _pymic_volume_fusion():
    import pymic

    path = os.path.join(os.path.dirname(pymic.__file__), "net_run", "self_sup", "util.py")
    spec = importlib.util.spec_from_file_location("pymic_self_sup_util", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.volume_fusion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 1 repeat (smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        in_shape, out_size, batch_shape, repeats = (1, 24, 48, 48), (16, 32, 32), (4, 1, 16, 32, 32), 1
        block_min, block_max, box_min, box_max = (2, 4, 4), (8, 8, 8), (2, 4, 4), (10, 20, 20)
    else:
        in_shape, out_size, batch_shape, repeats = (1, 96, 192, 192), (64, 128, 128), (4, 1, 64, 128, 128), 15
        block_min, block_max, box_min, box_max = (8, 8, 8), (32, 32, 32), (8, 8, 8), (40, 80, 80)

    from pymic import TaskType
    from pymic.transform.crop4vf import Crop4VolumeFusion, VolumeFusion

    rng = np.random.RandomState(0)
    volume = (rng.randn(*in_shape) * 0.3).astype(np.float32)
    random.seed(0)
    params = {"task": TaskType.SEGMENTATION, "crop4volumefusion_output_size": list(out_size),
              "volumefusion_cls_num": 5, "volumefusion_foreground_ratio": 0.7,
              "volumefusion_patchsize_min": list(block_min), "volumefusion_patchsize_max": list(block_max)}
    pm_crop, pm_fuse = Crop4VolumeFusion(params), VolumeFusion(params)
    crop = RandPairCropForVolumeFusion(out_size).set_random_state(0)
    grid = RandVolumeFusionGrid(4, 0.7, block_min, block_max).set_random_state(0)

    def ours_v2():
        foreground, background = crop(volume)
        return grid(background, foreground)

    t_ours_v2 = _median_time(ours_v2, repeats)
    t_pm_v2 = _median_time(lambda: pm_fuse(pm_crop({"image": volume.copy()})), repeats)

    images = torch.from_numpy(rng.randn(*batch_shape).astype(np.float32))
    pm_vf = _pymic_volume_fusion()
    gen = torch.Generator().manual_seed(0)
    t_ours_v1 = _median_time(lambda: volume_fusion_batch(images, 4, (10, 40), box_min, box_max, gen), repeats)
    t_pm_v1 = _median_time(lambda: pm_vf(images, 4, [10, 40], list(box_min), list(box_max)), repeats)

    # bytes that must move per fused sample at least: read fg + bg (float32), write fused (float32) + label
    voxels = int(np.prod(out_size))
    floor_v2 = voxels * (4 + 4 + 4 + 1)
    floor_v1 = int(np.prod(batch_shape[2:])) * batch_shape[0] * (4 + 4 + 4 + 8)
    n = batch_shape[0]
    rows = [
        ("VF-v2 pair crop + grid, 1 sample", t_ours_v2, t_pm_v2, 20.0, floor_v2 / t_ours_v2),
        (f"VF-v1 batch (N={n}), per sample", t_ours_v1 / n, t_pm_v1 / n, 3.0, floor_v1 / t_ours_v1),
    ]
    print(f"Volume Fusion benchmark: 1 thread, median of {repeats}, input {in_shape} -> {out_size}, "
          f"batch {batch_shape}{' (QUICK: sizes not representative)' if args.quick else ''}")
    header = f"{'case':36s} {'ours s':>10s} {'pymic s':>10s} {'speed-up':>9s} {'target':>7s} {'result':>6s} {'GB/s':>6s}"
    print(header)
    print("-" * len(header))
    for name, ours, pm, target, bandwidth in rows:
        ratio = pm / ours
        verdict = "PASS" if ratio >= target else "FAIL"
        print(f"{name:36s} {ours:10.4f} {pm:10.4f} {ratio:8.1f}x {target:6.0f}x {verdict:>6s} {bandwidth / 1e9:6.2f}")
    print(f"memory floor: {floor_v2 / 1e6:.1f} MB per fused VF-v2 sample (fg+bg read, fused+label written); "
          "GB/s = that floor / our time (effective bandwidth, not a measured one)")


if __name__ == "__main__":
    main()
