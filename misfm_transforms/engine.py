"""The Volume Fusion engine, in torch: one sampler and one painter per label-map kind, and one fusion.

Label ``k`` in ``{0, .., K}`` means the fusion coefficient ``alpha = k / K``::

    fused = alpha * foreground + (1 - alpha) * background

* VF-v1 (the paper): :func:`sample_boxes` turns uniform draws into random boxes and :func:`paint_boxes` renders
  them, later boxes overwriting earlier ones. Both work on whole batches with fixed shapes and no host
  synchronisation, on any device, so ``volume_fusion_batch`` runs inside a GPU training step.
* VF-v2 ("VolF"): :func:`sample_grid` draws one block grid and :func:`paint_grid` renders it. The grid's shape
  depends on the drawn block size, so VF-v2 is drawn on the host (it runs in the data-loader transforms).
* :func:`fuse` applies a label map to a (foreground, background) pair.

Callers draw the uniforms: the array transforms from MONAI's ``self.R`` (numpy), ``volume_fusion_batch`` from a
``torch.Generator`` on the batch's device. Per-axis sizes and the tensors' spatial axes are in the arrays' own
order: ``(x, y, z)`` for MONAI-loaded volumes, ``(D, H, W)`` (slice axis first) in the original code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "Uniform", "Boxes", "Grid", "uniform_int", "sample_boxes", "paint_boxes", "sample_grid", "paint_grid", "fuse",
    "empty",
]

Uniform = Callable[[tuple[int, ...]], torch.Tensor]
"""``uniform(shape)``: a float tensor of that shape, independent uniform draws in [0, 1)."""

# The painter marks box m of a word by bit m of an int64; int64 -> float64 is exact below 2**53, so the float64
# exponent of a word is the index of its highest set bit, the last box covering the voxel.
_BOXES_PER_WORD = 53
_FLOAT64_EXPONENT_BIAS = 1023
_FLOAT64_MANTISSA_BITS = 52


def empty(shape: Sequence[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty`` for the engine's large outputs; on the CPU the memory comes from numpy, which advises
    transparent huge pages for blocks of 4 MiB and more: glibc maps each block of 32 MiB and more afresh, and
    touching it page by page costs more than the fusion itself (figures in ``benchmarks/README.md``)."""
    if torch.device(device).type == "cpu":
        return torch.from_numpy(np.empty(tuple(shape), dtype=torch.empty((), dtype=dtype).numpy().dtype))
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def uniform_int(u: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """int64 integers uniform in ``[low, high]`` (inclusive), one per uniform draw in ``u``."""
    # (the clamp guards u * span rounding up to span for u just below 1)
    return (u * (high - low + 1)).long().clamp_(max=high - low).add_(low)


class Boxes(NamedTuple):
    """VF-v1 boxes of ``N`` samples with room for ``M`` boxes each; box ``m`` of sample ``n`` is painted iff
    ``m < counts[n]``. int64 tensors: ``sizes`` (full sizes), ``centers``, ``starts`` and ``stops`` (both clipped
    to the volume) ``(N, M, 3)``, ``levels`` ``(N, M)`` in ``1..K``, ``counts`` ``(N,)``."""

    sizes: torch.Tensor
    centers: torch.Tensor
    starts: torch.Tensor
    stops: torch.Tensor
    levels: torch.Tensor
    counts: torch.Tensor

    def to(self, device: torch.device | str) -> Boxes:
        """The same boxes on ``device``."""
        return Boxes(*(t.to(device) for t in self))


def sample_boxes(
    uniform: Uniform,
    num_samples: int,
    spatial_shape: Sequence[int],
    num_boxes: tuple[int, int],
    box_size_min: Sequence[int],
    box_size_max: Sequence[int],
    num_levels: int,
) -> Boxes:
    """Draw the VF-v1 boxes of ``num_samples`` volumes of spatial shape ``spatial_shape`` (pymic's rules).

    Per sample a box count in ``num_boxes`` (inclusive); per box a full size per axis in ``[box_size_min,
    box_size_max]``, a centre ``c`` in ``[0, size - 1]`` and a level in ``1..num_levels``; the box spans
    ``[c - s // 2, c - s // 2 + s)`` clipped to the volume. All draws come from one ``uniform((N, 1 + 7 M))`` call,
    ``M = num_boxes[1]``, and stay on its device (arguments are validated by the callers).
    """
    count_low, count_high = num_boxes
    u = uniform((num_samples, 1 + 7 * count_high))
    per_box = u[:, 1:].reshape(num_samples, count_high, 7)  # 3 sizes, 3 centres, 1 level per box
    sizes = torch.stack([uniform_int(per_box[..., axis], low, high)
                         for axis, (low, high) in enumerate(zip(box_size_min, box_size_max))], dim=-1)
    centers = torch.stack([uniform_int(per_box[..., 3 + axis], 0, size - 1)
                           for axis, size in enumerate(spatial_shape)], dim=-1)
    first = centers - sizes // 2
    # per axis with Python bounds: a device tensor of the shape would need a host-to-device copy
    stops = torch.stack([(first[..., axis] + sizes[..., axis]).clamp_(max=size)
                         for axis, size in enumerate(spatial_shape)], dim=-1)
    return Boxes(sizes=sizes, centers=centers, starts=first.clamp(min=0), stops=stops,
                 levels=uniform_int(per_box[..., 6], 1, num_levels), counts=uniform_int(u[:, 0], count_low, count_high))


def paint_boxes(boxes: Boxes, spatial_shape: Sequence[int], scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Render ``boxes`` as a uint8 label ``(N, 1, *spatial_shape)``: the level of the last painted box covering a
    voxel, 0 where none does.

    Per axis, each coordinate gets an int64 word with bit ``m`` set where box ``m`` covers it; a voxel's word is
    the AND of its three coordinates' words, and its highest set bit (the float64 exponent of the word) indexes a
    table of the boxes' levels. Fixed shapes, no loop over boxes, no host synchronisation; boxes beyond 53 take
    one more word each 53.

    Args:
        boxes: from :func:`sample_boxes`, on the device to paint on.
        spatial_shape: the volume's 3 spatial sizes.
        scratch: optional int64 work buffer ``(N, *spatial_shape)`` on that device (overwritten); one is allocated
            when ``None``.
    """
    n, m = boxes.levels.shape
    device = boxes.levels.device
    if m == 0:
        return torch.zeros((n, 1, *spatial_shape), dtype=torch.uint8, device=device)
    label = empty((n, 1, *spatial_shape), torch.uint8, device)  # the first word's lookup writes every voxel
    words = empty((n, *spatial_shape), torch.int64, device) if scratch is None else scratch
    painted = torch.arange(m, device=device) < boxes.counts[:, None]
    for first in range(0, m, _BOXES_PER_WORD):
        chunk = slice(first, first + _BOXES_PER_WORD)
        width = min(m - first, _BOXES_PER_WORD)
        bits = painted[:, chunk].long() << torch.arange(width, device=device)  # (N, W)
        axis_words = []
        for axis, size in enumerate(spatial_shape):
            coord = torch.arange(size, device=device)
            covers = (boxes.starts[:, chunk, axis, None] <= coord) & (coord < boxes.stops[:, chunk, axis, None])
            axis_words.append((covers * bits[..., None]).sum(dim=1))  # distinct bits: the sum is their OR
        word_x, word_y, word_z = axis_words
        torch.bitwise_and((word_x[:, :, None] & word_y[:, None, :])[..., None], word_z[:, None, None, :], out=words)
        # int64 -> float64 in place (same element size): no second 8-byte-per-voxel buffer to allocate
        exponent = words.view(torch.float64).copy_(words).view(torch.int64)
        exponent.bitwise_right_shift_(_FLOAT64_MANTISSA_BITS)  # 0 where no box, else bias + highest bit
        table = torch.zeros((n, _FLOAT64_EXPONENT_BIAS + width), dtype=torch.uint8, device=device)
        table[:, _FLOAT64_EXPONENT_BIAS:] = boxes.levels[:, chunk]
        per_voxel_table = table[:, None, None, :].expand(*exponent.shape[:3], -1)
        if first == 0:
            torch.gather(per_voxel_table, 3, exponent, out=label[:, 0])
        else:
            chunk_label = torch.gather(per_voxel_table, 3, exponent)
            label[:, 0] = torch.where(chunk_label > 0, chunk_label, label[:, 0])
    return label


class Grid(NamedTuple):
    """A VF-v2 block grid (host int64 tensors): ``block_size`` and ``offset`` ``(3,)``, ``block_labels`` the grid
    of levels (uint8, shape ``spatial_shape // block_size``, 0 = background block)."""

    block_size: torch.Tensor
    offset: torch.Tensor
    block_labels: torch.Tensor


def sample_grid(
    uniform: Uniform,
    spatial_shape: Sequence[int],
    foreground_ratio: float,
    block_size_min: Sequence[int],
    block_size_max: Sequence[int],
    num_levels: int,
) -> Grid:
    """Draw a VF-v2 grid (pymic's ``VolumeFusion`` rules) for a volume of spatial shape ``spatial_shape``.

    One block size per axis in ``[block_size_min, block_size_max]``, the offset per axis in ``[0, size % block]``;
    of the ``n = prod(size // block)`` blocks exactly ``int(n * foreground_ratio)``, chosen at random, get a level
    in ``1..num_levels``, the others 0. ``uniform`` draws on the host; ``block_size_min`` must fit in the volume
    (validated by the caller).
    """
    u = uniform((6,))
    block = [int(uniform_int(u[axis], low, high))
             for axis, (low, high) in enumerate(zip(block_size_min, block_size_max))]
    offset = [int(uniform_int(u[3 + axis], 0, size % b)) for axis, (size, b) in enumerate(zip(spatial_shape, block))]
    grid_shape = [size // b for size, b in zip(spatial_shape, block)]
    n_blocks = grid_shape[0] * grid_shape[1] * grid_shape[2]
    order_keys, level_draws = uniform((2, n_blocks))
    is_foreground = torch.zeros(n_blocks, dtype=torch.bool)
    is_foreground[order_keys.argsort()[: int(n_blocks * foreground_ratio)]] = True  # a uniform random subset
    levels = uniform_int(level_draws, 1, num_levels) * is_foreground
    return Grid(torch.tensor(block), torch.tensor(offset), levels.to(torch.uint8).reshape(grid_shape))


def paint_grid(grid: Grid, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Render ``grid`` as a uint8 label ``(1, *spatial_shape)`` on the host; margins outside the grid are 0."""
    label = torch.zeros((1, *spatial_shape), dtype=torch.uint8)
    (gx, gy, gz), (bx, by, bz), (ox, oy, oz) = grid.block_labels.shape, grid.block_size.tolist(), grid.offset.tolist()
    region = label[0, ox : ox + gx * bx, oy : oy + gy * by, oz : oz + gz * bz]
    # splitting each axis of the region into (block index, voxel in block) is a view: one broadcast copy
    region.view(gx, bx, gy, by, gz, bz).copy_(grid.block_labels[:, None, :, None, :, None])
    return label


def fuse(
    foreground: torch.Tensor,
    background: torch.Tensor,
    label: torch.Tensor,
    num_levels: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``alpha * foreground + (1 - alpha) * background`` with ``alpha = label / K``, in float32.

    Evaluated as ``alpha = float32(label) / float32(K)``, ``1 - alpha``, two products and one sum, each rounded to
    float32: the defining expression evaluated in float32, bit for bit. No checks, no host synchronisation.

    Args:
        foreground: float32 tensor ``(C, X, Y, Z)`` or ``(N, C, X, Y, Z)``.
        background: float32 tensor of ``foreground``'s shape and device.
        label: integer tensor on that device, broadcastable to ``foreground`` (channel axis 1 or C).
        num_levels: K.
        out: optional float32 tensor of ``foreground``'s shape for the result.

    Returns:
        ``out``, or a new float32 tensor of ``foreground``'s shape.
    """
    fused = empty(foreground.shape, torch.float32, foreground.device) if out is None else out
    fused.copy_(label)  # exact integer -> float32, broadcast over the channels
    # K as a tensor on the device: CUDA turns division by a host scalar into a multiplication by its reciprocal,
    # which can differ in the last bit (K = 3); 1 as one too, for torch.sub's tensor first operand
    k, one = (torch.full((), value, dtype=torch.float32, device=fused.device) for value in (num_levels, 1.0))
    fused.div_(k)
    one_minus_alpha = torch.sub(one, fused, out=empty(fused.shape, torch.float32, fused.device))
    one_minus_alpha.mul_(background)
    return fused.mul_(foreground).add_(one_minus_alpha)
