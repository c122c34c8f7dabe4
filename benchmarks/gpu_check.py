"""GPU acceptance check of misfm: what the bundles run, on a CUDA machine, PASS/FAIL per step, then a figures table.

Steps (each prints PASS, FAIL or SKIPPED with its evidence):

1. one PCT-Net training step on CUDA in float32 (TF32 off) against the same step on the CPU in float64: loss,
   every gradient, BatchNorm running statistics;
2. the SDPA backends against the math backend for the windowed attention, fp32/fp16/bf16, with and without the
   shifted-window mask;
3. Volume Fusion on CUDA: the same draws give the CPU's labels and fused images; ``volume_fusion_batch`` makes no
   host synchronisation (counted with ``torch.cuda.set_sync_debug_mode``);
4. the bundles through ``python -m monai.bundle run``, as users run them: pretraining VF-v1 on CPU workers (amp fp16
   + GradScaler) and fused on the device (amp bf16); the thorax bundle trained, SIGKILLed after a checkpoint and
   resumed, evaluated, and run on a synthetic whole CT; ``torchrun --nproc_per_node 1`` with NCCL and SyncBatchNorm;
5. figures: the paper-config train step (64x128x128, batch 2, default widths) in fp32 eager (the baseline), fp16,
   bf16, bf16 + channels_last and bf16 + ``torch.compile`` (ms, peak GiB, throughput against the baseline); Volume
   Fusion samples/s at 64x128x128; seconds for a 512x512x300 CT.

    python benchmarks/gpu_check.py             # CUDA machine: full sizes, about 6-9 minutes on one H100/H200
    python benchmarks/gpu_check.py --quick     # small sizes; without CUDA this is implied and CUDA-only steps
                                               # are SKIPPED (CI runs it so the script cannot rot)

Runs from a plain checkout (the repository is put on the path; misfm need not be installed). Exit status 1 if any
step FAILed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO / "bundles" / "common"
for _path in (str(REPO), str(GLUE)):  # misfm_nets, misfm_transforms and the bundles' code from this checkout
    if _path not in sys.path:
        sys.path.insert(0, _path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

TINY = {"feature_channels": [4, 8, 16, 32, 64], "num_heads": [2, 4, 8]}
RESULTS: list[tuple[str, str, str]] = []  # (step, PASS/FAIL/SKIPPED, evidence)


def step(name: str, needs_cuda: bool = False) -> Callable:
    """Run a check, record PASS/FAIL/SKIPPED with its evidence (the function returns the evidence string)."""

    def wrap(fn: Callable) -> Callable:
        def run(ctx: Context) -> None:
            if needs_cuda and not ctx.cuda:
                RESULTS.append((name, "SKIPPED", "needs CUDA"))
            else:
                try:
                    RESULTS.append((name, "PASS", fn(ctx) or ""))
                except Exception as err:  # a failed check is reported, the others still run
                    detail = f"{type(err).__name__}: {err}"
                    RESULTS.append((name, "FAIL", detail.splitlines()[0][:300]))
                    traceback.print_exc()
            print(f"{RESULTS[-1][1]:>8}  {name}: {RESULTS[-1][2]}", flush=True)
        return run

    return wrap


class Context:
    def __init__(self, quick: bool) -> None:
        self.cuda = torch.cuda.is_available()
        self.quick = quick or not self.cuda
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.tmp = Path(tempfile.mkdtemp(prefix="misfm_gpu_check_"))
        self.figures: list[tuple[str, str, str, str]] = []  # (what, time, peak, note)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _net(ctx: Context, classes: int = 5, size=(128, 128, 64), **kw):
    from misfm_nets import PCTNet

    widths = TINY if ctx.quick else {}
    return PCTNet(1, classes, size, axis_order="xyz", **widths, **kw)


# ------------------------------------------------------------------------------------------------ 1. numerics


@step("train step CUDA fp32 (TF32 off) = CPU fp64", needs_cuda=True)
def check_train_step(ctx: Context) -> str:
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return _compare_train_step(ctx)
    finally:  # PyTorch's defaults again for the figures
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _compare_train_step(ctx: Context) -> str:
    torch.manual_seed(0)
    size = (64, 64, 32)
    net = _net(ctx, 5, size, deep_supervision=True, dropout=(0.0,) * 5, drop_path=0.0)  # no random masks
    x = torch.randn(2, 1, *size)
    y = torch.randint(0, 5, (2, 1, *size)).float()

    def run(model: torch.nn.Module, device: str, dtype: torch.dtype):
        model = model.to(device=device, dtype=dtype).train()
        model.zero_grad(set_to_none=True)
        from monai.losses import DeepSupervisionLoss, DiceCELoss

        loss = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))(model(x.to(device, dtype)),
                                                                               y.to(device))
        loss.backward()
        grads = {k: p.grad.detach().double().cpu() for k, p in model.named_parameters() if p.grad is not None}
        stats = {k: b.detach().double().cpu() for k, b in model.named_buffers() if "running" in k}
        return float(loss), grads, stats

    import copy

    ref = run(copy.deepcopy(net), "cpu", torch.float64)
    got = run(net, "cuda", torch.float32)
    loss_err = abs(got[0] - ref[0]) / abs(ref[0])
    grad_err = max(float((got[1][k] - g).abs().max() / (g.abs().max() + 1e-12)) for k, g in ref[1].items())
    stat_err = max(float((got[2][k] - s).abs().max() / (s.abs().max() + 1e-12)) for k, s in ref[2].items())
    evidence = f"loss rel {loss_err:.1e}, worst gradient rel {grad_err:.1e}, worst BN statistic rel {stat_err:.1e}"
    if not (loss_err < 1e-4 and grad_err < 1e-2 and stat_err < 1e-4):
        raise AssertionError(evidence)
    return evidence


@step("SDPA backends = math path (fp32/fp16/bf16, with and without shift mask)", needs_cuda=True)
def check_sdpa(ctx: Context) -> str:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from misfm_nets.swin import WindowAttention, shift_mask

    torch.manual_seed(0)
    attention = WindowAttention(64, 6, 4).cuda().eval()
    windows = torch.randn(2, 8, 216, 64, device="cuda")
    mask = shift_mask((12, 12, 12), 6, 3, windows)  # (8 windows, 216, 216) on the windows' device
    tolerance = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
    ran, worst = [], 0.0
    for dtype, tol in tolerance.items():
        for m in (None, mask):
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                with sdpa_kernel(SDPBackend.MATH):
                    ref = attention(windows, m).float()
                for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
                    try:
                        with sdpa_kernel(backend), warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            out = attention(windows, m).float()
                    except RuntimeError:  # this backend does not take an additive mask or this dtype: not used
                        continue
                    err = float((out - ref).abs().max() / ref.abs().max())
                    worst = max(worst, err / tol)
                    ran.append(f"{backend.name.split('_')[0].lower()}/{str(dtype)[6:]}/"
                               f"{'mask' if m is not None else '-'}"
                               f" {err:.1e}")
                    if err > tol:
                        raise AssertionError(f"{backend.name} {dtype} mask={m is not None}: "
                                             f"rel error {err:.2e} > {tol}")
    if not ran:
        raise AssertionError("no SDPA backend besides math ran")
    return f"{len(ran)} backend cases, worst at {worst:.2f}x its tolerance"


# ------------------------------------------------------------------------------------------------ 3. Volume Fusion


def _vf_args(ctx: Context) -> dict:
    return dict(num_boxes=(10, 40), box_size_min=(8, 8, 8), box_size_max=(80, 80, 40), num_levels=4)


@step("Volume Fusion on CUDA = CPU for the same draws", needs_cuda=True)
def check_vf_equal(ctx: Context) -> str:
    from misfm_transforms.engine import fuse, paint_boxes, sample_boxes

    size = (128, 128, 64)
    draws = torch.rand(8, 1 + 7 * 40, generator=torch.Generator().manual_seed(0))
    images = torch.rand(8, 1, *size, generator=torch.Generator().manual_seed(1))
    out = {}
    for device in ("cpu", "cuda"):
        a = _vf_args(ctx)
        boxes = sample_boxes(lambda shape: draws.to(device), 8, size, a["num_boxes"], a["box_size_min"],
                             a["box_size_max"], a["num_levels"])
        label = paint_boxes(boxes, size)
        fused = fuse(images.roll(1, 0).to(device), images.to(device), label, 4)
        out[device] = (label.cpu(), fused.cpu())
    same_label = torch.equal(out["cpu"][0], out["cuda"][0])
    same_fused = torch.equal(out["cpu"][1], out["cuda"][1])
    if not (same_label and same_fused):
        raise AssertionError(f"labels equal {same_label}, fused bit-identical {same_fused}")
    return "labels equal, fused images bit-identical (8 x 128x128x64)"


@step("volume_fusion_batch on CUDA: no host synchronisation", needs_cuda=True)
def check_vf_no_sync(ctx: Context) -> str:
    from misfm_transforms import volume_fusion_batch

    images = torch.rand(16, 1, 128, 128, 64, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    volume_fusion_batch(images, generator=generator)  # warm-up (allocations, kernels)
    _sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            volume_fusion_batch(images, generator=generator)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    if syncs:
        raise AssertionError(f"{len(syncs)} host synchronisation(s): {syncs[0].message}")
    return "0 host synchronisations (torch.cuda.set_sync_debug_mode)"


# ------------------------------------------------------------------------------------------------ 4. bundles


def _synthetic_ct(path: Path, shape, seed: int, labels: Path | None = None, classes: int = 5) -> None:
    import nibabel as nib

    rng = np.random.RandomState(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = (grids[0] ** 2 + grids[1] ** 2) < 0.8
    image = np.where(body, rng.normal(40, 30, shape), rng.normal(-950, 20, shape)).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    for k in range(1, classes):
        centre = rng.uniform(-0.4, 0.4, 3)
        organ = sum((g - c) ** 2 for g, c in zip(grids, centre)) < 0.04
        image[organ] = 100 * k
        label[organ] = k
    affine = np.diag([1.0, 1.0, 2.5, 1.0])
    nib.save(nib.Nifti1Image(image, affine), str(path))
    if labels is not None:
        nib.save(nib.Nifti1Image(label, affine), str(labels))


def _dataset(ctx: Context, name: str, n: int, labels: bool) -> Path:
    folder = ctx.tmp / name
    folder.mkdir(parents=True, exist_ok=True)
    shape = (64, 64, 32) if ctx.quick else (192, 192, 96)
    entries = []
    for i in range(n):
        image, label = folder / f"ct_{i}.nii.gz", folder / f"ct_{i}_label.nii.gz"
        _synthetic_ct(image, shape, i, label if labels else None)
        entries.append({"image": image.name, "label": label.name} if labels else {"image": image.name})
    listing = {"training": entries[:-1], "validation": entries[-1:], "testing": [{"image": entries[-1]["image"]}]}
    (folder / "datalist.json").write_text(json.dumps(listing))
    return folder / "datalist.json"


def _bundle_args(ctx: Context, bundle: str, configs: list, datalist: Path, work: str, **overrides) -> Path:
    root = REPO / "bundles" / bundle
    size = [32, 32, 16] if ctx.quick else [128, 128, 64]
    args = {"meta_file": str(root / "configs" / "metadata.json"),
            "logging_file": str(root / "configs" / "logging.conf"),
            "config_file": [str(root / "configs" / c) for c in configs], "bundle_root": str(root),
            "dataset_dir": str(datalist.parent), "data_list_file_path": str(datalist),
            "ckpt_dir": str(ctx.tmp / work / "models"), "output_dir": str(ctx.tmp / work / "eval"),
            "roi_size": size, "num_workers": 2, "max_epochs": 1, "epoch_length": 4, "val_interval": 1,
            "batch_size": 2, "cache_rate": 1.0, "amp": ctx.cuda, "device": "cuda:0" if ctx.cuda else "cpu"}
    if ctx.quick:
        args.update(TINY, box_size_min=[4, 4, 4], box_size_max=[16, 16, 8], num_boxes=[2, 6], num_workers=0)
    args.update(overrides)
    path = ctx.tmp / f"args_{work}_{len(list(ctx.tmp.glob(f'args_{work}_*')))}.json"
    path.write_text(json.dumps(args))
    return path


def _env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2",
                PYTHONPATH=os.pathsep.join([str(REPO), str(GLUE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))


def _bundle(args: Path, run_id: str = "run", launcher: list | None = None, kill_on: str | None = None) -> str:
    """``python -m monai.bundle run`` (or under ``launcher``); with ``kill_on`` SIGKILL it when a line has it."""
    cmd = [*(launcher or [sys.executable, "-m"]), "monai.bundle", "run", run_id, "--args_file", str(args)]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8",
                               errors="replace", env=_env(), start_new_session=True)
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if kill_on and kill_on in line:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return "".join(lines)
    code = process.wait()
    if code != 0 or kill_on:
        tail = "".join(lines[-30:])
        raise AssertionError(f"{' '.join(cmd[-4:])} exited {code}" + (" before the kill marker" if kill_on else "")
                             + f":\n{tail}")
    return "".join(lines)


@step("pretraining VF-v1, fused on CPU workers (amp fp16 + GradScaler on CUDA)")
def check_pretraining_cpu_fusion(ctx: Context) -> str:
    datalist = _dataset(ctx, "pretraining", 5, labels=False)
    out = _bundle(_bundle_args(ctx, "misfm_ct_pretraining", ["train.json"], datalist, "pre_v1"), "training")
    if "Epoch: 1/1, Iter: 4/4" not in out:
        raise AssertionError("4 training iterations not logged")
    return "4 iterations, validation, model.pt" + (" (amp fp16)" if ctx.cuda else " (CPU, no amp)")


@step("pretraining VF-v1 fused on the device (amp bf16)")
def check_pretraining_device_fusion(ctx: Context) -> str:
    datalist = ctx.tmp / "pretraining" / "datalist.json"
    bf16 = {"train#trainer#amp_kwargs": {"dtype": "$torch.bfloat16"}} if ctx.cuda else {}
    out = _bundle(_bundle_args(ctx, "misfm_ct_pretraining", ["train.json", "fuse_on_device.json"], datalist, "pre_dev",
                               **bf16), "training")
    if "Epoch: 1/1, Iter: 4/4" not in out:
        raise AssertionError("4 training iterations not logged")
    return "fusion in prepare_batch on " + ("cuda, bf16 autocast" if ctx.cuda else "the CPU")


@step("thorax bundle: train, SIGKILL after a checkpoint, resume, evaluate, infer")
def check_segmentation(ctx: Context) -> str:
    datalist = _dataset(ctx, "thorax", 4, labels=True)
    common = dict(max_epochs=2, epoch_length=3, batch_size=1, checkpoint_interval=2)  # 3 training cases
    _bundle(_bundle_args(ctx, "misfm_thorax_ct_segmentation", ["train.json"], datalist, "thorax", **common),
            "training", kill_on="training checkpoint saved")
    out = _bundle(_bundle_args(ctx, "misfm_thorax_ct_segmentation", ["train.json"], datalist, "thorax", **common),
                  "training")
    if "resuming from iteration 2" not in out:
        raise AssertionError("the rerun did not resume from the checkpoint")
    _bundle(_bundle_args(ctx, "misfm_thorax_ct_segmentation", ["train.json", "evaluate.json"], datalist, "thorax",
                         output_dir=str(ctx.tmp / "thorax" / "evaluation")))
    rows = (ctx.tmp / "thorax" / "evaluation" / "per_class_metrics.csv").read_text().splitlines()
    # inference on a whole synthetic CT (512x512x300 at full size)
    whole = ctx.tmp / "whole"
    whole.mkdir()
    shape = (96, 96, 48) if ctx.quick else (512, 512, 300)
    _synthetic_ct(whole / "whole_ct.nii.gz", shape, 7)
    (whole / "datalist.json").write_text(json.dumps({"testing": [{"image": "whole_ct.nii.gz"}]}))
    start = time.perf_counter()
    _bundle(_bundle_args(ctx, "misfm_thorax_ct_segmentation", ["inference.json"], whole / "datalist.json", "thorax",
                         output_dir=str(whole / "pred")))
    seconds = time.perf_counter() - start
    if not list((whole / "pred").rglob("*_seg.nii.gz")):
        raise AssertionError("inference wrote no segmentation")
    return f"resumed at iteration 2, evaluation CSV {len(rows) - 2} case(s), whole-CT inference command {seconds:.1f} s"


@step("torchrun --nproc_per_node 1, NCCL + SyncBatchNorm", needs_cuda=True)
def check_torchrun(ctx: Context) -> str:
    datalist = ctx.tmp / "thorax" / "datalist.json"
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "1", "--master_port", "29517", "-m"]
    out = _bundle(_bundle_args(ctx, "misfm_thorax_ct_segmentation", ["train.json", "multi_gpu_train.json"], datalist,
                               "ddp", sync_batchnorm=True, device="cuda:0"), "training", launcher=torchrun)
    if "Epoch: 1/1" not in out:
        raise AssertionError("no training iteration logged")
    return "NCCL process group, SyncBatchNorm, 1 epoch"


# ------------------------------------------------------------------------------------------------ 5. figures


def _time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    _sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak() -> str:
    """Peak CUDA memory since the last reset, or "-" on the CPU (no allocator statistics there)."""
    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if torch.cuda.is_available() else "-"


@step("figures: PCT-Net train step (paper config on the GPU)")
def figures_train_step(ctx: Context) -> str:
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    size = (32, 32, 16) if ctx.quick else (128, 128, 64)  # (x, y, z) = the paper's 64x128x128
    x = torch.randn(2, 1, *size, device=ctx.device)
    y = torch.randint(0, 14, (2, 1, *size), device=ctx.device).float()  # labels load as float, as in the bundles
    loss_fn = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))
    variants = [("fp32 eager (baseline)", None, False, False),
                ("fp16 autocast + GradScaler", torch.float16, False, False),
                ("bf16 autocast", torch.bfloat16, False, False), ("bf16 + channels_last", torch.bfloat16, True, False),
                ("bf16 + torch.compile", torch.bfloat16, False, True)]
    base = None
    for name, dtype, channels_last, compiled in variants:
        if dtype == torch.float16 and not ctx.cuda:
            ctx.figures.append((f"train step {name}", "skipped", "", "fp16 autocast needs CUDA"))
            continue
        torch.manual_seed(0)
        net = _net(ctx, 14, size, deep_supervision=True, channels_last=channels_last).to(ctx.device).train()
        # on a CPU (quick mode) dynamo's tracing is exercised without inductor's minutes of C++ compilation
        model = torch.compile(net, backend="inductor" if ctx.cuda else "eager") if compiled else net
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

        def train_step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(ctx.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = _time(train_step, 1 if ctx.quick else 10)
        base = seconds if base is None else base
        ctx.figures.append((f"train step {name}", f"{seconds * 1e3:.0f} ms", _peak(),
                            f"{base / seconds:.2f}x baseline throughput"))
        net = model = opt = None  # free this variant's memory before the next one
        if ctx.cuda:
            torch.cuda.empty_cache()
    best = max((float(f[3].split("x")[0]) for f in ctx.figures if f[0].startswith("train step") and f[3]
                and f[1] != "skipped"), default=float("nan"))
    return f"best {best:.2f}x the fp32 eager throughput (target >= 2x on the GPU)"


@step("figures: Volume Fusion on the device (64x128x128 on the GPU)")
def figures_vf(ctx: Context) -> str:
    from misfm_transforms import volume_fusion_batch

    n = 4 if ctx.quick else 64
    size = (32, 32, 16) if ctx.quick else (128, 128, 64)
    images = torch.rand(n, 1, *size, device=ctx.device)
    generator = torch.Generator(device=ctx.device).manual_seed(0)
    seconds = _time(lambda: volume_fusion_batch(images, generator=generator), 2 if ctx.quick else 20)
    rate = n / seconds
    ctx.figures.append((f"Volume Fusion, batch {n} of {'x'.join(map(str, size))}", f"{rate:.0f} samples/s", "",
                        "target >= 1000/s on the GPU"))
    return f"{rate:.0f} samples/s"


@step("figures: whole-CT sliding-window inference")
def figures_inference(ctx: Context) -> str:
    from monai.inferers import SlidingWindowInferer

    size, roi = ((96, 96, 48), (32, 32, 16)) if ctx.quick else ((512, 512, 300), (128, 128, 64))
    net = _net(ctx, 14, roi).to(ctx.device).eval()
    volume = torch.randn(1, 1, *size, device=ctx.device)
    inferer = SlidingWindowInferer(roi, sw_batch_size=8, overlap=0.25, mode="gaussian")

    def infer():
        with torch.inference_mode(), torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.cuda):
            return inferer(volume, net)

    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = _time(infer, 1 if ctx.quick else 3)
    ctx.figures.append((f"inference {'x'.join(map(str, size))}, roi {'x'.join(map(str, roi))}", f"{seconds:.2f} s",
                        _peak(), "bf16, target < 5 s on the GPU" if ctx.cuda else "fp32"))
    return f"{seconds:.2f} s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (implied without CUDA)")
    args = parser.parse_args()
    ctx = Context(args.quick)
    where = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})" if ctx.cuda else \
        f"CPU ({os.cpu_count()} cores), quick sizes"
    print(f"misfm gpu_check on {where}, torch {torch.__version__}", flush=True)
    started = time.perf_counter()
    for check in (check_train_step, check_sdpa, check_vf_equal, check_vf_no_sync, check_pretraining_cpu_fusion,
                  check_pretraining_device_fusion, check_segmentation, check_torchrun, figures_train_step, figures_vf,
                  figures_inference):
        check(ctx)
    print(f"\nsteps: {sum(r[1] == 'PASS' for r in RESULTS)} PASS, {sum(r[1] == 'FAIL' for r in RESULTS)} FAIL, "
          f"{sum(r[1] == 'SKIPPED' for r in RESULTS)} SKIPPED in {time.perf_counter() - started:.0f} s")
    width = max(len(f[0]) for f in ctx.figures) + 2
    print(f"\n{'figure':<{width}}{'result':>16}{'peak':>11}  note")
    for what, result, peak, note in ctx.figures:
        print(f"{what:<{width}}{result:>16}{peak:>11}  {note}")
    return 1 if any(r[1] == "FAIL" for r in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main())
