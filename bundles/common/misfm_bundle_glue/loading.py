"""Loading with checks: MONAI's ``LoadImaged`` plus the validation of every loaded volume.

The checks run where the volume is loaded anyway (a cache-filling thread or a DataLoader worker), so a bundle's
start-up does not grow with the dataset, and every failure names the file and says what to do.
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import LoadImaged

from .checks import flag

__all__ = ["LoadCheckedImaged", "verify_gzip"]

logger = logging.getLogger("misfm.bundle")

_AFFINE_ATOL, _AFFINE_RTOL = 1e-3, 1e-4  # mm: float32 header rounding, not a different grid


def verify_gzip(path: str) -> None:
    """Decompress a ``.gz`` file to its end so that zlib checks the stored CRC32 and length.

    NIfTI readers stop reading at the last voxel and never reach the trailer, so a file whose deflate stream
    decodes but whose bytes changed (a bad disk, a broken copy) would otherwise be trained on.
    """
    with gzip.open(path, "rb") as stream:
        while stream.read(1 << 22):
            pass


class LoadCheckedImaged(LoadImaged):
    """``LoadImaged`` (MONAI's readers, ``image_only=True``) that checks what it loaded.

    Errors (``ValueError`` naming the file and the fix): a file no reader can read; an image that is not one
    single-channel 3-D volume; (``check_image_values``) a ``.gz`` file whose CRC does not match, NaN/Inf voxels;
    (``label_key`` given) a label on another voxel grid than its image (shape, or affine from any format's header),
    (``check_label_values``) non-integer label values or values outside ``0..num_classes-1``.

    Warnings, training goes on: a constant image, intensities that do not look like CT in HU (nothing below the
    lower quarter of ``intensity_range``), a label map without any foreground voxel.

    Each file's voxel checks run once per process (the verdict is remembered by path, size and modification time),
    so an uncached pipeline that reloads a volume for every sample pays for them once.

    Args:
        keys: the image key first, then the label key (if any).
        label_key: which of ``keys`` is the label (``None``: no label).
        num_classes: label values must be in ``0..num_classes-1``.
        check_image_values: CRC and NaN/Inf checks and the CT-range warning (needs a pass over the voxels).
        check_label_values: label value checks.
        intensity_range: the bundle's HU window, for the CT-range warning.
    """

    def __init__(
        self,
        keys: Sequence[str],
        label_key: str | None = "label",
        num_classes: int | None = None,
        check_image_values: Any = True,
        check_label_values: Any = True,
        intensity_range: Sequence[float] | None = None,
    ) -> None:
        super().__init__(keys, image_only=True)
        self.label_key = label_key
        self.num_classes = num_classes
        self.check_image_values = flag(check_image_values, "check_image_values")
        self.check_label_values = flag(check_label_values, "check_label_values")
        self.intensity_range = intensity_range
        self._checked: set[tuple[str, int, int]] = set()

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        paths = {key: data[key] for key in self.key_iterator(dict(data))}
        loaded: dict[Hashable, Any] = dict(data)
        for key, path in paths.items():
            if isinstance(path, (str, os.PathLike)):
                loaded[key] = self._load(key, os.fspath(path))
            else:  # already an array (e.g. a cached volume passed in memory)
                loaded[key] = path
        image_key = next((k for k in paths if k != self.label_key), None)
        for key, volume in ((k, loaded[k]) for k in paths):
            self._check_shape(key, paths[key], volume)
        if self.label_key in paths and image_key is not None:
            self._check_grid(paths[image_key], loaded[image_key], paths[self.label_key], loaded[self.label_key])
        for key, path in paths.items():
            stamp = _stamp(path)
            if stamp is None or stamp in self._checked:
                continue
            if key == self.label_key:
                if self.check_label_values:
                    self._check_label_values(path, loaded[key])
            elif self.check_image_values:
                self._check_image_values(path, loaded[key])
            self._checked.add(stamp)
        return loaded

    def _load(self, key: Hashable, path: str) -> Any:
        try:
            return self._loader(path)
        except Exception as err:  # every reader raises its own types
            raise ValueError(
                f"cannot read {key} file {path!r} ({type(err).__name__}: {err}); replace it with a valid NIfTI "
                "(or other ITK-readable) image, or remove it from the datalist."
            ) from err

    @staticmethod
    def _check_shape(key: Hashable, path: Any, volume: Any) -> None:
        shape = tuple(int(s) for s in volume.shape)
        if len(shape) < 3:
            raise ValueError(f"{key} file {path!r} is not 3-D (shape {shape}); the bundle needs 3-D volumes.")
        if len(shape) > 3:
            extra = int(np.prod(shape[3:]))
            raise ValueError(
                f"{key} file {path!r} has shape {shape}: 4-D / {extra} channels, but the bundle expects ONE "
                "single-channel 3-D volume; split the channels or time points into separate files."
            )

    @staticmethod
    def _check_grid(image_path: Any, image: Any, label_path: Any, label: Any) -> None:
        if tuple(image.shape) != tuple(label.shape):
            raise ValueError(
                f"label {label_path!r} has shape {tuple(label.shape)} but image {image_path!r} has "
                f"{tuple(image.shape)}; they must be on the same voxel grid."
            )
        a, b = np.asarray(image.affine, dtype=float), np.asarray(label.affine, dtype=float)
        if not np.allclose(a, b, atol=_AFFINE_ATOL, rtol=_AFFINE_RTOL):
            raise ValueError(
                f"label {label_path!r} and image {image_path!r} have different affines (max difference "
                f"{np.abs(a - b).max():.4g} mm; origin, spacing or direction differ), "
                "so they are not on the same voxel "
                "grid; resample the label onto the image or fix its header."
            )

    def _check_image_values(self, path: str, volume: Any) -> None:
        if path.lower().endswith(".gz"):
            try:
                verify_gzip(path)
            except (OSError, EOFError, ValueError) as err:
                raise ValueError(
                    f"image file {path!r} is corrupt ({type(err).__name__}: {err}): its data does not match the "
                    "checksum stored in the file. Re-export or re-download it, or remove it from the datalist."
                ) from err
        arr = torch.as_tensor(volume).as_subclass(torch.Tensor)
        finite = torch.isfinite(arr)
        if not bool(finite.all()):
            n_nan, n_inf = int(torch.isnan(arr).sum()), int(torch.isinf(arr).sum())
            raise ValueError(
                f"image file {path!r} holds {n_nan} NaN and {n_inf} Inf voxels; they would make the loss NaN. "
                "Replace them (e.g. by the background value) or remove the image."
            )
        lo, hi = (float(v) for v in torch.aminmax(arr.float()))
        if lo == hi:
            logger.warning("image file %s is constant (all voxels %g): it carries no information.", path, lo)
        elif self.intensity_range is not None:
            a, b = float(self.intensity_range[0]), float(self.intensity_range[1])
            if lo > a + 0.25 * (b - a):
                logger.warning(
                    "image file %s has intensities [%g, %g] with nothing below %g: not CT in Hounsfield units (air is "
                    "about -1000)? MR, or CT saved without its rescale slope / intercept, is clipped to the HU window "
                    "%s and trained on as if it were CT.", path, lo, hi, a + 0.25 * (b - a), [a, b])

    def _check_label_values(self, path: str, label: Any) -> None:
        values = torch.unique(torch.as_tensor(label).as_subclass(torch.Tensor)).cpu().numpy()
        if values.dtype.kind == "f":
            non_integer = values[~np.isfinite(values) | (values != np.round(values))]
            if non_integer.size:
                raise ValueError(
                    f"label file {path!r} holds non-integer values {non_integer[:10].tolist()} (a resampled or soft "
                    "label?); labels must be integer class indices: resample with nearest-neighbour or round them."
                )
        bad = values[values < 0]
        if self.num_classes is not None:
            bad = np.union1d(bad, values[values > self.num_classes - 1])
        if bad.size:
            raise ValueError(
                f"label file {path!r} holds values {[_number(v) for v in bad[:10]]} outside the bundle's classes "
                f"0..{(self.num_classes or 0) - 1}; remap the label to the bundle's label map (see docs/README.md) "
                "or remove the entry."
            )
        if not (values > 0).any():
            logger.warning("label file %s has no foreground voxel (all 0): the case only teaches background.", path)


def _number(value: Any) -> int | float:
    """A label value as users wrote it: 7, not 7.0 (MONAI's reader returns float32 arrays)."""
    return int(value) if float(value).is_integer() else float(value)


def _stamp(path: Any) -> tuple[str, int, int] | None:
    """(path, size, mtime in ns): a file changed in place is checked again."""
    try:
        st = os.stat(path)
    except (OSError, TypeError):
        return None
    return os.fspath(path), st.st_size, st.st_mtime_ns
