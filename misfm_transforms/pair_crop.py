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

# stride of the subsample that picks the tail thresholds of the exact percentile selection: a prime, so the
# subsample does not alias with power-of-two row lengths (a stride of 64 on 128-wide rows sampled only the
# corner-aligned, non-interpolated columns of an upsampled patch: biased tails, then a full-array fallback)
_SUBSAMPLE = 61

# measured per-output-voxel costs (one thread) of the two resize stages, used to order them: the bilinear
# resize of axes 0 and 1 with the last axis as channels (channels-last kernel, vectorised over z) and the
# linear resize of the last (contiguous) axis
_COST_BILINEAR, _COST_LERP = 0.4, 0.7


def _axis_weights(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Corner-aligned linear interpolation along one axis: ``out[j] = lerp(in[i0], in[i1], w)``."""
    step = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    pos = torch.arange(n_out, dtype=torch.float64, device=device) * step
    i0 = pos.floor().long().clamp(0, max(n_in - 2, 0))
    weight = (pos - i0).to(torch.float32)
    return i0, (i0 + 1).clamp(max=n_in - 1), weight


def _resize_first_two(image: torch.Tensor, out0: int, out1: int) -> torch.Tensor:
    """Linear resize of axes 1, 2 of a contiguous ``(C, X, Y, Z)`` tensor: the permuted view ``(C, Z, X, Y)`` is
    channels-last contiguous, so torch's bilinear kernel runs its channels-last path, vectorised over the
    ``Z`` "channels" (about 3x faster than the plain-layout kernel); its channels-last output permuted back is
    a contiguous ``(C, out0, out1, Z)`` tensor."""
    out = F.interpolate(image.permute(0, 3, 1, 2), size=(out0, out1), mode="bilinear", align_corners=True)
    return out.permute(0, 2, 3, 1)


def _resize_last(image: torch.Tensor, n_out: int) -> torch.Tensor:
    """Linear resize of the last axis of a contiguous ``(C, X, Y, Z)`` tensor (one ``linear`` interpolate)."""
    c, x, y, z = image.shape
    out = F.interpolate(image.reshape(1, c * x * y, z), size=n_out, mode="linear", align_corners=True)
    return out.view(c, x, y, n_out)


def _resize(image: torch.Tensor, spatial_size: Sequence[int], flip: Sequence[bool] = (False, False, False)) -> torch.Tensor:
    """:func:`resize_linear` of a CPU tensor, then flips of the flagged spatial axes; always a new tensor.

    Axes 0 and 1 are resized by one channels-last bilinear ``interpolate`` (the last axis as channels), the
    last axis by one ``linear`` ``interpolate``; the cheaper order (by the measured per-output-voxel costs) is
    chosen. The flips are one ``torch.flip`` of the result.
    """
    out0, out1, out2 = (int(s) for s in spatial_size)
    n0, n1, n2 = image.shape[1:]
    resize_01, resize_2 = (n0, n1) != (out0, out1), n2 != out2
    source = image
    image = image.contiguous()  # (a crop view is copied once: both kernels read a contiguous tensor faster)
    if resize_01 and resize_2:
        last_first = n0 * n1 * out2 * _COST_LERP + out0 * out1 * out2 * _COST_BILINEAR
        last_second = out0 * out1 * n2 * _COST_BILINEAR + out0 * out1 * out2 * _COST_LERP
        if last_first < last_second:
            image, resize_2 = _resize_last(image, out2), False
    if resize_01:
        image = _resize_first_two(image, out0, out1)
    if resize_2:
        image = _resize_last(image.contiguous(), out2)
    flips = [d + 1 for d in range(3) if flip[d]]
    if flips:
        return torch.flip(image, flips)
    if image.data_ptr() == source.data_ptr():
        return image.clone(memory_format=torch.contiguous_format)
    return image.contiguous()


def resize_linear(image: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """Resize a ``(C, X, Y, Z)`` float32 tensor to ``spatial_size`` with linear interpolation.

    The sampling grid is corner aligned (``align_corners=True``): output index ``j`` reads input coordinate
    ``j * (n_in - 1) / (n_out - 1)``, which is the grid of ``scipy.ndimage.zoom(..., order=1)`` (default
    ``grid_mode=False``). Results equal zoom's up to float32 rounding (zoom works in float64), with one
    deliberate difference: zoom's default ``mode="constant"`` (used by pymic) turns a last output slice into 0
    when its coordinate rounds just above ``n_in - 1``; here that slice takes the edge value. The result is
    always a new contiguous tensor (never a view of ``image``).
    """
    return _resize(image, spatial_size)


def _select(values: np.ndarray, ranks: Sequence[int], offset: int) -> list[float]:
    """Values of ``values`` at ascending ranks ``ranks - offset``: one single-pivot partition at the first
    rank; its neighbour above and the extremes come from min/max of the two sides (cheaper than a
    multi-pivot partition)."""
    ks = [k - offset for k in ranks]
    pivot, last = ks[0], values.size - 1
    part = np.partition(values, pivot)
    out = []
    for k in ks:
        if k == pivot:
            out.append(part[pivot])
        elif k == pivot + 1:
            out.append(part[pivot + 1 :].min())
        elif k == 0:
            out.append(part[: pivot + 1].min())
        elif k == last:
            out.append(part[pivot:].max())
        else:
            return [float(v) for v in np.partition(values, ks)[ks]]
    return [float(v) for v in out]


def _tail_order_stats(
    flat: np.ndarray, low_ranks: Sequence[int], high_ranks: Sequence[int]
) -> tuple[list[float], list[float], np.ndarray | None, np.ndarray | None]:
    """Exact order statistics of ``flat`` at ``low_ranks`` and ``high_ranks`` (0-based, ascending).

    Thresholds picked on a strided subsample select the two tails (all values ``<= t_lo`` and ``>= t_hi``)
    with one mask and one ``flatnonzero``; when each tail holds enough values the ranks are selected inside
    it (exact: every other value lies beyond the threshold). Otherwise the thresholds are widened once, then
    the whole array is used. Returns the low and high values and the flat indices of the two tails
    (``None``: the whole array was used). If ``flat`` holds NaN, the last high value (the maximum, when
    ``n - 1`` is among ``high_ranks``) is NaN: NaN is caught by the tail mask (it fails both comparisons with
    the thresholds) at no extra pass, and sorts last in the whole-array fallback.
    """
    n = flat.size
    need_lo, need_hi = max(low_ranks) + 1, n - min(high_ranks)
    sub = flat[::_SUBSAMPLE]
    m = sub.size
    for widen in (1, 4):
        r_lo = int(need_lo * m / n * 1.25 * widen) + 32 * widen
        r_hi = int(need_hi * m / n * 1.25 * widen) + 32 * widen
        if r_lo + r_hi >= m:
            break
        part = np.partition(sub, (r_lo - 1, m - r_hi))
        t_lo, t_hi = part[r_lo - 1], part[m - r_hi]
        # the complement of the open middle (t_lo, t_hi): NaN fails both comparisons and lands in ``values``
        mask = np.greater(flat, t_lo)
        mask &= np.less(flat, t_hi)
        np.logical_not(mask, out=mask)
        index = np.flatnonzero(mask)
        values = flat[index]
        if np.isnan(values).any():  # NaN: no order statistic is defined; report NaN (the caller raises)
            nan = [float("nan")] * len(low_ranks)
            return nan, [float("nan")] * len(high_ranks), None, None
        # (np.compress: numpy's boolean indexing is several times slower on these ~1e4..1e5 element arrays)
        in_lo, in_hi = np.less_equal(values, t_lo), np.greater_equal(values, t_hi)
        lo_values, hi_values = np.compress(in_lo, values), np.compress(in_hi, values)
        if lo_values.size >= need_lo and hi_values.size >= need_hi:
            low = _select(lo_values, low_ranks, 0)
            high = _select(hi_values, high_ranks, n - hi_values.size)
            return low, high, np.compress(in_lo, index), np.compress(in_hi, index)
    part = np.partition(flat, sorted(set(low_ranks) | set(high_ranks)))
    return [float(part[k]) for k in low_ranks], [float(part[k]) for k in high_ranks], None, None


def _lerp(a: float, b: float, t: float) -> np.float32:
    """numpy's percentile interpolation between neighbouring order statistics (float64, then float32)."""
    return np.float32(a + (b - a) * t if t < 0.5 else b - (b - a) * (1.0 - t))


def _contrast_inplace(flat: np.ndarray, p0: float, p1: float) -> np.ndarray:
    """:func:`adaptive_contrast` in place on a flat float32 array (bit-identical results)."""
    return _contrast_range_inplace(flat, p0, p1)[0]


def _piecewise(x: np.ndarray, v0: np.float32, v1: np.float32, vmin: np.float32, vmax: np.float32) -> np.ndarray:
    """The contrast map of a few values with the very float32 operations of :func:`_contrast_range_inplace`."""
    out = np.subtract(x, v0)
    out *= np.float32(0.8) / (v1 - v0) if v1 > v0 else np.float32(0.0)
    out += np.float32(0.1)
    with np.errstate(all="ignore"):
        for i, value in enumerate(x):
            if value < v0:
                out[i] = (value - vmin) * (np.float32(0.1) / (v0 - vmin))
            elif value > v1:
                out[i] = (value - v1) * (np.float32(0.1) / (vmax - v1)) + np.float32(0.9)
    return out


def _contrast_range_inplace(flat: np.ndarray, p0: float, p1: float) -> tuple[np.ndarray, np.float32, np.float32, bool]:
    """:func:`_contrast_inplace`, also returning the output's min and max and whether the input was finite.

    The map is monotone piece by piece and the pieces are ordered (lower < 0.1 <= middle <= 0.9 < upper up to
    rounding of the piece ends, which never reverses the extremes), so the output extremes are the images of
    the input extremes, computed from the exact order statistics 0 and n - 1 with the same float32 operations:
    no min/max pass. The input is finite iff both extremes are (NaN makes the maximum NaN, see
    :func:`_tail_order_stats`): no finite-check pass either.
    """
    n = flat.size
    h0, h1 = (n - 1) * (p0 / 100.0), (n - 1) * (p1 / 100.0)
    k0, k1 = int(np.floor(h0)), int(np.floor(h1))
    (lo_a, lo_b, vmin), (hi_a, hi_b, vmax), lo_index, hi_index = _tail_order_stats(
        flat, [k0, min(k0 + 1, n - 1), 0], [k1, min(k1 + 1, n - 1), n - 1]
    )
    v0, v1 = _lerp(lo_a, lo_b, h0 - k0), _lerp(hi_a, hi_b, h1 - k1)
    vmin, vmax = np.float32(vmin), np.float32(vmax)
    if lo_index is None:
        lower, upper = np.flatnonzero(flat < v0), np.flatnonzero(flat > v1)
        lower_values, upper_values = flat[lower], flat[upper]
    else:  # the pieces' voxels lie in the selected tails (v0 <= t_lo, v1 >= t_hi)
        lo_values, hi_values = flat[lo_index], flat[hi_index]
        in_lower, in_upper = np.less(lo_values, v0), np.greater(hi_values, v1)
        lower, lower_values = np.compress(in_lower, lo_index), np.compress(in_lower, lo_values)
        upper, upper_values = np.compress(in_upper, hi_index), np.compress(in_upper, hi_values)
    # (the piece values are gathered above, before the middle piece overwrites the array)
    flat -= v0
    flat *= np.float32(0.8) / (v1 - v0) if v1 > v0 else np.float32(0.0)
    flat += np.float32(0.1)
    if lower.size:
        lower_values -= vmin
        lower_values *= np.float32(0.1) / (v0 - vmin)
        flat[lower] = lower_values
    if upper.size:
        upper_values -= v1
        upper_values *= np.float32(0.1) / (vmax - v1)
        upper_values += np.float32(0.9)
        flat[upper] = upper_values
    if not (np.isfinite(vmin) and np.isfinite(vmax)):
        return flat, np.float32(np.nan), np.float32(np.nan), False
    out_min, out_max = _piecewise(np.array([vmin, vmax], dtype=np.float32), v0, v1, vmin, vmax)
    return flat, out_min, out_max, True


def adaptive_contrast(image: np.ndarray, p0: float, p1: float) -> np.ndarray:
    """Piecewise-linear contrast of a float32 array to [0, 1] from its ``p0``/``p1`` percentiles ``v0``/``v1``.

    ``x < v0 -> 0.1 (x - min) / (v0 - min)``; ``v0 <= x <= v1 -> 0.1 + 0.8 (x - v0) / (v1 - v0)``;
    ``x > v1 -> 0.9 + 0.1 (x - v1) / (max - v1)``, computed in float32 (a new array is returned). Where
    ``v1 == v0`` the middle piece maps to 0.1 (the original divides by zero). Percentiles follow
    ``numpy.percentile`` (linear method) over all elements; requires ``p0 <= 50 <= p1``. Runs in O(n): the
    two tails are selected, never sorted.
    """
    out = np.array(image, dtype=np.float32, copy=True)
    return _contrast_inplace(out.reshape(-1), p0, p1).reshape(image.shape)


def _power_inplace(image: np.ndarray, gamma: float) -> None:
    """``image **= gamma`` for ``image`` in [0, 1] as ``exp2(gamma * log2(image))``: three vectorised passes,
    about twice as fast as ``np.power`` on float32, within 1e-7 (absolute) of it on [0, 1]; 0 stays 0."""
    with np.errstate(divide="ignore"):
        np.log2(image, out=image)
    image *= np.float32(gamma)
    np.exp2(image, out=image)


def gamma_correction(image: np.ndarray, gamma: float, fast_power: bool = False) -> np.ndarray:
    """In place on a float32 array: ``((x - min) / (max - min)) ** gamma * (max - min) + min``.

    Constant arrays are returned unchanged; when min and max are 0 and 1 (the usual case after
    :func:`adaptive_contrast`) the min-max steps are identities and are skipped. ``fast_power`` computes the
    power as ``exp2(gamma * log2(.))`` (within 1e-7 absolute of ``np.power`` on the normalised [0, 1] data).
    """
    return _gamma_inplace(image, gamma, image.min(), image.max(), fast_power)


def _gamma_inplace(image: np.ndarray, gamma: float, vmin: np.float32, vmax: np.float32, fast_power: bool) -> np.ndarray:
    """:func:`gamma_correction` with the array's min and max given (no reduction passes)."""
    if vmin >= vmax:
        return image
    rescale = (float(vmin), float(vmax)) != (0.0, 1.0)
    if rescale:
        image -= vmin
        image /= vmax - vmin
    if fast_power:
        _power_inplace(image, gamma)
    else:
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
        crop = image[:, x0 : x0 + sx, y0 : y0 + sy, z0 : z0 + sz]
        patch = _resize(crop, self.spatial_size, self.flips[i])  # a new tensor: safe to modify in place
        if not self.intensity_augment:
            check_finite("the cropped input volume", patch, image.shape)
            return patch.numpy()
        patch = patch.numpy()
        # contrast, gamma and inversion in place: one piecewise map, one power. The contrast's exact order
        # statistics give the output range (no min/max passes) and the finite check (no sum pass).
        flat, out_min, out_max, finite = _contrast_range_inplace(patch.reshape(-1), *self.percentiles[i])
        if not finite:
            shape = tuple(image.shape)
            raise ValueError(f"non-finite values (NaN or inf) in the cropped input volume of shape {shape}.")
        _gamma_inplace(flat, self.gammas[i], out_min, out_max, fast_power=True)
        if self.invert:
            np.subtract(np.float32(1.0), flat, out=flat)
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
