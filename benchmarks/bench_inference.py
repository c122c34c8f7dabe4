"""Sliding-window inference of a whole CT volume with PCT-Net: MONAI's default call against bounded-memory ones.

Every case runs in a fresh subprocess on the same random volume ``(1, 1, X, Y, Z)`` (MONAI ``xyz`` order, Z = the
slices), with ``monai.inferers.SlidingWindowInferer`` (roi = the net's ``input_size``, gaussian blending), the net
in eval mode under ``torch.inference_mode`` and the predictor returning fp32 logits. Printed per case: wall time,
peak RSS above the process's RSS with the volume loaded (CPU), or ``torch.cuda.max_memory_allocated`` (GPU), their
ratios to MONAI's default call, and how many voxels' argmax agree with it.

Cases:
  default   SlidingWindowInferer(roi, sw_batch_size, overlap, mode="gaussian") - MONAI's defaults otherwise.
  buffered  + buffer_steps / buffer_dim (MONAI >= 1.3): windows are run slab by slab along ``buffer_dim``; the
            blending buffer then covers one slab, not the whole volume per class, and the normalisation map
            is per slab. cache_roi_weight_map=True.
  bf16      buffered + bf16 autocast in the net (logits returned as fp32, blended in fp32).
  fp16out   the volume handed to the inferer as float16: MONAI allocates its blending buffers (the
            per-class output and the count map) in the input's dtype, so they take half the memory; each window
            runs the net in float32 and its logits are blended in float16.
  offload   (CUDA only) buffered with sw_device=cuda, device=cpu: windows on the GPU, the full output on the host.

    python benchmarks/bench_inference.py                       # 512x512x300, tiny widths on CPU (slow: minutes)
    python benchmarks/bench_inference.py --size 256 256 160    # quicker CPU figure
    python benchmarks/bench_inference.py --quick               # tiny volume and net (a few seconds; CI)
    python benchmarks/bench_inference.py --device cuda --widths default
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

WIDTHS = {
    "default": dict(),
    "small": dict(feature_channels=(8, 16, 32, 64, 128), num_heads=(2, 4, 8)),
    "tiny": dict(feature_channels=(4, 8, 16, 32, 64), num_heads=(2, 4, 8)),
}
CASES = ("default", "buffered", "bf16", "fp16out", "offload")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_net(args):
    import torch

    from misfm_nets import PCTNet

    torch.manual_seed(0)
    net = PCTNet(1, args.classes, tuple(args.roi), axis_order="xyz", **WIDTHS[args.widths])
    return net.to(args.device).eval()


def run_case(args, case: str, out_path: str) -> dict:
    import torch
    from monai.inferers import SlidingWindowInferer

    cuda = args.device.startswith("cuda")
    net = build_net(args)
    volume = torch.randn(1, 1, *args.size, generator=torch.Generator().manual_seed(1))
    volume = volume.to("cpu" if case == "offload" else args.device)
    if case == "fp16out":
        volume = volume.half()
    options = dict(roi_size=tuple(args.roi), sw_batch_size=args.sw_batch_size, overlap=args.overlap, mode="gaussian")
    if case != "default":
        options.update(buffer_steps=args.buffer_steps, buffer_dim=-1, cache_roi_weight_map=True)
    if case == "offload":
        options.update(sw_device=args.device, device="cpu")
    inferer = SlidingWindowInferer(**options)
    amp = case == "bf16"

    def predictor(x):
        with torch.autocast(device_type=args.device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
            logits = net(x.float()).float()
        return logits.to(x.dtype)

    with torch.inference_mode():  # warm-up on one window: allocator, caches, masks
        predictor(torch.zeros(args.sw_batch_size, 1, *args.roi, device=args.device, dtype=volume.dtype))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    rss_before = _rss_bytes()
    start = time.perf_counter()
    with torch.inference_mode():
        out = inferer(volume, predictor)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base_alloc
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    torch.save(out.argmax(1).to(torch.uint8).cpu(), out_path)
    return {"seconds": seconds, "peak_bytes": max(peak, 0), "out_bytes": out.numel() * out.element_size(),
            "out_device": str(out.device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 300], help="volume X Y Z (Z = slices)")
    parser.add_argument("--roi", type=int, nargs=3, default=[128, 128, 64], help="net input_size, xyz")
    parser.add_argument("--widths", choices=sorted(WIDTHS), default=None,
                        help="network widths (default: 'default' on CUDA, 'tiny' on CPU)")
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--sw-batch-size", type=int, default=2)
    parser.add_argument("--buffer-steps", type=int, default=1)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--cases", default=None, help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny volume (48x48x24, roi 32x32x16) and tiny net")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.widths is None:
        args.widths = "default" if args.device.startswith("cuda") else "tiny"
    if args.quick:
        args.size, args.roi, args.widths = [48, 48, 24], [32, 32, 16], "tiny"
    if args.case:
        print(json.dumps(run_case(args, args.case, args.out)))
        return
    cases = args.cases.split(",") if args.cases else [c for c in CASES if c != "offload" or "cuda" in args.device]
    print(f"Sliding-window inference, volume 1x1x{'x'.join(map(str, args.size))} (xyz), roi "
          f"{'x'.join(map(str, args.roi))}, overlap {args.overlap}, sw_batch_size {args.sw_batch_size}, gaussian, "
          f"PCT-Net widths {args.widths} ({args.classes} classes), device {args.device}, {os.cpu_count()} CPUs")
    results, labels = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            out_path = os.path.join(tmp, f"{case}.pt")
            cmd = [sys.executable, __file__, "--case", case, "--out", out_path, "--size", *map(str, args.size),
                   "--roi", *map(str, args.roi), "--widths", args.widths, "--classes", str(args.classes),
                   "--overlap", str(args.overlap), "--sw-batch-size", str(args.sw_batch_size),
                   "--buffer-steps", str(args.buffer_steps), "--device", args.device, "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace")
            if done.returncode:
                sys.exit(f"case {case} failed:\n{done.stderr[-3000:]}")
            results[case] = json.loads(done.stdout.strip().splitlines()[-1])
            labels[case] = torch.load(out_path)
    base = results[cases[0]]
    print(f"{'case':<10}{'time s':>9}{'peak MiB':>10}{'output MiB':>12}{'time ratio':>12}{'mem ratio':>11}"
          f"{'argmax agree %':>16}")
    for case, r in results.items():
        agree = float((labels[case] == labels[cases[0]]).float().mean() * 100)
        print(f"{case:<10}{r['seconds']:>9.2f}{r['peak_bytes'] / 2**20:>10.0f}{r['out_bytes'] / 2**20:>12.0f}"
              f"{r['seconds'] / base['seconds']:>12.2f}{r['peak_bytes'] / max(base['peak_bytes'], 1):>11.2f}"
              f"{agree:>16.2f}")


if __name__ == "__main__":
    main()
