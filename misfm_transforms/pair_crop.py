"""Two augmented random-scale crops of one volume, the input pair of VF-v2 (MIS-FM "VolF"), from MONAI pieces.

Per patch (independently), as pymic's ``Crop4VolumeFusion``: scale ``s ~ U(lo, hi)`` per axis, crop size
``min(int(out * s), in)`` at a random start (``SpatialCrop``), :func:`resize_linear` to ``spatial_size`` (the
corner-aligned grid of pymic's ``scipy.ndimage.zoom(order=1)``), a random flip per axis with p = 0.5 (``Flip``),
:func:`adaptive_contrast` (percentiles ``p0 ~ U(0.1, 2)``,
``p1 ~ U(98, 99.9)``) and :func:`gamma_correction` (``gamma ~ U(0.7, 1.5)``); then both patches are inverted
(``1 - x``) together with probability ``invert_prob``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import NdarrayOrTensor
from monai.transforms import Flip, Randomizable, SpatialCrop, Transform
from monai.utils import TransformBackends, convert_to_dst_type

from ._checks import check_finite, check_spatial_3d

__all__ = ["RandPairCropForVolumeFusion", "resize_linear", "adaptive_contrast", "gamma_correction"]


def _host_float32(image: NdarrayOrTensor) -> torch.Tensor:
    """A plain float32 CPU tensor (a view of ``image`` where no conversion is needed)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().as_subclass(torch.Tensor)
    return torch.as_tensor(image, dtype=torch.float32, device="cpu")


def resize_linear(image: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """Linear resize of a float32 ``(C, X, Y, Z)`` tensor to ``spatial_size``, on the corner-aligned grid
    (``align_corners=True``: output ``j`` reads input ``j * (n_in - 1) / (n_out - 1)``, the grid of
    ``scipy.ndimage.zoom(order=1)``); always a new tensor.

    The values of MONAI's ``Resize(mode="trilinear", align_corners=True)`` up to float32 rounding, computed as a
    bilinear resize of x, y with the z slices as channels, then a linear resize of z: that layout is channels-last,
    which torch's bilinear kernel vectorises, several times faster than its trilinear kernel (benchmarks/README.md).
    One deliberate difference to zoom's default ``mode="constant"`` (pymic's): zoom turns a last output slice into 0
    when its coordinate rounds just above ``n_in - 1``; here that slice takes the edge value.
    """
    channels, _, _, size_z = image.shape
    out_x, out_y, out_z = (int(s) for s in spatial_size)
    planes = F.interpolate(image.contiguous().permute(0, 3, 1, 2), size=(out_x, out_y), mode="bilinear",
                           align_corners=True)  # (C, Z, X', Y'), z innermost in memory
    rows = planes.permute(0, 2, 3, 1).reshape(1, channels * out_x * out_y, size_z)
    return F.interpolate(rows, size=out_z, mode="linear", align_corners=True).view(channels, out_x, out_y, out_z)


def _percentiles(values: np.ndarray, q_low: float, q_high: float) -> tuple[float, float]:
    """``np.percentile(values, q)`` for ``q = q_low`` and ``q_high`` (``q_low <= q_high``) of a flat float32 array,
    equal to numpy's linear method with a float ``q`` bit for bit.

    Two single-rank ``np.partition`` calls: numpy selects one rank with a SIMD quickselect but the several ranks
    that ``np.percentile`` asks for with a scalar introselect, several times slower (``benchmarks/README.md``).
    """
    n = values.size
    h_low, h_high = (n - 1) * (q_low / 100), (n - 1) * (q_high / 100)
    k_low, k_high = int(h_low), int(h_high)
    ordered = np.partition(values, k_low)
    if k_high > k_low:
        ordered[k_low + 1 :].partition(k_high - k_low - 1)  # rank k_high, in place

    def interpolate(k: int, t: float) -> float:
        # numpy's lerp in float32 (t is a weak Python float), the upper form from t = 0.5 on
        a, b = ordered[k], (ordered[k + 1 :].min() if k + 1 < n else ordered[k])
        return float(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)

    return interpolate(k_low, h_low - k_low), interpolate(k_high, h_high - k_high)


def adaptive_contrast(image: NdarrayOrTensor, p0: float, p1: float) -> NdarrayOrTensor:
    """Piecewise-linear contrast to [0, 1] from the ``p0`` and ``p1`` percentiles ``v0``, ``v1`` (pymic's
    ``adaptive_contrast_adjust``, on the host, not in place).

    ``x < v0 -> 0.1 (x - min) / (v0 - min)``; ``v0 <= x <= v1 -> 0.1 + 0.8 (x - v0) / (v1 - v0)``;
    ``x > v1 -> 0.9 + 0.1 (x - v1) / (max - v1)``, in float32, over all elements. Where ``v1 == v0`` the middle
    piece maps to 0.1 (pymic divides by zero). Percentiles as ``numpy.percentile``; requires
    ``0 <= p0 <= 50 <= p1 <= 100``.

    Returns:
        a new float32 array or tensor of ``image``'s type and shape.
    """
    if not 0.0 <= p0 <= 50.0 <= p1 <= 100.0:
        raise ValueError(f"adaptive_contrast needs 0 <= p0 <= 50 <= p1 <= 100, got p0={p0}, p1={p1}.")
    x = _host_float32(image)
    # a sum of clamped pieces: lower piece + 0.8 * middle ramp + upper ramp (each 0 outside its range)
    v0, v1 = _percentiles(x.reshape(-1).numpy(), p0, p1)
    vmin, vmax = (float(v) for v in torch.aminmax(x))
    out = x.clamp(max=v0).sub_(vmin).mul_(0.1 / (v0 - vmin)) if v0 > vmin else torch.full_like(x, 0.1)
    ramp = torch.empty_like(x)
    if v1 > v0:
        out.add_(torch.clamp(x, v0, v1, out=ramp).sub_(v0), alpha=0.8 / (v1 - v0))
    else:
        out.add_(x > v1, alpha=0.8)
    if vmax > v1:
        out.add_(torch.clamp(x, min=v1, out=ramp).sub_(v1), alpha=0.1 / (vmax - v1))
    return out.numpy() if isinstance(image, np.ndarray) else convert_to_dst_type(out, image)[0]


def gamma_correction(image: NdarrayOrTensor, gamma: float) -> NdarrayOrTensor:
    """``((x - min) / (max - min)) ** gamma * (max - min) + min`` in float32 on the host, not in place (pymic's
    ``gamma_correction`` with the exponent given; MONAI's ``AdjustContrast`` adds 1e-7 to ``max - min``).

    Constant arrays are returned unchanged (as a copy). ``gamma`` must be positive.

    Returns:
        a new float32 array or tensor of ``image``'s type and shape.
    """
    if not gamma > 0:
        raise ValueError(f"gamma must be positive, got {gamma}.")
    x = _host_float32(image)
    vmin, vmax = (float(v) for v in torch.aminmax(x))
    if vmin < vmax:
        # the power as exp(gamma * log(.)): torch's pow with a float exponent is several times slower on the CPU
        # (benchmarks/README.md); log(0) = -inf maps 0 to 0
        out = x.sub(vmin).div_(vmax - vmin).log_().mul_(gamma).exp_().mul_(vmax - vmin).add_(vmin)
    else:
        out = x.clone()
    return out.numpy() if isinstance(image, np.ndarray) else convert_to_dst_type(out, image)[0]


class RandPairCropForVolumeFusion(Randomizable, Transform):
    """Make the (foreground, background) pair of VF-v2 from one volume: two independent augmented crops.

    Input ``(C, X, Y, Z)`` (numpy, tensor or MetaTensor), on the CPU; output two float32 ``(C, *spatial_size)``
    patches of the input's type and device (a MetaTensor keeps the input's meta; its affine is not updated for
    the crop/zoom). ``spatial_size`` and ``scale_range`` follow the array's spatial axis order. The volume may be
    smaller than ``spatial_size`` (the crop is then the whole axis, upsampled).

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

    def _patch(self, image: torch.Tensor, i: int) -> torch.Tensor:
        """Patch ``i`` of the last draw from a plain float32 ``(C, X, Y, Z)`` tensor, as a new plain tensor."""
        start = self.crop_starts[i]
        crop = SpatialCrop(roi_start=start, roi_end=start + self.crop_sizes[i])(image).as_tensor()
        patch = resize_linear(crop, self.spatial_size)
        axes = np.flatnonzero(self.flips[i]).tolist()
        if axes:
            patch = Flip(spatial_axis=axes)(patch).as_tensor()  # (MONAI returns a MetaTensor)
        check_finite("the cropped input volume", patch, tuple(image.shape))
        if not self.intensity_augment:
            return patch
        patch = gamma_correction(adaptive_contrast(patch, *self.percentiles[i]), self.gammas[i])
        return patch.neg_().add_(1.0) if self.invert else patch

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
        data = _host_float32(img)
        patches = tuple(self._patch(data, i) for i in range(2))
        if isinstance(img, np.ndarray):
            return tuple(p.numpy() for p in patches)  # type: ignore[return-value]
        return tuple(convert_to_dst_type(p, img, dtype=torch.float32)[0] for p in patches)  # type: ignore
