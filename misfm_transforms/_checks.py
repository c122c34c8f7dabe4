"""Argument and input validation shared by the Volume Fusion transforms."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "check_num_levels",
    "check_range",
    "check_sizes",
    "check_spatial_3d",
    "check_same_shape",
    "check_finite",
]


def check_num_levels(num_levels: int) -> int:
    """Return ``num_levels`` as int; it must be an integer in [1, 255] (labels are stored as uint8)."""
    if isinstance(num_levels, bool) or not isinstance(num_levels, (int, np.integer)):
        raise TypeError(f"num_levels must be an int, got {type(num_levels).__name__}.")
    if not 1 <= int(num_levels) <= 255:
        raise ValueError(f"num_levels must be in [1, 255], got {num_levels}.")
    return int(num_levels)


def check_range(name: str, value: Sequence[int] | int, minimum: int = 0) -> tuple[int, int]:
    """Validate an inclusive integer range ``(low, high)`` with ``minimum <= low <= high``."""
    low, high = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if low > high:
        raise ValueError(f"{name}: min > max bounds ({low} > {high}).")
    if low < minimum:
        raise ValueError(f"{name}: bounds must be >= {minimum} (negative sizes are invalid), got ({low}, {high}).")
    return int(low), int(high)


def check_sizes(name_min: str, size_min: Sequence[int], name_max: str,
                size_max: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Validate per-axis inclusive size bounds (3 values each, ``1 <= min <= max``)."""
    lo = np.asarray(size_min, dtype=np.int64).reshape(-1)
    hi = np.asarray(size_max, dtype=np.int64).reshape(-1)
    if lo.size != 3 or hi.size != 3:
        raise ValueError(f"{name_min} and {name_max} need 3 values (one per spatial axis), "
                         f"got {lo.tolist()} and {hi.tolist()}.")
    if (lo < 1).any() or (hi < 1).any():
        raise ValueError(f"{name_min}/{name_max}: sizes must be positive (negative sizes are invalid), "
                         f"got {lo.tolist()}, {hi.tolist()}.")
    if (lo > hi).any():
        raise ValueError(f"{name_min} > {name_max} (min > max bounds): {lo.tolist()} > {hi.tolist()}.")
    return lo, hi


def check_spatial_3d(name: str, shape: Sequence[int]) -> tuple[int, int, int]:
    """Require a channel-first 3-D shape ``(C, X, Y, Z)``; return its spatial part."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise ValueError(f"{name} must be channel-first 3-D spatial, shape (C, X, Y, Z); got shape {shape}.")
    if min(shape) < 1:
        raise ValueError(f"{name} must not be empty; got shape {shape}.")
    return shape[1], shape[2], shape[3]


def check_same_shape(foreground: np.ndarray | torch.Tensor, background: np.ndarray | torch.Tensor) -> None:
    """Foreground and background must have identical shapes."""
    if tuple(foreground.shape) != tuple(background.shape):
        raise ValueError(
            f"foreground and background shapes differ: {tuple(foreground.shape)} vs {tuple(background.shape)}."
        )


def check_finite(name: str, data: np.ndarray | torch.Tensor, shape: Sequence[int]) -> None:
    """Raise ``ValueError`` if ``data`` holds NaN or infinity (``shape`` is quoted in the message).

    A sum (one fast reduction) screens the data; only a non-finite sum (NaN/inf, or an overflow) triggers the
    exact element-wise test.
    """
    is_tensor = isinstance(data, torch.Tensor)
    if not is_tensor and data.dtype in (np.float32, np.float64) and data.flags.c_contiguous and data.flags.writeable:
        data, is_tensor = torch.from_numpy(data), True  # a view: torch's sum is the faster reduction
    total = data.sum() if is_tensor else np.add.reduce(data, axis=None)
    if bool(torch.isfinite(total) if is_tensor else np.isfinite(total)):
        return
    finite = torch.isfinite(data).all() if is_tensor else np.isfinite(data).all()
    if not bool(finite):
        raise ValueError(f"non-finite values (NaN or inf) in {name} of shape {tuple(shape)}.")
