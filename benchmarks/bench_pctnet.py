"""PCT-Net training-step time and peak memory, ours against a straightforward attention, in one run.

Each case runs in a fresh subprocess (so peak memory belongs to that case alone): build the net, one warm-up
step, then ``--steps`` timed forward+backward steps (median). "Peak" is the high-water mark of the process
RSS during the steps minus the RSS before them on CPU, or ``torch.cuda.max_memory_allocated`` on GPU.

The baseline swaps our :class:`misfm_nets.swin.WindowAttention` forward for the textbook one of the original
code (explicit ``softmax(q k^T * scale + bias + mask) v``, which keeps the score tensor for backward); the
rest of the network is the same, so the ratio isolates what the attention path costs.

    python benchmarks/bench_pctnet.py                   # small config, CPU
    python benchmarks/bench_pctnet.py --preset paper    # default widths at 64x128x128 (~1 min/step on 2 cores)
    python benchmarks/bench_pctnet.py --device cuda --preset paper --amp
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PRESETS = {
    "small": dict(size=(32, 64, 64), kwargs=dict(feature_channels=(8, 16, 32, 64, 128), num_heads=(2, 4, 8))),
    "paper": dict(size=(64, 128, 128), kwargs={}),
}


def naive_attention_forward(self, windows, mask=None):
    """The original's attention: scores materialised, softmax, dropout, weighted sum."""
    import torch

    b, nw, n, c = windows.shape
    h = self.num_heads
    qkv = self.qkv(windows).view(b, nw, n, 3, h, c // h).permute(3, 0, 1, 4, 2, 5)
    q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
    attn = q @ k.transpose(-2, -1)
    bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, h).permute(2, 0, 1)
    attn = attn + bias
    if mask is not None:
        attn = attn + mask.unsqueeze(1)
    attn = torch.nn.functional.dropout(attn.softmax(-1), self.attn_drop, self.training)
    out = (attn @ v).transpose(2, 3).reshape(b, nw, n, c)
    return self.proj_drop(self.proj(out))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_case(preset: str, attention: str, device: str, steps: int, amp: bool) -> dict:
    import torch

    from misfm_nets import PCTNet
    from misfm_nets.swin import WindowAttention

    if attention == "naive":
        WindowAttention.forward = naive_attention_forward
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    net = PCTNet(1, 5, cfg["size"], deep_supervision=True, **cfg["kwargs"]).to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.randn(1, 1, *cfg["size"], device=device)
    target = torch.randint(0, 5, (1, *cfg["size"]), device=device)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            out = net(x)[0]
        loss = torch.nn.functional.cross_entropy(out.float(), target)
        loss.backward()
        optimizer.step()
        return float(loss)

    step()  # warm-up: allocator, caches, masks
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_bytes()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return {"seconds": statistics.median(times), "peak_bytes": max(peak, 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for both variants")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case and print JSON
    args = parser.parse_args()
    if args.case:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        result = run_case(args.preset, args.case, args.device, args.steps, args.amp)
        print(json.dumps(result))
        return
    cfg = PRESETS[args.preset]
    print(f"PCT-Net train step (fwd+bwd+Adam), preset {args.preset}: input 1x1x{'x'.join(map(str, cfg['size']))}, "
          f"{cfg['kwargs'] or 'default widths (24,48,128,256,512)'}, device {args.device}, "
          f"{'bf16 autocast' if args.amp else 'fp32'}, median of {args.steps} steps after 1 warm-up")
    results = {}
    for case in ("naive", "sdpa"):
        cmd = [sys.executable, __file__, "--case", case, "--preset", args.preset, "--device", args.device,
               "--steps", str(args.steps), "--threads", str(args.threads)] + (["--amp"] if args.amp else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"case {case} failed:\n{done.stderr[-3000:]}")
        results[case] = json.loads(done.stdout.strip().splitlines()[-1])
    base = results["naive"]
    print(f"{'variant':<34}{'step s':>10}{'peak MiB':>12}{'time ratio':>12}{'mem ratio':>11}")
    names = {"naive": "baseline (explicit softmax attn)", "sdpa": "misfm (SDPA, fused mask)"}
    for case, r in results.items():
        print(f"{names[case]:<34}{r['seconds']:>10.3f}{r['peak_bytes'] / 2**20:>12.0f}"
              f"{r['seconds'] / base['seconds']:>12.2f}{r['peak_bytes'] / max(base['peak_bytes'], 1):>11.2f}")


if __name__ == "__main__":
    main()
