"""Single-thread CPU timing of our Volume Fusion transforms against pymic 0.6.2.

(a) VF-v2: RandPairCropForVolumeFusion + RandVolumeFusionGrid vs pymic Crop4VolumeFusion + VolumeFusion,
    one sample 1x96x192x192 -> 64x128x128 (target: 10x faster).
(b) VF-v1: volume_fusion_batch vs pymic's volume_fusion, batch 4 at 64x128x128, per sample (target: 3x faster),
    and the array transform RandVolumeFusion on one pair (what a data-loader worker runs).

Options: ``--before REV`` also times the package as it was at git revision REV (extracted with ``git show``),
interleaved with ours and pymic; ``--stages`` prints the median time of each of our stages; ``--choices`` times
the alternatives behind the engine's and the pair crop's implementation choices, each against ours.

Usage: python benchmarks/bench_volume_fusion.py [--quick] [--before main] [--stages] [--choices]
(--quick: tiny sizes, 1 repeat, smoke test only)
"""

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from misfm_transforms import (  # noqa: E402
    RandPairCropForVolumeFusion,
    RandVolumeFusionGrid,
    adaptive_contrast,
    engine,  # noqa: E402
    gamma_correction,
    resize_linear,
)
from misfm_transforms.pair_crop import _percentiles  # noqa: E402


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


def _package_at(revision: str, into: str):
    """``misfm_transforms`` as it was at git ``revision``, imported as ``misfm_transforms_before``."""
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{revision}:misfm_transforms"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    package = os.path.join(into, "misfm_transforms_before")
    os.makedirs(package)
    for name in names:
        if name.endswith(".py"):
            text = subprocess.run(["git", "show", f"{revision}:misfm_transforms/{name}"], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout
            with open(os.path.join(package, name), "w", encoding="utf-8") as f:
                f.write(text)
    sys.path.insert(0, into)
    return importlib.import_module("misfm_transforms_before")


def _pymic_volume_fusion():
    import pymic

    path = os.path.join(os.path.dirname(pymic.__file__), "net_run", "self_sup", "util.py")
    spec = importlib.util.spec_from_file_location("pymic_self_sup_util", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.volume_fusion


def _stage_times(volume, crop, grid, images, box_min, box_max, repeats: int) -> list[tuple[str, float]]:
    """Median ms of each stage of our VF-v2 sample (both patches together) and VF-v1 batch, replayed with the
    transforms' pieces in the order of their ``__call__``."""
    from monai.transforms import Flip, SpatialCrop

    stages: dict[str, list[float]] = {}

    def tick(name, start):
        now = time.perf_counter()
        stages.setdefault(name, [0.0] * repeats)[r] += now - start
        return now

    data = torch.as_tensor(volume)
    n, _, *spatial = images.shape
    for r in range(repeats):
        t = time.perf_counter()
        crop.randomize(volume.shape[1:])
        t = tick("v2 draw crop parameters", t)
        patches = []
        for i in range(2):
            start = crop.crop_starts[i]
            patch = resize_linear(SpatialCrop(roi_start=start, roi_end=start + crop.crop_sizes[i])(data).as_tensor(),
                                  crop.spatial_size)
            t = tick("v2 SpatialCrop + resize_linear (x2)", t)
            patch = Flip(spatial_axis=[0, 1, 2])(patch).as_tensor()
            t = tick("v2 Flip, 3 axes (x2)", t)
            _percentiles(patch.reshape(-1).numpy(), *crop.percentiles[i])
            t = tick("v2 percentiles alone (x2)", t)
            patch = adaptive_contrast(patch, *crop.percentiles[i])
            t = tick("v2 adaptive_contrast (x2)", t)
            patches.append(gamma_correction(patch, crop.gammas[i]))
            t = tick("v2 gamma_correction (x2)", t)
        grid.randomize(patches[1].shape[1:])
        label = engine.paint_grid(grid._grid, patches[1].shape[1:])
        t = tick("v2 grid draw + paint", t)
        engine.fuse(patches[0], patches[1], label, 4)
        t = tick("v2 fuse", t)
        boxes = engine.sample_boxes(torch.rand, n, spatial, (10, 40), box_min, box_max, 4)
        t = tick("v1 sample boxes (batch)", t)
        small = engine.paint_boxes(boxes, spatial)
        t = tick("v1 paint boxes (batch)", t)
        for j in range(n):
            engine.fuse(images[j - 1], images[j], small[j], 4)
        t = tick("v1 fuse (batch)", t)
    return [(name, statistics.median(v) * 1e3) for name, v in stages.items()]


def _sequential_box_painter(boxes: engine.Boxes, spatial) -> torch.Tensor:
    """pymic's painting, for comparison: one slice assignment per box, coordinates read on the host."""
    out = np.zeros((boxes.counts.shape[0], 1, *spatial), np.uint8)
    starts, stops, levels, counts = boxes.starts.tolist(), boxes.stops.tolist(), boxes.levels.tolist(), boxes.counts
    for i, count in enumerate(counts.tolist()):
        for (x0, y0, z0), (x1, y1, z1), level in zip(starts[i][:count], stops[i][:count], levels[i][:count]):
            out[i, 0, x0:x1, y0:y1, z0:z1] = level
    return torch.from_numpy(out)


def _choices(patch: torch.Tensor, images: torch.Tensor, box_min, box_max, repeats: int
             ) -> list[tuple[str, float, float]]:
    """(choice, ours ms, alternative ms) for the implementation choices, each pair interleaved."""
    from monai.transforms import AdjustContrast, Resize

    n, _, *spatial = images.shape
    flat = patch.reshape(-1).numpy()
    unit = (patch - patch.min()) / (patch.max() - patch.min())
    boxes = engine.sample_boxes(torch.rand, 1, spatial, (10, 40), box_min, box_max, 4)
    batch_boxes = engine.sample_boxes(torch.rand, n, spatial, (10, 40), box_min, box_max, 4)
    batch_label = engine.paint_boxes(batch_boxes, spatial)  # uint8, widened to the int64 label in the row
    crop_shape = (1, *(int(s * 1.1) for s in patch.shape[1:]))
    crop = torch.from_numpy(np.random.RandomState(0).rand(*crop_shape).astype(np.float32))
    trilinear = Resize(patch.shape[1:], mode="trilinear", align_corners=True)
    rows = [
        ("resize, 1.1x crop: resize_linear | MONAI trilinear Resize",
         lambda: resize_linear(crop, patch.shape[1:]), lambda: trilinear(crop)),
        ("percentiles: 2 single-rank partitions | np.percentile",
         lambda: _percentiles(flat, 0.7, 99.3), lambda: np.percentile(flat, [0.7, 99.3])),
        ("power: exp(g log x) | torch.pow", lambda: unit.log().mul_(1.3).exp_(), lambda: unit.pow(1.3)),
        ("gamma: gamma_correction | MONAI AdjustContrast",
         lambda: gamma_correction(patch, 1.3), lambda: AdjustContrast(1.3)(patch)),
        ("VF-v1 painter, 1 sample: bitmask | pymic's slices",
         lambda: engine.paint_boxes(boxes, spatial), lambda: _sequential_box_painter(boxes, spatial)),
        (f"int64 batch label, {batch_label.numel() >> 17} MiB: engine.empty | torch.empty",
         lambda: engine.empty(batch_label.shape, torch.int64, "cpu").copy_(batch_label),
         lambda: torch.empty(batch_label.shape, dtype=torch.int64).copy_(batch_label)),
    ]
    out = []
    for name, ours, alternative in rows:
        ours_s, alternative_s = _interleaved_medians([ours, alternative], repeats)
        out.append((name, ours_s * 1e3, alternative_s * 1e3))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 1 repeat (smoke test)")
    parser.add_argument("--before", metavar="REV", help="also time misfm_transforms as of git revision REV")
    parser.add_argument("--stages", action="store_true", help="also print the median time of each of our stages")
    parser.add_argument("--choices", action="store_true", help="also time the alternatives to our implementation")
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
    images = torch.from_numpy(rng.randn(*batch_shape).astype(np.float32))
    random.seed(0)
    params = {"task": TaskType.SEGMENTATION, "crop4volumefusion_output_size": list(out_size),
              "volumefusion_cls_num": 5, "volumefusion_foreground_ratio": 0.7,
              "volumefusion_patchsize_min": list(block_min), "volumefusion_patchsize_max": list(block_max)}
    pm_crop, pm_fuse, pm_vf = Crop4VolumeFusion(params), VolumeFusion(params), _pymic_volume_fusion()
    packages = {"ours": sys.modules["misfm_transforms"]}
    with tempfile.TemporaryDirectory() as tmp:
        if args.before:
            packages["before"] = _package_at(args.before, tmp)

        def v2(package):
            crop = package.RandPairCropForVolumeFusion(out_size).set_random_state(0)
            grid = package.RandVolumeFusionGrid(4, 0.7, block_min, block_max).set_random_state(0)

            def run():
                foreground, background = crop(volume)
                return grid(background, foreground)
            return run

        def v1_batch(package):
            generator = torch.Generator().manual_seed(0)
            return lambda: package.volume_fusion_batch(images, 4, (10, 40), box_min, box_max, generator)

        def v1_array(package):
            fusion = package.RandVolumeFusion(4, (10, 40), box_min, box_max).set_random_state(0)
            return lambda: fusion(images[1], images[0])

        v2_times = _interleaved_medians([v2(p) for p in packages.values()]
                                        + [lambda: pm_fuse(pm_crop({"image": volume.copy()}))], repeats)
        n = batch_shape[0]
        v1_times = _interleaved_medians([v1_batch(p) for p in packages.values()]
                                        + [lambda: pm_vf(images, 4, [10, 40], list(box_min), list(box_max))], repeats)
        v1_times = [t / n for t in v1_times]
        array_times = _interleaved_medians([v1_array(p) for p in packages.values()], repeats)
    bandwidth = _copy_bandwidth(8 if args.quick else 64, max(repeats, 3))

    # bytes that must move per fused sample at least: read fg + bg (float32), write fused (float32) + label
    # (uint8, or int64 for the batch form's contract)
    voxels = int(np.prod(out_size))
    floor_v2, floor_v1, floor_array = voxels * 13, voxels * 20, voxels * 13
    names = list(packages)
    print(f"Volume Fusion benchmark: 1 thread, median of {repeats} interleaved runs, input {in_shape} -> "
          f"{out_size}, batch {batch_shape}, boxes {box_min}..{box_max}"
          f"{' (QUICK: sizes not representative)' if args.quick else ''}")
    header = (f"{'case':36s} {'version':>8s} {'ours s':>10s} {'pymic s':>10s} {'speed-up':>9s} {'target':>7s} "
              f"{'result':>6s} {'GB/s':>6s} {'x floor':>8s}")
    print(header)
    print("-" * len(header))
    for case, times, target, floor in (("VF-v2 pair crop + grid, 1 sample", v2_times, 10.0, floor_v2),
                                       (f"VF-v1 batch (N={n}), per sample", v1_times, 3.0, floor_v1)):
        for name, ours in zip(names, times[:-1]):
            ratio = times[-1] / ours
            verdict = ("PASS" if ratio >= target else "FAIL") if name == "ours" else ""
            print(f"{case:36s} {name:>8s} {ours:10.4f} {times[-1]:10.4f} {ratio:8.1f}x {target:6.0f}x {verdict:>6s} "
                  f"{floor / ours / 1e9:6.2f} {ours / (floor / bandwidth):7.1f}x")
    for name, ours in zip(names, array_times):
        print(f"{'VF-v1 RandVolumeFusion, 1 pair':36s} {name:>8s} {ours:10.4f} {'':>10s} {'':>9s} {'':>7s} {'':>6s} "
              f"{floor_array / ours / 1e9:6.2f} {ours / (floor_array / bandwidth):7.1f}x")
    print(f"memory floor: {floor_v2 / 1e6:.1f} MB per fused VF-v2 sample or RandVolumeFusion pair (fg+bg read, "
          f"fused+uint8 label written), {floor_v1 / 1e6:.1f} MB per VF-v1 batch sample (int64 label); GB/s = that "
          f"floor / the time (effective, not measured); x floor = the time / (floor / {bandwidth / 1e9:.1f} GB/s, "
          "the measured one-thread copy bandwidth)")
    if args.stages:
        crop = RandPairCropForVolumeFusion(out_size).set_random_state(0)
        grid = RandVolumeFusionGrid(4, 0.7, block_min, block_max).set_random_state(0)
        print("\nour stages (median ms, same sizes; VF-v1 rows are per batch):")
        for name, ms in _stage_times(volume, crop, grid, images, box_min, box_max, repeats):
            print(f"  {name:34s} {ms:8.3f}")
    if args.choices:
        patch = RandPairCropForVolumeFusion(out_size, intensity_augment=False).set_random_state(0)(volume)[0]
        print("\nimplementation choices (median ms, ours | the alternative, interleaved):")
        for name, ours, alternative in _choices(torch.from_numpy(patch), images, box_min, box_max, repeats):
            print(f"  {name:56s} {ours:8.3f} {alternative:8.3f}  ({alternative / ours:.1f}x)")


if __name__ == "__main__":
    main()
