"""Volume Fusion (MIS-FM, Wang et al. 2023): fusion core and the two label-map samplers.

Label ``k`` in ``{0, .., K}`` means the fusion coefficient ``alpha = k / K``::

    fused = alpha * foreground + (1 - alpha) * background

* :class:`RandVolumeFusion` is VF-v1 (the paper): random boxes, sequentially pasted, later boxes overwrite.
* :class:`RandVolumeFusionGrid` is VF-v2 ("VolF"): one random block grid per volume, a fixed ratio of blocks
  are foreground.

Arrays are channel-first ``(C, X, Y, Z)``. Every per-axis size is given in the array's own spatial axis order:
the original code works on ``(D, H, W)`` (slice axis first) while MONAI-loaded volumes are ``(x, y, z)``, so
the paper's box size bounds ``(40, 80, 80)`` (D, H, W) become ``(80, 80, 40)`` for an ``(x, y, z)`` volume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.transforms import RandomizableTransform
from monai.utils import TransformBackends, convert_to_dst_type

from ._checks import check_finite, check_num_levels, check_range, check_same_shape, check_sizes, check_spatial_3d

__all__ = ["fuse_volumes", "RandVolumeFusion", "RandVolumeFusionGrid"]


def fuse_volumes(
    foreground: NdarrayOrTensor, background: NdarrayOrTensor, label: NdarrayOrTensor, num_levels: int
) -> NdarrayOrTensor:
    """Fuse two volumes with a label map: ``label / K * foreground + (1 - label / K) * background``.

    Computed in float32 exactly in that order (``alpha = float32(label) / float32(K)``, ``1 - alpha``, two
    products, one sum), so the result equals that expression evaluated in float32 bit for bit.

    Args:
        foreground: ``(C, X, Y, Z)`` or ``(N, C, X, Y, Z)`` array or tensor.
        background: same shape as ``foreground``.
        label: integer label map in ``0..num_levels``, broadcastable to ``foreground`` (channel dim 1 or C).
        num_levels: K, the number of non-zero fusion levels.

    Returns:
        float32 fused volume of ``foreground``'s shape: a ``torch.Tensor`` (on ``foreground``'s device) if any
        input is a tensor, else a numpy array.

    Raises:
        ValueError: shapes differ or do not broadcast, label outside ``0..K``, non-finite input values.
    """
    k = check_num_levels(num_levels)
    check_same_shape(foreground, background)
    shape = tuple(foreground.shape)
    if len(label.shape) != len(shape) or any(n not in (1, m) for n, m in zip(label.shape, shape)):
        raise ValueError(f"label of shape {tuple(label.shape)} does not broadcast to the image shape {shape}.")
    if any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in (foreground, background, label)):
        device = foreground.device if isinstance(foreground, torch.Tensor) else background.device
        fg = torch.as_tensor(foreground, dtype=torch.float32, device=device)
        bg = torch.as_tensor(background, dtype=torch.float32, device=device)
        index = torch.as_tensor(label, device=device).long()
        lo, hi = torch.aminmax(index) if index.numel() else (0, 0)
        _check_label_range(lo, hi, k)
        lut = torch.arange(k + 1, dtype=torch.float32, device=device) / float(k)
        fused = lut[index] * fg
        fused += (1 - lut)[index] * bg
    else:  # numpy on the host (CPU tensors are viewed, not copied)
        fg, bg, index = (_host_array(x) for x in (foreground, background, label))
        fg, bg = fg.astype(np.float32, copy=False), bg.astype(np.float32, copy=False)
        lo, hi = (index.min(), index.max()) if index.size else (0, 0)
        _check_label_range(lo, hi, k)
        if index.dtype.kind in "biu":
            fused = _fuse_host(fg, bg, index, k)
        else:  # non-integer labels: the lookup (np.take rejects non-integer indices, as before)
            lut = np.arange(k + 1, dtype=np.float32) / np.float32(k)
            fused = np.take(lut, index) * fg
            fused += np.take(1 - lut, index) * bg
    # any NaN/inf in either input reaches the output (0 * inf and 0 * nan are nan): one check covers both
    check_finite("foreground or background", fused, shape)
    if isinstance(fused, np.ndarray) and any(isinstance(x, torch.Tensor) for x in (foreground, background, label)):
        return torch.from_numpy(fused)
    return fused


def _fuse_host(fg: np.ndarray, bg: np.ndarray, label: np.ndarray, k: int) -> np.ndarray:
    """``label / K * fg + (1 - label / K) * bg`` in float32 for host arrays, no checks, five vectorised passes.

    ``alpha = float32(label) / float32(K)`` (an exact cast, then the same IEEE division as the lookup table
    ``arange(K + 1) / K``), ``beta = 1 - alpha``, ``fused = alpha * fg``, ``beta *= bg``, ``fused += beta``:
    bit-identical to the defining expression evaluated in float32. ``label`` may broadcast over the channels.
    """
    if label.shape == fg.shape:  # alpha is computed in the output buffer: one temporary (beta) instead of two
        fused = np.empty(fg.shape, dtype=np.float32)
        np.copyto(fused, label, casting="unsafe")
        fused /= np.float32(k)
        beta = np.subtract(np.float32(1.0), fused)
        fused *= fg
    else:
        alpha = np.empty(label.shape, dtype=np.float32)
        np.copyto(alpha, label, casting="unsafe")
        alpha /= np.float32(k)
        beta = np.subtract(np.float32(1.0), alpha)
        fused = np.multiply(alpha, fg)
    if beta.shape == bg.shape:
        beta *= bg
    else:
        beta = beta * bg
    fused += beta
    return fused


def _check_label_range(lo: NdarrayOrTensor | int, hi: NdarrayOrTensor | int, k: int) -> None:
    if int(lo) < 0 or int(hi) > k:
        raise ValueError(f"label values must be in 0..{k} (num_levels), got range [{int(lo)}, {int(hi)}].")


def _host_array(data: NdarrayOrTensor) -> np.ndarray:
    return data.detach().as_subclass(torch.Tensor).numpy() if isinstance(data, torch.Tensor) else np.asarray(data)


class _FusionBase(RandomizableTransform):
    """Shared ``__call__`` of the array Volume Fusion transforms: sample a label map, fuse, keep the type."""

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, num_levels: int, prob: float) -> None:
        RandomizableTransform.__init__(self, prob)
        self.num_levels = check_num_levels(num_levels)

    def randomize(self, spatial_shape: Sequence[int]) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _render(self, spatial_shape: tuple[int, int, int]) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def _fuse_host(self, foreground: np.ndarray, background: np.ndarray, label: np.ndarray) -> np.ndarray:
        """Fused float32 host array for the label map just rendered (no checks)."""
        return _fuse_host(foreground, background, label, self.num_levels)

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
        label = self._render(spatial)
        on_host = all(not isinstance(x, torch.Tensor) or x.device.type == "cpu" for x in (background, foreground))
        if on_host:  # the label is valid by construction: fuse directly, no range check
            bg_np = _host_array(background).astype(np.float32, copy=False)
            fg_np = _host_array(foreground).astype(np.float32, copy=False)
            fused = self._fuse_host(fg_np, bg_np, label)
            check_finite("foreground or background", fused, bg_np.shape)
            if isinstance(background, np.ndarray):
                return fused, label
            fused = torch.from_numpy(fused)
        else:
            device = background.device if isinstance(background, torch.Tensor) else foreground.device
            fused = fuse_volumes(foreground, background, torch.as_tensor(label, device=device), self.num_levels)
        fused_out = convert_to_dst_type(fused, background, dtype=torch.float32)[0]
        label_out = convert_to_dst_type(label, background, dtype=torch.uint8)[0]
        if isinstance(background, np.ndarray):
            fused_out, label_out = np.asarray(fused_out, np.float32), np.asarray(label_out, np.uint8)
        return fused_out, label_out


class RandVolumeFusion(_FusionBase):
    """VF-v1 (paper): fuse two volumes inside random boxes with random levels.

    The number of boxes is drawn from ``num_boxes`` (inclusive); each box has a full size drawn per axis in
    ``[box_size_min, box_size_max]`` (inclusive), a centre ``c`` drawn in ``[0, size - 1]``, spans
    ``[c - s // 2, c - s // 2 + s)`` clipped to the volume, and a level drawn in ``1..num_levels``; later boxes
    overwrite earlier ones. Sizes are per spatial axis in the array's axis order (see module docstring).

    After :meth:`randomize` the draw is exposed as ``box_sizes``, ``box_centers`` (``(M, 3)``), ``box_starts``,
    ``box_stops`` (clipped, ``(M, 3)``) and ``box_levels`` (``(M,)``).

    Example::

        fusion = RandVolumeFusion(num_levels=4, box_size_max=(80, 80, 40)).set_random_state(0)
        fused, label = fusion(background=img_a, foreground=img_b)   # (1, 128, 128, 64) each
    """

    def __init__(
        self,
        num_levels: int = 4,
        num_boxes: Sequence[int] | int = (10, 40),
        box_size_min: Sequence[int] = (8, 8, 8),
        box_size_max: Sequence[int] = (40, 80, 80),
        prob: float = 1.0,
    ) -> None:
        """
        Args:
            num_levels: K; labels are ``0..K`` and level k fuses with ``alpha = k / K``.
            num_boxes: inclusive range of the number of boxes (or one int).
            box_size_min: per-axis minimum full box size (inclusive).
            box_size_max: per-axis maximum full box size (inclusive).
            prob: probability to fuse; otherwise the label is all 0 and the output is the background.
        """
        super().__init__(num_levels, prob)
        self.num_boxes = check_range("num_boxes", num_boxes, minimum=0)
        self.box_size_min, self.box_size_max = check_sizes("box_size_min", box_size_min, "box_size_max", box_size_max)
        empty = np.zeros((0, 3), dtype=np.int64)
        self.box_sizes, self.box_centers, self.box_starts, self.box_stops = empty, empty, empty, empty
        self.box_levels = np.zeros(0, dtype=np.int64)

    def randomize(self, spatial_shape: Sequence[int]) -> None:
        """Draw the boxes for a volume of spatial shape ``spatial_shape`` (3 ints)."""
        RandomizableTransform.randomize(self, None)
        shape = np.asarray(spatial_shape, dtype=np.int64)
        count = self.R.randint(self.num_boxes[0], self.num_boxes[1] + 1) if self._do_transform else 0
        self.box_sizes = self.R.randint(self.box_size_min, self.box_size_max + 1, size=(count, 3)).astype(np.int64)
        self.box_centers = self.R.randint(0, shape, size=(count, 3)).astype(np.int64)
        self.box_levels = self.R.randint(1, self.num_levels + 1, size=count).astype(np.int64)
        starts = self.box_centers - self.box_sizes // 2
        self.box_stops = np.minimum(starts + self.box_sizes, shape)
        self.box_starts = np.maximum(starts, 0)

    def _render(self, spatial_shape: tuple[int, int, int]) -> np.ndarray:
        label = np.zeros((1, *spatial_shape), dtype=np.uint8)
        for (x0, y0, z0), (x1, y1, z1), level in zip(self.box_starts, self.box_stops, self.box_levels):
            label[0, x0:x1, y0:y1, z0:z1] = level
        return label


class RandVolumeFusionGrid(_FusionBase):
    """VF-v2 ("VolF"): fuse two volumes on a random regular block grid.

    One block size is drawn per volume (per axis, inclusive in ``[block_size_min, block_size_max]``), the grid
    offset per axis in ``[0, size % block]`` (inclusive); of the ``n = prod(size // block)`` blocks exactly
    ``int(n * foreground_ratio)`` are foreground, each with a level drawn in ``1..num_levels``; the others and
    the margins outside the grid are label 0. Sizes are in the array's axis order (see module docstring).

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
        self.block_size = self.block_size_min.copy()
        self.offset = np.zeros(3, dtype=np.int64)
        self.block_labels = np.zeros((0, 0, 0), dtype=np.uint8)

    def randomize(self, spatial_shape: Sequence[int]) -> None:
        """Draw block size, offset and block levels for a volume of spatial shape ``spatial_shape``."""
        RandomizableTransform.randomize(self, None)
        shape = np.asarray(spatial_shape, dtype=np.int64)
        if (self.block_size_min > shape).any():
            raise ValueError(
                f"volume of spatial shape {tuple(shape.tolist())} is smaller than block_size_min {self.block_size_min.tolist()}."
            )
        self.block_size = self.R.randint(self.block_size_min, self.block_size_max + 1).astype(np.int64)
        self.offset = self.R.randint(0, shape % self.block_size + 1).astype(np.int64)
        grid = shape // self.block_size
        n_blocks = int(np.prod(grid))
        n_fg = int(n_blocks * self.foreground_ratio) if self._do_transform else 0
        is_fg = np.zeros(n_blocks, dtype=bool)
        is_fg[self.R.permutation(n_blocks)[:n_fg]] = True
        levels = self.R.randint(1, self.num_levels + 1, size=n_blocks) * is_fg
        self.block_labels = levels.astype(np.uint8).reshape(tuple(grid))

    def _render(self, spatial_shape: tuple[int, int, int]) -> np.ndarray:
        label = np.zeros((1, *spatial_shape), dtype=np.uint8)
        (g0, g1, g2), (b0, b1, b2), (o0, o1, o2) = self.block_labels.shape, self.block_size, self.offset
        # repeat the small block array along the two last axes (g0 x g1*b1 x g2*b2 bytes), then broadcast it
        # over the first axis' blocks into a view of the grid region: no per-block loop, no full-size temporary
        rows = np.repeat(np.repeat(self.block_labels, b2, axis=2), b1, axis=1)
        region = label[0, o0 : o0 + g0 * b0, o1 : o1 + g1 * b1, o2 : o2 + g2 * b2]
        s0, s1, s2 = region.strides  # (an explicit view: a reshape could silently copy on old numpy versions)
        blocks = np.lib.stride_tricks.as_strided(region, (g0, b0, g1 * b1, g2 * b2), (b0 * s0, s0, s1, s2))
        blocks[...] = rows[:, None]
        return label
