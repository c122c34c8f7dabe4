"""Two augmented random-scale crops of one volume, the input pair of VF-v2 (MIS-FM "VolF").

Per patch (independently): scale ``s ~ U(lo, hi)`` per axis, crop size ``min(int(out * s), in)``, random start,
linear resize to ``spatial_size`` (corner-aligned grid, the grid of ``scipy.ndimage.zoom(order=1)``), random flip
per axis (p = 0.5), adaptive contrast (percentiles ``p0 ~ U(0.1, 2)``, ``p1 ~ U(98, 99.9)``, piecewise linear to
[0, 1]) and gamma (min-max, ``gamma ~ U(0.7, 1.5)``); then both patches are inverted (``1 - x``) together with
probability ``invert_prob``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import NdarrayOrTensor
from monai.transforms import Randomizable, Transform
from monai.utils import TransformBackends, convert_to_dst_type

from ._checks import check_finite, check_spatial_3d

__all__ = ["RandPairCropForVolumeFusion", "resize_linear", "adaptive_contrast", "gamma_correction"]

# subsample stride used to pick tail thresholds for the exact percentile selection
_SUBSAMPLE = 64


def _axis_weights(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Corner-aligned linear interpolation along one axis: ``out[j] = lerp(in[i0], in[i1], w)``."""
    step = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    pos = torch.arange(n_out, dtype=torch.float64, device=device) * step
    i0 = pos.floor().long().clamp(0, max(n_in - 2, 0))
    weight = (pos - i0).to(torch.float32)
    return i0, (i0 + 1).clamp(max=n_in - 1), weight


def resize_linear(image: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """Resize a ``(C, X, Y, Z)`` float32 tensor to ``spatial_size`` with linear interpolation.

    The sampling grid is corner aligned (``align_corners=True``): output index ``j`` reads input coordinate
    ``j * (n_in - 1) / (n_out - 1)``, which is the grid of ``scipy.ndimage.zoom(..., order=1)`` (default
    ``grid_mode=False``). Results equal zoom's up to float32 rounding (zoom works in float64), with one
    deliberate difference: zoom's default ``mode="constant"`` (used by pymic) turns a last output slice into 0
    when its coordinate rounds just above ``n_in - 1``; here that slice takes the edge value.
    """
    out0, out1, out2 = (int(s) for s in spatial_size)
    if image.shape[1] != out0:  # first axis: gather two slabs and blend (cheap, reduces the volume early)
        i0, i1, w = _axis_weights(image.shape[1], out0, image.device)
        image = torch.lerp(image.index_select(1, i0), image.index_select(1, i1), w[:, None, None])
    if tuple(image.shape[2:]) != (out1, out2):
        image = F.interpolate(image, size=(out1, out2), mode="bilinear", align_corners=True)
    return image.contiguous()


def _order_stats(flat: np.ndarray, ranks: Sequence[int], low_tail: bool) -> tuple[list[float], np.ndarray | None]:
    """Exact order statistics at ``ranks`` (0-based, ascending) that lie in one tail of ``flat``.

    A threshold picked on a strided subsample selects the tail (all values ``<=`` or ``>=`` it); if the tail
    holds enough values the ranks are selected there (exact: every other value lies beyond the threshold),
    otherwise in the whole array. Returns the values and the tail's flat indices (``None``: the whole array).
    """
    n = flat.size
    need = (max(ranks) + 1) if low_tail else (n - min(ranks))
    sub = flat[::_SUBSAMPLE]
    m = sub.size
    r = min(m, int(need * m / n * 1.25) + 32)
    index = None
    if r < m:
        kth = r - 1 if low_tail else m - r
        threshold = np.partition(sub, kth)[kth]
        tail = np.flatnonzero(flat <= threshold if low_tail else flat >= threshold)
        if tail.size >= need:
            index = tail
    values = flat if index is None else flat[index]
    offset = n - values.size if not low_tail else 0
    part = np.partition(values, [k - offset for k in ranks])
    return [float(part[k - offset]) for k in ranks], index


def _lerp(a: float, b: float, t: float) -> np.float32:
    """numpy's percentile interpolation between neighbouring order statistics (float64, then float32)."""
    return np.float32(a + (b - a) * t if t < 0.5 else b - (b - a) * (1.0 - t))


def adaptive_contrast(image: np.ndarray, p0: float, p1: float) -> np.ndarray:
    """Piecewise-linear contrast of a float32 array to [0, 1] from its ``p0``/``p1`` percentiles ``v0``/``v1``.

    ``x < v0 -> 0.1 (x - min) / (v0 - min)``; ``v0 <= x <= v1 -> 0.1 + 0.8 (x - v0) / (v1 - v0)``;
    ``x > v1 -> 0.9 + 0.1 (x - v1) / (max - v1)``, computed in float32 (a new array is returned). Where
    ``v1 == v0`` the middle piece maps to 0.1 (the original divides by zero). Percentiles follow
    ``numpy.percentile`` (linear method) over all elements; requires ``p0 <= 50 <= p1``. Runs in O(n): the
    two tails are selected, never sorted.
    """
    flat = image.reshape(-1)
    n = flat.size
    h0, h1 = (n - 1) * (p0 / 100.0), (n - 1) * (p1 / 100.0)
    k0, k1 = int(np.floor(h0)), int(np.floor(h1))
    (lo_a, lo_b, vmin), lo_index = _order_stats(flat, [k0, min(k0 + 1, n - 1), 0], low_tail=True)
    (hi_a, hi_b, vmax), hi_index = _order_stats(flat, [k1, min(k1 + 1, n - 1), n - 1], low_tail=False)
    v0, v1 = _lerp(lo_a, lo_b, h0 - k0), _lerp(hi_a, hi_b, h1 - k1)
    vmin, vmax = np.float32(vmin), np.float32(vmax)
    out = np.subtract(flat, v0)
    out *= np.float32(0.8) / (v1 - v0) if v1 > v0 else np.float32(0.0)
    out += np.float32(0.1)
    lower = np.flatnonzero(flat < v0) if lo_index is None else lo_index[flat[lo_index] < v0]
    out[lower] = (flat[lower] - vmin) * (np.float32(0.1) / (v0 - vmin)) if lower.size else out[lower]
    upper = np.flatnonzero(flat > v1) if hi_index is None else hi_index[flat[hi_index] > v1]
    out[upper] = (flat[upper] - v1) * (np.float32(0.1) / (vmax - v1)) + np.float32(0.9) if upper.size else out[upper]
    return out.reshape(image.shape)


def gamma_correction(image: np.ndarray, gamma: float) -> np.ndarray:
    """In place on a float32 array: ``((x - min) / (max - min)) ** gamma * (max - min) + min``.

    Constant arrays are returned unchanged; when min and max are 0 and 1 (the usual case after
    :func:`adaptive_contrast`) the min-max steps are identities and are skipped.
    """
    vmin, vmax = image.min(), image.max()
    if vmin >= vmax:
        return image
    rescale = (float(vmin), float(vmax)) != (0.0, 1.0)
    if rescale:
        image -= vmin
        image /= vmax - vmin
    np.power(image, np.float32(gamma), out=image)
    if rescale:
        image *= vmax - vmin
        image += vmin
    return image


class RandPairCropForVolumeFusion(Randomizable, Transform):
    """Make the (foreground, background) pair of VF-v2 from one volume: two independent augmented crops.

    Input ``(C, X, Y, Z)`` (numpy, tensor or MetaTensor); output two float32 ``(C, *spatial_size)`` patches of
    the input's type (a MetaTensor keeps the input's meta; its affine is not updated for the crop/zoom).
    ``spatial_size`` and ``scale_range`` follow the array's spatial axis order. The volume may be smaller than
    ``spatial_size`` (the crop is then the whole axis, upsampled).

    After :meth:`randomize` the draw is exposed as ``crop_starts``, ``crop_sizes``, ``flips`` (``(2, 3)``),
    ``percentiles`` (``(2, 2)``: p0, p1), ``gammas`` (``(2,)``) and ``invert``.

    Example::

        crop = RandPairCropForVolumeFusion(spatial_size=(128, 128, 64)).set_random_state(0)
        patch_fg, patch_bg = crop(ct_volume)        # ct_volume: (1, 192, 192, 96)
        fused, label = RandVolumeFusionGrid()(background=patch_bg, foreground=patch_fg)
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        spatial_size: Sequence[int],
        scale_range: Sequence[float] | Sequence[Sequence[float]] = ((0.7, 1.5), (0.7, 1.5), (0.7, 1.5)),
        flip: bool = True,
        intensity_augment: bool = True,
        invert_prob: float = 0.25,
    ) -> None:
        """
        Args:
            spatial_size: output size per spatial axis (3 positive ints).
            scale_range: ``(lo, hi)`` for all axes or one ``(lo, hi)`` per axis; crop size is
                ``min(int(spatial_size * U(lo, hi)), input size)``.
            flip: random flip of each axis of each patch with probability 0.5.
            intensity_augment: adaptive contrast + gamma per patch and the joint inversion.
            invert_prob: probability of replacing both patches by ``1 - x``.
        """
        size = np.asarray(spatial_size, dtype=np.int64).reshape(-1)
        if size.size != 3 or (size < 1).any():
            raise ValueError(f"spatial_size must be 3 positive ints (no negative sizes), got {tuple(spatial_size)}.")
        scales = np.asarray(scale_range, dtype=np.float64)
        scales = np.broadcast_to(scales, (3, 2)).copy() if scales.shape in ((2,), (1, 2), (3, 2)) else None
        if scales is None:
            raise ValueError(f"scale_range must be (lo, hi) or 3 pairs (lo, hi), got {scale_range}.")
        if not np.isfinite(scales).all() or (scales <= 0).any():
            raise ValueError(f"scale_range bounds must be positive and finite, got {scales.tolist()}.")
        if (scales[:, 0] > scales[:, 1]).any():
            raise ValueError(f"scale_range: min > max bounds in {scales.tolist()}.")
        if not 0.0 <= float(invert_prob) <= 1.0:
            raise ValueError(f"invert_prob must be in [0, 1], got {invert_prob}.")
        self.spatial_size = size
        self.scale_range = scales
        self.flip = bool(flip)
        self.intensity_augment = bool(intensity_augment)
        self.invert_prob = float(invert_prob)
        self.crop_starts = np.zeros((2, 3), dtype=np.int64)
        self.crop_sizes = np.zeros((2, 3), dtype=np.int64)
        self.flips = np.zeros((2, 3), dtype=bool)
        self.percentiles = np.zeros((2, 2))
        self.gammas = np.ones(2)
        self.invert = False

    def randomize(self, spatial_shape: Sequence[int]) -> None:
        """Draw both crops and all augmentation parameters for an input of spatial shape ``spatial_shape``."""
        shape = np.asarray(spatial_shape, dtype=np.int64)
        scale = self.R.uniform(self.scale_range[:, 0], self.scale_range[:, 1], size=(2, 3))
        self.crop_sizes = np.clip((self.spatial_size * scale).astype(np.int64), 1, shape)
        self.crop_starts = self.R.randint(0, shape - self.crop_sizes + 1).astype(np.int64)
        self.flips = (self.R.random_sample((2, 3)) < 0.5) & self.flip
        self.percentiles = np.stack([self.R.uniform(0.1, 2.0, 2), self.R.uniform(98.0, 99.9, 2)], axis=1)
        self.gammas = self.R.uniform(0.7, 1.5, 2)
        self.invert = bool(self.R.random_sample() < self.invert_prob)

    def _patch(self, image: torch.Tensor, i: int) -> np.ndarray:
        (x0, y0, z0), (sx, sy, sz) = self.crop_starts[i], self.crop_sizes[i]
        patch = resize_linear(image[:, x0 : x0 + sx, y0 : y0 + sy, z0 : z0 + sz], self.spatial_size)
        dims = [d + 1 for d in range(3) if self.flips[i, d]]
        patch = (torch.flip(patch, dims) if dims else patch).numpy()
        check_finite("the cropped input volume", patch, image.shape)
        if self.intensity_augment:
            patch = gamma_correction(adaptive_contrast(patch, *self.percentiles[i]), self.gammas[i])
            if self.invert:
                np.subtract(np.float32(1.0), patch, out=patch)
        return patch

    def __call__(self, img: NdarrayOrTensor, randomize: bool = True) -> tuple[NdarrayOrTensor, NdarrayOrTensor]:
        """Return ``(patch_1, patch_2)`` = (foreground, background) for VF-v2, each ``(C, *spatial_size)``.

        Runs on the CPU (a data-loader transform); tensors on another device are copied and the patches
        are returned on that device.
        """
        check_spatial_3d("img", img.shape)
        if randomize:
            self.randomize(img.shape[1:])
        elif (self.crop_starts + self.crop_sizes > np.asarray(img.shape[1:])).any():
            raise ValueError(f"img of shape {tuple(img.shape)} is smaller than the crops of the last randomize().")
        data = torch.as_tensor(img, dtype=torch.float32, device="cpu").as_subclass(torch.Tensor)
        patches = tuple(self._patch(data, i) for i in range(2))
        if isinstance(img, np.ndarray):
            return patches
        return tuple(convert_to_dst_type(p, img, dtype=torch.float32)[0] for p in patches)  # type: ignore
