"""VF-v1 on a whole batch of torch tensors (any device), as in the paper's training loop."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import check_finite, check_num_levels, check_range, check_sizes
from .engine import empty, fuse, paint_boxes, sample_boxes

__all__ = ["volume_fusion_batch"]


def volume_fusion_batch(
    images: torch.Tensor,
    num_levels: int = 4,
    num_boxes: Sequence[int] | int = (10, 40),
    box_size_min: Sequence[int] = (8, 8, 8),
    box_size_max: Sequence[int] = (80, 80, 40),
    generator: torch.Generator | None = None,
    validate: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VF-v1 for a batch: sample ``n`` is fused with sample ``n - 1`` (``images.roll(1, dims=0)``) in random boxes.

    Per sample: box count in ``num_boxes`` (inclusive), full box size per axis in ``[box_size_min,
    box_size_max]``, centre in ``[0, size - 1]``, box ``[c - s // 2, c - s // 2 + s)`` clipped, level in
    ``1..num_levels``, later boxes overwrite earlier ones. Sizes are in the tensor's spatial axis order; the
    defaults are the paper's bounds for MONAI's ``(x, y, z)`` (40 along the slice axis z).

    Everything after the argument checks runs on ``images.device`` with fixed shapes: the draws, the painting and
    the fusion make no host synchronisation, so the call queues its work and returns (e.g. under
    ``torch.cuda.set_sync_debug_mode("error")``). The only data-dependent check, NaN/inf in the batch, needs one
    (a reduction read back on the host): it runs by default on the CPU, on other devices with ``validate=True``.

    Args:
        images: float tensor ``(N, C, X, Y, Z)``, ``N >= 2``, on any device.
        num_levels: K; ``label / K`` is the weight of the foreground.
        num_boxes: inclusive range of the number of boxes per sample (or one int).
        box_size_min: per-axis minimum full box size (inclusive).
        box_size_max: per-axis maximum full box size (inclusive).
        generator: ``torch.Generator`` on ``images.device`` for reproducible draws (``None``: that device's
            default generator).
        validate: raise on NaN/inf in ``images``; ``None`` (default) checks on the CPU only.

    Returns:
        ``fused`` float32 ``(N, C, X, Y, Z)`` and ``label`` int64 ``(N, 1, X, Y, Z)`` in ``0..num_levels``
        (ready for ``DiceCELoss(to_onehot_y=True, softmax=True)``), both on ``images.device``.

    Example::

        generator = torch.Generator(device=images.device).manual_seed(0)
        fused, label = volume_fusion_batch(images, generator=generator)
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}.")
    if images.ndim != 5:
        raise ValueError(f"images must be a batch (N, C, X, Y, Z) with 3 spatial axes; "
                         f"got shape {tuple(images.shape)}.")
    n, _, *spatial = images.shape
    if n < 2:
        raise ValueError(
            f"volume_fusion_batch needs a batch of at least 2 volumes: sample n is fused with sample n - 1, so a "
            f"batch of {n} would fuse a volume with itself. Use batch_size >= 2, or fuse pairs of volumes in the "
            "transforms with RandVolumeFusion / RandVolumeFusiond."
        )
    k = check_num_levels(num_levels)
    count_range = check_range("num_boxes", num_boxes, minimum=0)
    size_min, size_max = check_sizes("box_size_min", box_size_min, "box_size_max", box_size_max)
    device = images.device
    if generator is not None and (generator.device.type != device.type
                                  or generator.device.index not in (None, device.index)):
        raise ValueError(f"generator is on {generator.device} but images are on {device}: draw on the batch's "
                         "device, torch.Generator(device=images.device).")
    if validate is None:
        validate = device.type == "cpu"
    images = images.detach().as_subclass(torch.Tensor).to(torch.float32)
    if validate:
        check_finite("images", images, tuple(images.shape))

    def uniform(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=device)

    boxes = sample_boxes(uniform, n, spatial, count_range, size_min.tolist(), size_max.tolist(), k)
    label = empty((n, 1, *spatial), torch.int64, device)
    small = paint_boxes(boxes, spatial, scratch=label[:, 0])  # uint8; the int64 label's memory as work buffer
    label.copy_(small)
    fused = empty(images.shape, torch.float32, device)
    for i in range(n):  # sample by sample: no rolled copy of the batch, per-sample temporaries
        fuse(images[i - 1], images[i], small[i], k, out=fused[i])
    return fused, label
