"""One-shot performance check on a CUDA machine: PCT-Net training, GPU Volume Fusion, whole-volume inference.

Prints one table. On CUDA (targets in brackets):
  * PCT-Net train step (fwd+bwd+Adam), default widths, 64x128x128, batch 2: time and peak memory, fp32 and bf16;
  * Volume Fusion on the GPU: samples/s of ``misfm_transforms.volume_fusion_batch`` at 64x128x128 [>= 1000/s];
  * sliding-window inference of a 512x512x300 volume (roi 128x128x64, gaussian, overlap 0.25) [< 5 s].
Without CUDA it runs the same rows on the CPU at small sizes (``--quick`` implied) so the script stays tested.

    python benchmarks/gpu_check.py            # CUDA if available, else quick CPU run
    python benchmarks/gpu_check.py --quick    # small sizes everywhere
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

TINY = dict(feature_channels=(4, 8, 16, 32, 64), num_heads=(2, 4, 8))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return "n/a (CPU)"


def train_rows(device: str, quick: bool, batch: int) -> list:
    import torch

    from misfm_nets import PCTNet

    size = (16, 32, 32) if quick else (64, 128, 128)
    widths = TINY if quick else {}
    rows = []
    for amp in (False, True):
        torch.manual_seed(0)
        net = PCTNet(1, 5, size, deep_supervision=True, **widths).to(device).train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        x = torch.randn(batch, 1, *size, device=device)
        y = torch.randint(0, 5, (batch, *size), device=device)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
                outs = net(x)
            loss = sum(torch.nn.functional.cross_entropy(o.float(), _resize(y, o)) * w
                       for o, w in zip(outs, (0.5, 0.25, 0.125, 0.125)))
            loss.backward()
            opt.step()

        step()
        _sync(device)
        _peak_reset(device)
        seconds = _timed(step, device, 1 if quick else 5)
        what = f"PCT-Net train step {'bf16' if amp else 'fp32'}, {batch}x1x{'x'.join(map(str, size))}" + (
            ", tiny widths" if quick else ", default widths")
        rows.append((what, f"{seconds:.3f} s", _peak(device), ""))
        del net, opt
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def _resize(label, out):
    """Nearest down-sampling of the label map to a deep-supervision output's size."""
    import torch

    if label.shape[1:] == out.shape[2:]:
        return label
    return torch.nn.functional.interpolate(label[:, None].float(), size=out.shape[2:], mode="nearest")[:, 0].long()


def vf_row(device: str, quick: bool) -> tuple:
    import torch

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:  # run as a script from a checkout: the repo's packages are importable
        sys.path.insert(0, root)
    try:
        from misfm_transforms import volume_fusion_batch
    except ImportError as err:
        return ("Volume Fusion (GPU batch)", "skipped", "", f"volume_fusion_batch not importable: {err}")
    size = (16, 32, 32) if quick else (64, 128, 128)
    n = 4 if quick else 64
    images = torch.rand(n, 1, *size, device=device)
    generator = torch.Generator(device=device).manual_seed(0)

    def run():
        volume_fusion_batch(images, generator=generator)

    seconds = _timed(run, device, 2 if quick else 10)
    return (f"Volume Fusion batch of {n}, {'x'.join(map(str, size))}", f"{n / seconds:.0f} samples/s", "",
            "" if quick or not device.startswith("cuda") else "target >= 1000/s")


def inference_row(device: str, quick: bool) -> tuple:
    import torch
    from monai.inferers import SlidingWindowInferer

    from misfm_nets import PCTNet

    size, roi = ((48, 48, 24), (32, 32, 16)) if quick else ((512, 512, 300), (128, 128, 64))
    widths = TINY if quick else {}
    torch.manual_seed(0)
    net = PCTNet(1, 2, roi, axis_order="xyz", **widths).to(device).eval()
    volume = torch.randn(1, 1, *size, device=device)
    inferer = SlidingWindowInferer(roi, sw_batch_size=4, overlap=0.25, mode="gaussian", cache_roi_weight_map=True)

    def predictor(x):
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                            enabled=device.startswith("cuda")):
            return net(x).float()

    def run():
        with torch.inference_mode():
            inferer(volume, predictor)

    _peak_reset(device)
    seconds = _timed(run, device, 1)
    amp = "bf16" if device.startswith("cuda") else "fp32"
    return (f"Inference {'x'.join(map(str, size))} (roi {'x'.join(map(str, roi))}, {amp})", f"{seconds:.2f} s",
            _peak(device), "" if quick or not device.startswith("cuda") else "target < 5 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (implied without CUDA)")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    quick = args.quick or not cuda
    name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores), quick sizes"
    print(f"gpu_check on {name}, torch {torch.__version__}")
    rows = train_rows(device, quick, args.batch) + [vf_row(device, quick), inference_row(device, quick)]
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'check':<{width}}{'result':>18}{'peak memory':>14}  note")
    for what, result, peak, note in rows:
        print(f"{what:<{width}}{result:>18}{peak:>14}  {note}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
