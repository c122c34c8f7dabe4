"""Engine pieces: on-device Volume Fusion batch preparation, SyncBatchNorm, a deep-supervision-aware inferer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.engines.utils import PrepareBatch
from monai.utils import CommonKeys

from misfm_transforms import volume_fusion_batch

__all__ = ["VolumeFusionPrepareBatch", "sync_batchnorm"]


class VolumeFusionPrepareBatch(PrepareBatch):
    """``prepare_batch`` for ``SupervisedTrainer`` that builds VF-v1 samples on the training device.

    The batch's images go to ``device``, then ``volume_fusion_batch`` fuses sample ``n`` with sample ``n - 1``
    (foreground = another volume of the batch, as in the paper's code) and returns the fused images and the
    ``(N, 1, *spatial)`` fusion-level labels. Box sizes are in the tensor's axis order (x, y, z for MONAI).
    """

    def __init__(
        self,
        num_levels: int = 4,
        num_boxes: Sequence[int] = (10, 40),
        box_size_min: Sequence[int] = (8, 8, 8),
        box_size_max: Sequence[int] = (80, 80, 40),
        image_key: str = CommonKeys.IMAGE,
    ) -> None:
        self.kwargs = dict(num_levels=num_levels, num_boxes=tuple(num_boxes), box_size_min=tuple(box_size_min),
                           box_size_max=tuple(box_size_max))
        self.image_key = image_key

    def __call__(self, batchdata: dict[str, Any], device: str | torch.device | None = None,
                 non_blocking: bool = False, **kwargs: Any):
        images = batchdata[self.image_key]
        if images.shape[0] < 2:
            raise ValueError("on-device Volume Fusion needs at least 2 volumes per batch (batch_size >= 2).")
        images = torch.as_tensor(images).to(device=device, non_blocking=non_blocking)
        # the default generator of the batch's device: seeded per rank by setup_process, saved by the resume
        # checkpoint, and the draws never leave the device
        fused, labels = volume_fusion_batch(images, generator=default_generator(images.device), **self.kwargs)
        return fused, labels


def default_generator(device: torch.device) -> torch.Generator:
    """PyTorch's default random generator of ``device`` (the CPU's, or the given CUDA device's)."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def sync_batchnorm(network: Any, enabled: bool, device: Any) -> Any:
    """``multi_gpu_train.json``'s ``sync_batchnorm``: replace every BatchNorm with ``torch.nn.SyncBatchNorm`` (batch
    statistics over the GLOBAL batch, all ranks) or return ``network`` unchanged. PyTorch's SyncBatchNorm runs on
    CUDA (NCCL) only, not on CPU/gloo: asking for it on CPU is refused here, before any training step."""
    if not enabled:
        return network
    if torch.device(device).type != "cuda":
        raise ValueError(
            f"sync_batchnorm=true needs CUDA devices (PyTorch's SyncBatchNorm does not run on {device}); "
            "set sync_batchnorm=false (per-GPU BatchNorm statistics)."
        )
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
