"""PCT-Net training-step time and peak memory: ours (with its options) against the original algorithm.

Each case runs in fresh subprocesses (so peak memory belongs to that case alone): build the net, one warm-up
step, then ``--steps`` timed forward+backward+Adam steps (median), with the allocator as users have it. On CPU the
peak comes from a second subprocess (warm-up + one step) with glibc's mmap threshold fixed at 128 KiB, so freed
tensors leave the RSS at once and its high-water mark follows the live tensors: "peak" is that mark minus the RSS
before the step (that setting makes every large allocation fault its pages in again, so it is not used for
timing). On GPU, ``torch.cuda.max_memory_allocated`` of the timed run.

The baseline is a straightforward implementation of the same network, as the original code computes it: the
Swin branch works on ``flatten(2).transpose(1, 2)`` tokens, every block calls ``F.pad``, rolls, partitions and
reverses with copies, crops with ``.contiguous()``, and attention is explicit
``softmax(q k^T * scale + bias + mask) v`` (the score tensor is kept for backward). It is installed by
monkeypatching :class:`misfm_nets.pctnet.ConvTransBlock` and :class:`misfm_nets.swin.SwinBlock` in its own
subprocess; weights and everything else are shared, so outputs are the same (``--check`` verifies it).

    python benchmarks/bench_pctnet.py                   # small config, CPU
    python benchmarks/bench_pctnet.py --preset paper    # default widths at 64x128x128 (~1 min/step on 2 cores)
    python benchmarks/bench_pctnet.py --accuracy        # bf16 autocast against the fp32 golden outputs
    python benchmarks/bench_pctnet.py --device cuda --preset paper --variants baseline,misfm,misfm+bf16
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
from pathlib import Path

PRESETS = {
    "small": dict(size=(32, 64, 64), kwargs=dict(feature_channels=(8, 16, 32, 64, 128), num_heads=(2, 4, 8))),
    "paper": dict(size=(64, 128, 128), kwargs={}),
    "tiny": dict(size=(16, 32, 32), kwargs=dict(feature_channels=(4, 8, 16, 32, 64), num_heads=(2, 4, 8))),  # CI
}
# variant -> (straightforward baseline?, constructor options, bf16 autocast?)
VARIANTS = {
    "baseline": (True, {}, False),
    "misfm": (False, {}, False),
    "misfm-fast": (False, {"fast_cpu_kernels": False}, False),
    "misfm+cl": (False, {"channels_last": True}, False),
    "misfm+ckattn": (False, {"checkpointing": "attention"}, False),
    "misfm+ckpt": (False, {"checkpointing": True}, False),
    "misfm+ckpt+cl": (False, {"checkpointing": True, "channels_last": True}, False),
    "misfm+ckattn+cl": (False, {"checkpointing": "attention", "channels_last": True}, False),
    "misfm+bf16": (False, {}, True),
    "baseline+bf16": (True, {}, True),
}
DESCRIPTIONS = {
    "baseline": "original algorithm (explicit attn, copies)",
    "misfm": "misfm (SDPA/explicit attn, gather windows)",
    "misfm-fast": "misfm, fast_cpu_kernels=False",
    "misfm+cl": "misfm, channels_last_3d",
    "misfm+ckattn": "misfm, checkpointing='attention'",
    "misfm+ckpt": "misfm, checkpointing",
    "misfm+ckpt+cl": "misfm, checkpointing + channels_last",
    "misfm+ckattn+cl": "misfm, checkpointing='attention' + channels_last",
    "misfm+bf16": "misfm, bf16 autocast",
    "baseline+bf16": "original algorithm, bf16 autocast",
}
DEFAULT_VARIANTS = "baseline,misfm,misfm+cl,misfm+ckattn,misfm+ckpt,misfm+bf16"


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


def straightforward_swin_block(self, x, resolution):
    """The original block on ``(B, L, C)`` tokens: pad, roll, partition, attention, reverse, roll, crop."""
    import torch
    import torch.nn.functional as F

    from misfm_nets.swin import shift_mask, window_partition, window_reverse

    b, _, c = x.shape
    s, h, w = resolution
    ws, shift = self.window_size, self.shift_size
    shortcut = x
    y = self.norm1(x).view(b, s, h, w, c)
    ps, ph, pw = (ws - s % ws) % ws, (ws - h % ws) % ws, (ws - w % ws) % ws
    y = F.pad(y, (0, 0, 0, pw, 0, ph, 0, ps))
    padded = y.shape[1:4]
    mask = None
    if shift > 0:
        y = torch.roll(y, shifts=(-shift, -shift, -shift), dims=(1, 2, 3))
        mask = shift_mask(tuple(padded), ws, shift, y)
    windows = window_partition(y, ws).contiguous().view(b, -1, ws**3, c)
    windows = naive_attention_forward(self.attn, windows, mask)
    y = window_reverse(windows, ws, *padded)
    if shift > 0:
        y = torch.roll(y, shifts=(shift, shift, shift), dims=(1, 2, 3))
    y = y[:, :s, :h, :w, :].contiguous().view(b, s * h * w, c)
    x = shortcut + self.drop_path(y)
    return x + self.drop_path(self.mlp(self.norm2(x)))


def straightforward_conv_trans(self, x):
    """The original ConvTransBlock: conv branch + Swin blocks on ``x.flatten(2).transpose(1, 2)`` tokens."""
    b, c, s, h, w = x.shape
    x_conv = self.conv(x)
    tokens = self.pos_drop(x.flatten(2).transpose(1, 2))
    for block in self.trans.blocks:
        tokens = straightforward_swin_block(block, tokens, (s, h, w))
    return x_conv + tokens.view(-1, s, h, w, c).permute(0, 4, 1, 2, 3)


def install_straightforward() -> None:
    """Make every PCTNet built afterwards in this process compute its transformer as the original code does
    (``build`` also turns the fast CPU kernels off, so every layer is the stock PyTorch module)."""
    from misfm_nets.pctnet import ConvTransBlock

    ConvTransBlock.forward = straightforward_conv_trans


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(preset: str, variant: str, device: str, deep_supervision: bool = True):
    import torch

    from misfm_nets import PCTNet

    straightforward, options, _ = VARIANTS[variant]
    if straightforward:
        install_straightforward()
        options = {**options, "fast_cpu_kernels": False}
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    return PCTNet(1, 5, cfg["size"], deep_supervision=deep_supervision, **cfg["kwargs"], **options).to(device)


def run_case(preset: str, variant: str, device: str, steps: int, batch: int = 1) -> dict:
    """Median step seconds and peak bytes (meaningful on CPU only under the fixed mmap threshold, see top)."""
    import torch

    amp = VARIANTS[variant][2]
    cfg = PRESETS[preset]
    net = build(preset, variant, device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, *cfg["size"], generator=generator).to(device)
    target = torch.randint(0, 5, (batch, *cfg["size"]), generator=generator).to(device)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
            out = net(x)[0]
        loss = torch.nn.functional.cross_entropy(out.float(), target)
        loss.backward()
        optimizer.step()
        return float(loss)

    step()  # warm-up: allocator, caches, masks
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = _rss_bytes()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return {"seconds": statistics.median(times), "min_seconds": min(times), "peak_bytes": max(peak, 0)}


def check_same_outputs(preset: str, device: str) -> float:
    """Max |ours - baseline| of the outputs and gradients of one step in eval mode (dropout draws differ)."""
    import torch

    results = []
    for variant in ("misfm", "baseline"):
        net = build(preset, variant, device).eval()
        x = torch.randn(1, 1, *PRESETS[preset]["size"], generator=torch.Generator().manual_seed(1)).to(device)
        outs = net.forward_all_heads(x)
        sum(o.square().mean() for o in outs).backward()
        results.append([o.detach() for o in outs] + [p.grad for p in net.parameters() if p.grad is not None])
    return max(float((a - b).abs().max()) for a, b in zip(*results))


def bf16_accuracy(device: str = "cpu") -> list:
    """bf16 autocast (eval) against the fp32 golden outputs of the original code: one row per golden file."""
    import torch

    from misfm_nets import PCTNet
    from misfm_nets.pctnet import UPSTREAM_CONFIG_KEYS

    golden_dir = Path(__file__).resolve().parents[2] / "shared" / "golden"
    rows = []
    for mode in (0, 1, 2):
        path = golden_dir / f"pctnet_golden_mode{mode}.pt"
        if not path.exists():
            continue
        golden = torch.load(path, weights_only=True)
        net = PCTNet(**{UPSTREAM_CONFIG_KEYS[k]: v for k, v in golden["config"].items()}).to(device).eval()
        net.load_state_dict(golden["state_dict"], strict=False)
        with torch.no_grad(), torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            outs = net(golden["input"].to(device))
        for level, (ours, ref) in enumerate(zip(outs, golden["outputs"])):
            ours, ref = ours.float().cpu(), ref.float()
            err = (ours - ref).abs()
            rows.append({
                "mode": mode, "level": level, "max_abs": float(err.max()), "ref_max": float(ref.abs().max()),
                "rel": float(err.max() / ref.abs().max()), "rel_l2": float(err.norm() / ref.norm()),
                "argmax_agree": float((ours.argmax(1) == ref.argmax(1)).float().mean() * 100),
            })
    return rows


def print_accuracy(rows: list) -> None:
    print("bf16 autocast (eval) vs fp32 golden outputs of the original code (tiny golden nets, 32x64x64):")
    print(f"{'mode':>4}{'out':>5}{'max abs err':>13}{'max |ref|':>11}{'max err/max|ref|':>18}{'rel L2':>9}"
          f"{'argmax agree %':>16}")
    for r in rows:
        print(f"{r['mode']:>4}{r['level']:>5}{r['max_abs']:>13.4f}{r['ref_max']:>11.3f}{r['rel']:>18.4f}"
              f"{r['rel_l2']:>9.4f}{r['argmax_agree']:>16.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--check", action="store_true", help="also check baseline and ours give the same numbers")
    parser.add_argument("--accuracy", action="store_true", help="only the bf16-vs-fp32-golden accuracy table")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case and print JSON
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.accuracy:
        print_accuracy(bf16_accuracy(args.device))
        return
    if args.case:
        if args.case == "check":
            print(json.dumps({"max_diff": check_same_outputs(args.preset, args.device)}))
        else:
            print(json.dumps(run_case(args.preset, args.case, args.device, args.steps, args.batch)))
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    cfg = PRESETS[args.preset]
    print(f"PCT-Net train step (fwd+bwd+Adam), preset {args.preset}: input {args.batch}x1x"
          f"{'x'.join(map(str, cfg['size']))}, {cfg['kwargs'] or 'default widths (24,48,128,256,512)'}, "
          f"device {args.device}, {os.cpu_count()} CPUs, median of {args.steps} steps after 1 warm-up")

    def sub(case: str, steps: int = args.steps, fixed_mmap_threshold: bool = False) -> dict:
        cmd = [sys.executable, __file__, "--case", case, "--preset", args.preset, "--device", args.device,
               "--steps", str(steps), "--batch", str(args.batch), "--threads", str(args.threads)]
        env = dict(os.environ)
        if fixed_mmap_threshold:  # glibc hands large freed blocks back at once: RSS follows the live tensors
            env["MALLOC_MMAP_THRESHOLD_"] = "131072"
        done = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", env=env)
        if done.returncode:
            sys.exit(f"case {case} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def measure(case: str) -> dict:
        result = sub(case)
        if args.device == "cpu":
            result["peak_bytes"] = sub(case, steps=1, fixed_mmap_threshold=True)["peak_bytes"]
        return result

    if args.check:
        print(f"max |ours - baseline| over outputs and gradients of one step (eval mode): "
              f"{sub('check')['max_diff']:.2e}")
    results = {v: measure(v) for v in variants}
    base = results.get("baseline", next(iter(results.values())))
    print(f"{'variant':<44}{'step s':>9}{'min s':>8}{'peak MiB':>10}{'time ratio':>12}{'mem ratio':>11}")
    for v, r in results.items():
        print(f"{DESCRIPTIONS[v]:<44}{r['seconds']:>9.3f}{r['min_seconds']:>8.3f}{r['peak_bytes'] / 2**20:>10.0f}"
              f"{r['seconds'] / base['seconds']:>12.2f}{r['peak_bytes'] / max(base['peak_bytes'], 1):>11.2f}")


if __name__ == "__main__":
    main()
