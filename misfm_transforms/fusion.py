"""Volume Fusion (MIS-FM, Wang et al. 2023) as MONAI array transforms, and the checked fusion :func:`fuse_volumes`.

* :class:`RandVolumeFusion` is VF-v1 (the paper): random boxes, later boxes overwrite earlier ones.
* :class:`RandVolumeFusionGrid` is VF-v2 ("VolF"): one random block grid per volume, a fixed ratio of the blocks
  are foreground.

Both draw from MONAI's ``self.R`` in :meth:`randomize` and leave sampling, painting and fusion to
:mod:`misfm_transforms.engine`. Arrays are channel-first ``(C, X, Y, Z)``; every per-axis size is in the array's
own spatial axis order. The defaults are MONAI's ``(x, y, z)``: the paper's box bounds ``(40, 80, 80)`` (slice axis
first, as in the original ``(D, H, W)`` code) are ``(80, 80, 40)`` here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.transforms import RandomizableTransform
from monai.utils import TransformBackends, convert_to_dst_type

from ._checks import check_finite, check_num_levels, check_range, check_same_shape, check_sizes, check_spatial_3d
from .engine import Boxes, Grid, fuse, paint_boxes, paint_grid, sample_boxes, sample_grid

__all__ = ["fuse_volumes", "RandVolumeFusion", "RandVolumeFusionGrid"]


def _data_device(*data: NdarrayOrTensor) -> torch.device:
    """The device of the first tensor among ``data`` (the host when all are numpy arrays)."""
    return next((x.device for x in data if isinstance(x, torch.Tensor)), torch.device("cpu"))


def _float32(data: NdarrayOrTensor, device: torch.device) -> torch.Tensor:
    """A plain float32 tensor on ``device`` (a view where no conversion is needed)."""
    if isinstance(data, torch.Tensor):
        data = data.detach().as_subclass(torch.Tensor)
    return torch.as_tensor(data, dtype=torch.float32, device=device)


def fuse_volumes(
    foreground: NdarrayOrTensor, background: NdarrayOrTensor, label: NdarrayOrTensor, num_levels: int
) -> NdarrayOrTensor:
    """Fuse two volumes with a label map: ``label / K * foreground + (1 - label / K) * background``.

    The checked form of :func:`misfm_transforms.engine.fuse`: float32, bit-identical to that expression
    evaluated in float32.

    Args:
        foreground: ``(C, X, Y, Z)`` or ``(N, C, X, Y, Z)`` array or tensor.
        background: same shape as ``foreground``.
        label: integer label map in ``0..num_levels``, broadcastable to ``foreground`` (channel dim 1 or C).
        num_levels: K, the number of non-zero fusion levels.

    Returns:
        float32 fused volume of ``foreground``'s shape: a ``torch.Tensor`` (on the first tensor input's device) if
        any input is a tensor, else a numpy array.

    Raises:
        ValueError: shapes differ or do not broadcast, label outside ``0..K``, non-finite input values.
        TypeError: a non-integer label.
    """
    k = check_num_levels(num_levels)
    check_same_shape(foreground, background)
    shape = tuple(foreground.shape)
    if len(label.shape) != len(shape) or any(n not in (1, m) for n, m in zip(label.shape, shape)):
        raise ValueError(f"label of shape {tuple(label.shape)} does not broadcast to the image shape {shape}.")
    device = _data_device(foreground, background, label)
    index = torch.as_tensor(label.detach().as_subclass(torch.Tensor) if isinstance(label, torch.Tensor) else label,
                            device=device)
    if index.is_floating_point() or index.is_complex():
        raise TypeError(f"label must hold integer levels 0..{k}, got dtype {index.dtype}; cast it to an integer type.")
    low, high = (int(v) for v in torch.aminmax(index.to(torch.int64))) if index.numel() else (0, 0)
    if low < 0 or high > k:
        raise ValueError(f"label values must be in 0..{k} (num_levels), got range [{low}, {high}].")
    fused = fuse(_float32(foreground, device), _float32(background, device), index, k)
    # NaN/inf in either input reaches the output (0 * inf and 0 * nan are nan): one check covers both
    check_finite("foreground or background", fused, shape)
    if any(isinstance(x, torch.Tensor) for x in (foreground, background, label)):
        return fused
    return fused.numpy()


class _FusionBase(RandomizableTransform):
    """Shared ``__call__`` of the array Volume Fusion transforms: draw, paint the label map, fuse, keep the type."""

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, num_levels: int, prob: float) -> None:
        RandomizableTransform.__init__(self, prob)
        self.num_levels = check_num_levels(num_levels)

    def _uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniform draws in [0, 1) from ``self.R``, for the engine's samplers."""
        return torch.from_numpy(self.R.random_sample(shape))

    def randomize(self, spatial_shape: Sequence[int]) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _label(self, spatial_shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:  # pragma: no cover
        """The uint8 label ``(1, *spatial_shape)`` of the last draw, on ``device``."""
        raise NotImplementedError

    def __call__(
        self, background: NdarrayOrTensor, foreground: NdarrayOrTensor, randomize: bool = True
    ) -> tuple[NdarrayOrTensor, NdarrayOrTensor]:
        """Return ``(fused, label)``.

        Args:
            background: ``(C, X, Y, Z)`` volume (alpha = 0 regions).
            foreground: same shape (alpha = 1 regions).
            randomize: draw new random parameters first (``False`` replays the last draw).

        Returns:
            ``fused``: float32, ``label``: uint8 ``(1, X, Y, Z)`` in ``0..num_levels``; both of ``background``'s
            type and device, a MetaTensor keeps ``background``'s meta and affine.
        """
        spatial = check_spatial_3d("background", background.shape)
        check_same_shape(foreground, background)
        if randomize:
            self.randomize(spatial)
        device = _data_device(background, foreground)
        label = self._label(spatial, device)
        fused = fuse(_float32(foreground, device), _float32(background, device), label, self.num_levels)
        check_finite("foreground or background", fused, tuple(background.shape))
        if isinstance(background, np.ndarray):
            return fused.cpu().numpy(), label.cpu().numpy()
        return (convert_to_dst_type(fused, background, dtype=torch.float32)[0],
                convert_to_dst_type(label, background, dtype=torch.uint8)[0])


class RandVolumeFusion(_FusionBase):
    """VF-v1 (paper): fuse two volumes inside random boxes with random levels.

    The number of boxes is drawn from ``num_boxes`` (inclusive); each box has a full size drawn per axis in
    ``[box_size_min, box_size_max]`` (inclusive), a centre ``c`` drawn in ``[0, size - 1]``, spans
    ``[c - s // 2, c - s // 2 + s)`` clipped to the volume, and a level drawn in ``1..num_levels``; later boxes
    overwrite earlier ones. Sizes are per spatial axis in the array's axis order, ``(x, y, z)`` by default.

    After :meth:`randomize` the draw is exposed as ``box_sizes``, ``box_centers`` (``(M, 3)``), ``box_starts``,
    ``box_stops`` (clipped, ``(M, 3)``) and ``box_levels`` (``(M,)``).

    Example::

        fusion = RandVolumeFusion(num_levels=4).set_random_state(0)
        fused, label = fusion(background=img_a, foreground=img_b)   # (1, 128, 128, 64) (x, y, z) each
    """

    def __init__(
        self,
        num_levels: int = 4,
        num_boxes: Sequence[int] | int = (10, 40),
        box_size_min: Sequence[int] = (8, 8, 8),
        box_size_max: Sequence[int] = (80, 80, 40),
        prob: float = 1.0,
    ) -> None:
        """
        Args:
            num_levels: K; labels are ``0..K`` and level k fuses with ``alpha = k / K``.
            num_boxes: inclusive range of the number of boxes (or one int).
            box_size_min: per-axis minimum full box size (inclusive).
            box_size_max: per-axis maximum full box size (inclusive); the default is the paper's bound for an
                ``(x, y, z)`` volume (40 along the slice axis z).
            prob: probability to fuse; otherwise the label is all 0 and the output is the background.
        """
        super().__init__(num_levels, prob)
        self.num_boxes = check_range("num_boxes", num_boxes, minimum=0)
        self.box_size_min, self.box_size_max = check_sizes("box_size_min", box_size_min, "box_size_max", box_size_max)
        no_boxes = torch.zeros((1, 0, 3), dtype=torch.int64)
        no_count = torch.zeros(1, dtype=torch.int64)
        self._set_boxes(Boxes(no_boxes, no_boxes, no_boxes, no_boxes, no_boxes[..., 0], no_count))

    def _set_boxes(self, boxes: Boxes) -> None:
        self._boxes = boxes
        count = int(boxes.counts[0])
        self.box_sizes, self.box_centers, self.box_starts, self.box_stops, self.box_levels = (
            t[0, :count].numpy() for t in boxes[:5]
        )

    def randomize(self, spatial_shape: Sequence[int]) -> None:
        """Draw the boxes for a volume of spatial shape ``spatial_shape`` (3 ints)."""
        RandomizableTransform.randomize(self, None)
        count_range = self.num_boxes if self._do_transform else (0, 0)
        self._set_boxes(sample_boxes(self._uniform, 1, tuple(spatial_shape), count_range, self.box_size_min.tolist(),
                                     self.box_size_max.tolist(), self.num_levels))

    def _label(self, spatial_shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        return paint_boxes(self._boxes.to(device), spatial_shape)[0]


class RandVolumeFusionGrid(_FusionBase):
    """VF-v2 ("VolF"): fuse two volumes on a random regular block grid.

    One block size is drawn per volume (per axis, inclusive in ``[block_size_min, block_size_max]``), the grid
    offset per axis in ``[0, size % block]`` (inclusive); of the ``n = prod(size // block)`` blocks exactly
    ``int(n * foreground_ratio)`` are foreground, each with a level drawn in ``1..num_levels``; the others and
    the margins outside the grid are label 0. Sizes are in the array's axis order.

    After :meth:`randomize` the draw is exposed as ``block_size``, ``offset`` (``(3,)``) and ``block_labels``
    (the grid of levels, shape ``size // block_size``).

    Example::

        fusion = RandVolumeFusionGrid(num_levels=4, foreground_ratio=0.7).set_random_state(0)
        fused, label = fusion(background=patch_2, foreground=patch_1)
    """

    def __init__(
        self,
        num_levels: int = 4,
        foreground_ratio: float = 0.7,
        block_size_min: Sequence[int] = (8, 8, 8),
        block_size_max: Sequence[int] = (32, 32, 32),
        prob: float = 1.0,
    ) -> None:
        """
        Args:
            num_levels: K; labels are ``0..K`` and level k fuses with ``alpha = k / K``.
            foreground_ratio: fraction of grid blocks that are foreground, in [0, 1].
            block_size_min: per-axis minimum block size (inclusive).
            block_size_max: per-axis maximum block size (inclusive).
            prob: probability to fuse; otherwise the label is all 0 and the output is the background.
        """
        super().__init__(num_levels, prob)
        if not 0.0 <= float(foreground_ratio) <= 1.0:
            raise ValueError(f"foreground_ratio must be in [0, 1], got {foreground_ratio}.")
        self.foreground_ratio = float(foreground_ratio)
        self.block_size_min, self.block_size_max = check_sizes(
            "block_size_min", block_size_min, "block_size_max", block_size_max
        )
        self._set_grid(Grid(torch.as_tensor(self.block_size_min), torch.zeros(3, dtype=torch.int64),
                            torch.zeros((0, 0, 0), dtype=torch.uint8)))

    def _set_grid(self, grid: Grid) -> None:
        self._grid = grid
        self.block_size, self.offset, self.block_labels = (t.numpy() for t in grid)

    def randomize(self, spatial_shape: Sequence[int]) -> None:
        """Draw block size, offset and block levels for a volume of spatial shape ``spatial_shape``."""
        RandomizableTransform.randomize(self, None)
        shape = tuple(int(s) for s in spatial_shape)
        if (self.block_size_min > np.asarray(shape)).any():
            raise ValueError(f"volume of spatial shape {shape} is smaller than block_size_min "
                             f"{self.block_size_min.tolist()}.")
        ratio = self.foreground_ratio if self._do_transform else 0.0
        self._set_grid(sample_grid(self._uniform, shape, ratio, self.block_size_min.tolist(),
                                   self.block_size_max.tolist(), self.num_levels))

    def _label(self, spatial_shape: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        return paint_grid(self._grid, spatial_shape).to(device)
