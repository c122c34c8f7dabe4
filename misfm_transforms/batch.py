"""VF-v1 on a whole batch of torch tensors (any device), as in the paper's training loop."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ._checks import check_finite, check_num_levels, check_range, check_sizes
from .fusion import fuse_volumes

__all__ = ["volume_fusion_batch"]


def _uniform_int(low: torch.Tensor, high: torch.Tensor, shape: Sequence[int], generator, device) -> torch.Tensor:
    """Integers uniform in ``[low, high]`` (inclusive, broadcast over the last axis)."""
    u = torch.rand(*shape, generator=generator, dtype=torch.float64, device=device)
    span = (high - low + 1).to(torch.float64)
    return (low + (u * span).floor().long()).minimum(high)


def volume_fusion_batch(
    images: torch.Tensor,
    num_levels: int = 4,
    num_boxes: Sequence[int] | int = (10, 40),
    box_size_min: Sequence[int] = (8, 8, 8),
    box_size_max: Sequence[int] = (40, 80, 80),
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VF-v1 for a batch: sample ``n`` is fused with sample ``n - 1`` (``images.roll(1, dims=0)``) in random boxes.

    Per sample: box count in ``num_boxes`` (inclusive), full box size per axis in ``[box_size_min,
    box_size_max]``, centre in ``[0, size - 1]``, box ``[c - s // 2, c - s // 2 + s)`` clipped, level in
    ``1..num_levels``, later boxes overwrite earlier ones. Sizes are in the tensor's spatial axis order
    (``(D, H, W)`` for the original's slice-first layout, ``(x, y, z)`` for MONAI-loaded volumes).

    All random parameters are drawn at once from ``generator`` (on its device; the default generator on CPU
    when ``None``) and moved to the host in one transfer; the label map is then written box by box with
    asynchronous fills, so a CUDA batch needs no per-box synchronisation and no per-voxel Python work.

    Args:
        images: float tensor ``(N, C, X, Y, Z)`` on any device.
        num_levels: K; ``label / K`` is the weight of the foreground.
        num_boxes: inclusive range of the number of boxes per sample (or one int).
        box_size_min: per-axis minimum full box size (inclusive).
        box_size_max: per-axis maximum full box size (inclusive).
        generator: torch generator for reproducible draws.

    Returns:
        ``fused`` float32 ``(N, C, X, Y, Z)`` and ``label`` int64 ``(N, 1, X, Y, Z)`` in ``0..num_levels``
        (ready for ``DiceCELoss(to_onehot_y=True, softmax=True)``), both on ``images.device``.

    Example::

        fused, label = volume_fusion_batch(batch["image"], generator=torch.Generator().manual_seed(0))
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}.")
    if images.ndim != 5:
        raise ValueError(f"images must be a batch (N, C, X, Y, Z) with 3 spatial axes; got shape {tuple(images.shape)}.")
    k = check_num_levels(num_levels)
    count_lo, count_hi = check_range("num_boxes", num_boxes, minimum=0)
    size_lo, size_hi = (torch.as_tensor(s) for s in check_sizes("box_size_min", box_size_min, "box_size_max", box_size_max))
    n, _, *spatial = images.shape
    shape = torch.tensor(spatial)
    device = generator.device if generator is not None else torch.device("cpu")
    counts = _uniform_int(torch.tensor(count_lo), torch.tensor(count_hi), (n,), generator, device).cpu()
    m = count_hi
    sizes = _uniform_int(size_lo.to(device), size_hi.to(device), (n, m, 3), generator, device).cpu()
    centers = (torch.rand(n, m, 3, generator=generator, dtype=torch.float64, device=device).cpu() * shape).long()
    levels = _uniform_int(torch.tensor(1), torch.tensor(k), (n, m), generator, device).cpu()
    centers = centers.minimum(shape - 1)
    starts = centers - sizes // 2
    stops = (starts + sizes).minimum(shape).tolist()
    starts = starts.clamp(min=0).tolist()
    if images.device.type != "cpu":  # device batch: asynchronous fills and one fused expression, no host sync
        label = torch.zeros((n, 1, *spatial), dtype=torch.int64, device=images.device)
        for i, count in enumerate(counts.tolist()):
            for (x0, y0, z0), (x1, y1, z1), level in zip(starts[i][:count], stops[i][:count], levels[i][:count].tolist()):
                label[i, 0, x0:x1, y0:y1, z0:z1] = level
        fused = fuse_volumes(images.roll(1, dims=0), images, label, k)
        return fused, label
    # CPU: paint the boxes into a uint8 map (numpy slicing: ~1 us per box), widen it once to the int64 label,
    # and fuse sample by sample from the uint8 map with preallocated buffers (no rolled copy of the batch)
    small = np.zeros((n, 1, *spatial), dtype=np.uint8)
    for i, count in enumerate(counts.tolist()):
        for (x0, y0, z0), (x1, y1, z1), level in zip(starts[i][:count], stops[i][:count], levels[i][:count].tolist()):
            small[i, 0, x0:x1, y0:y1, z0:z1] = level
    small_t = torch.from_numpy(small)
    label = torch.from_numpy(_host_empty(small.shape, np.int64))
    label.copy_(small_t)
    fused = _fuse_batch_cpu(images, small_t, k)
    check_finite("foreground or background", fused, tuple(images.shape))
    return fused, label


def _host_empty(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A new uninitialised host array for a large output, allocated by numpy.

    numpy advises transparent huge pages for allocations of 4 MiB and more; torch's allocator does not, and
    glibc serves blocks of 32 MiB and more (the int64 label of a 4 x 64 x 128 x 128 batch) with a fresh
    ``mmap`` every call: 8192 page faults, measured 12 ms per batch against under 3 ms here.
    """
    return np.empty(shape, dtype=dtype)


def _fuse_batch_cpu(images: torch.Tensor, small: torch.Tensor, k: int) -> torch.Tensor:
    """``fused[i] = a * images[i - 1] + (1 - a) * images[i]`` with ``a = float32(label[i]) / float32(K)``.

    The same IEEE float32 operations, in the same order, as the defining expression (bit-identical), per
    sample with two reused buffers: ``a`` is built in the output slot (exact uint8 -> float32 cast, division),
    ``b = 1 - a`` (numpy, one exact subtraction), ``out = a * fg``, ``b *= bg``, ``out += b``.
    """
    n, c = images.shape[:2]
    src = images.detach().as_subclass(torch.Tensor).to(torch.float32)
    fused = torch.from_numpy(_host_empty(tuple(src.shape), np.float32))
    beta = torch.empty((c, *src.shape[2:]), dtype=torch.float32)
    beta_np = beta.numpy()
    for i in range(n):
        out, fg, bg = fused[i], src[(i - 1) % n], src[i]
        out.copy_(small[i])  # broadcasts over the channels
        out.div_(k)
        np.subtract(np.float32(1.0), out.numpy(), out=beta_np)
        out.mul_(fg)
        beta.mul_(bg)
        out.add_(beta)
    return fused
