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


def _interleaved_medians(fns, repeats: int) -> list[float]:
    """Median wall time of each function; one warm-up call each, then the repetitions interleaved (the order
    rotates every round) so that load from other processes hits every function alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for r in range(repeats):
        order = list(range(len(fns)))
        order = order[r % len(fns):] + order[: r % len(fns)]
        for i in order:
            start = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _copy_bandwidth(megabytes: int, repeats: int) -> float:
    """Single-thread memory bandwidth in bytes/s of a large array copy (bytes read + bytes written)."""
    src = np.ones(megabytes << 18, dtype=np.float32)
    dst = np.empty_like(src)
    (t,) = _interleaved_medians([lambda: np.copyto(dst, src)], repeats)
    return 2 * src.nbytes / t


def _stage_times(volume, crop, grid, images, box_min, box_max, repeats: int) -> list[tuple[str, float]]:
    """Median ms of each stage of our VF-v2 sample (both patches together) and VF-v1 batch, replayed with the
    transforms' internal steps (same calls as ``__call__``)."""
    from misfm_transforms import batch as vf_batch
    from misfm_transforms import pair_crop
    from misfm_transforms._checks import check_finite

    stages: dict[str, list[float]] = {}

    def tick(name, start):
        now = time.perf_counter()
        stages.setdefault(name, [0.0] * repeats)[r] += now - start
        return now

    data = torch.as_tensor(volume)
    for r in range(repeats):
        t = time.perf_counter()
        crop.randomize(volume.shape[1:])
        t = tick("v2 draw crop parameters", t)
        patches = []
        for i in range(2):
            (x0, y0, z0), (sx, sy, sz) = crop.crop_starts[i], crop.crop_sizes[i]
            patch = pair_crop._resize(data[:, x0 : x0 + sx, y0 : y0 + sy, z0 : z0 + sz], crop.spatial_size, crop.flips[i])
            t = tick("v2 resize + flip (x2)", t)
            flat = patch.numpy().reshape(-1)
            # (the finite check is the contrast's exact extremes: no pass of its own)
            _, out_min, out_max, finite = pair_crop._contrast_range_inplace(flat, *crop.percentiles[i])
            assert finite
            t = tick("v2 percentiles + contrast (x2)", t)
            pair_crop._gamma_inplace(flat, crop.gammas[i], out_min, out_max, fast_power=True)
            if crop.invert:
                np.subtract(np.float32(1.0), flat, out=flat)
            t = tick("v2 gamma + inversion (x2)", t)
            patches.append(patch.numpy())
        grid.randomize(patches[1].shape[1:])
        label = grid._render(patches[1].shape[1:])
        t = tick("v2 grid draw + label render", t)
        fused = grid._fuse_host(patches[0], patches[1], label)
        check_finite("fused", fused, fused.shape)
        t = tick("v2 fusion (5 passes + check)", t)
        n = images.shape[0]
        small = np.zeros((n, 1, *images.shape[2:]), dtype=np.uint8)
        rng = np.random.RandomState(r)
        for i in range(n):  # boxes as drawn by volume_fusion_batch: ~25 per sample
            for _ in range(25):
                size = rng.randint(box_min, np.asarray(box_max) + 1)
                start = np.maximum(rng.randint(0, images.shape[2:]) - size // 2, 0)
                stop = start + size
                small[i, 0, start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]] = rng.randint(1, 5)
        t = tick("v1 paint boxes (uint8, batch)", t)
        label = torch.from_numpy(vf_batch._host_empty(small.shape, np.int64))
        label.copy_(torch.from_numpy(small))
        t = tick("v1 int64 label (batch)", t)
        fused = vf_batch._fuse_batch_cpu(images, torch.from_numpy(small), 4)
        check_finite("fused", fused, tuple(fused.shape))
        t = tick("v1 fusion + check (batch)", t)
    return [(name, statistics.median(v) * 1e3) for name, v in stages.items()]


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
    parser.add_argument("--stages", action="store_true", help="also print the median time of each of our stages")
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

    def pymic_v2():
        return pm_fuse(pm_crop({"image": volume.copy()}))

    t_ours_v2, t_pm_v2 = _interleaved_medians([ours_v2, pymic_v2], repeats)

    images = torch.from_numpy(rng.randn(*batch_shape).astype(np.float32))
    pm_vf = _pymic_volume_fusion()
    gen = torch.Generator().manual_seed(0)
    t_ours_v1, t_pm_v1 = _interleaved_medians(
        [lambda: volume_fusion_batch(images, 4, (10, 40), box_min, box_max, gen),
         lambda: pm_vf(images, 4, [10, 40], list(box_min), list(box_max))],
        repeats,
    )
    bandwidth = _copy_bandwidth(8 if args.quick else 64, max(repeats, 3))

    # bytes that must move per fused sample at least: read fg + bg (float32), write fused (float32) + label
    # (uint8 for VF-v2, int64 for the batch form's contract)
    n = batch_shape[0]
    floor_v2 = int(np.prod(out_size)) * (4 + 4 + 4 + 1)
    floor_v1 = int(np.prod(batch_shape[2:])) * (4 + 4 + 4 + 8)
    rows = [
        ("VF-v2 pair crop + grid, 1 sample", t_ours_v2, t_pm_v2, 20.0, floor_v2),
        (f"VF-v1 batch (N={n}), per sample", t_ours_v1 / n, t_pm_v1 / n, 3.0, floor_v1),
    ]
    print(f"Volume Fusion benchmark: 1 thread, median of {repeats} interleaved runs, input {in_shape} -> "
          f"{out_size}, batch {batch_shape}{' (QUICK: sizes not representative)' if args.quick else ''}")
    header = (f"{'case':36s} {'ours s':>10s} {'pymic s':>10s} {'speed-up':>9s} {'target':>7s} {'result':>6s} "
              f"{'GB/s':>6s} {'x floor':>8s}")
    print(header)
    print("-" * len(header))
    for name, ours, pm, target, floor in rows:
        ratio = pm / ours
        verdict = "PASS" if ratio >= target else "FAIL"
        print(f"{name:36s} {ours:10.4f} {pm:10.4f} {ratio:8.1f}x {target:6.0f}x {verdict:>6s} "
              f"{floor / ours / 1e9:6.2f} {ours / (floor / bandwidth):7.1f}x")
    print(f"memory floor: {floor_v2 / 1e6:.1f} MB per fused VF-v2 sample (fg+bg read, fused+label written), "
          f"{floor_v1 / 1e6:.1f} MB per VF-v1 sample (int64 label); GB/s = that floor / our time (effective, not "
          f"measured); x floor = our time / (floor / {bandwidth / 1e9:.1f} GB/s, the measured one-thread copy "
          "bandwidth)")
    if args.stages:
        print("\nour stages (median ms, same sizes; VF-v1 rows are per batch):")
        for name, ms in _stage_times(volume, crop, grid, images, box_min, box_max, repeats):
            print(f"  {name:34s} {ms:8.3f}")


if __name__ == "__main__":
    main()
