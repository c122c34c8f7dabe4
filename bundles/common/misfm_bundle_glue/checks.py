"""Input validation run in a bundle's ``initialize`` step, before any dataset is built or output written."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["load_datalist", "check_datalist", "check_config", "check_fusion_options"]

logger = logging.getLogger("misfm.bundle")

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def load_datalist(path: str, key: str, base_dir: str | None = None, dedupe: bool | None = None) -> list[dict[str, Any]]:
    """The ``key`` list of a MONAI decathlon-style datalist JSON, paths joined to ``base_dir``.

    Raises ``ValueError`` naming the file when it is missing, is not JSON, or lacks ``key``. Exact duplicate
    entries (same files after path normalisation) are reported with a warning giving their count, and (``dedupe``,
    default: only for the ``training`` list) dropped: a training case listed twice would be sampled twice as often.
    Other lists keep them (a multi-process evaluation may list a case twice to give every process one).
    """
    dedupe = key == "training" if dedupe is None else dedupe
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(
            f"datalist file {path!r} does not exist. Write a decathlon-style JSON "
            '({"training": [{"image": ..., "label": ...}], "validation": [...], "testing": [...]}) there '
            "or pass --data_list_file_path <file>."
        )
    try:
        with open(path) as f:
            content = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"datalist file {path!r} is not valid JSON ({err}); fix the file.") from err
    if not isinstance(content, Mapping) or key not in content:
        raise ValueError(f"datalist file {path!r} has no {key!r} list; add one (a list of {{'image': ...}} dicts).")
    items = content[key]
    if not isinstance(items, list):
        raise ValueError(f"datalist file {path!r}: {key!r} must be a list, got {type(items).__name__}.")
    base = base_dir if base_dir is not None else os.path.dirname(os.path.abspath(path))
    out, seen, duplicates = [], set(), []
    for idx, item in enumerate(items):
        if not isinstance(item, (str, Mapping)):
            raise ValueError(
                f"datalist file {path!r}: {key!r} entry {idx} is a {type(item).__name__} ({item!r}); each entry must "
                "be a file name or a dict like {'image': ..., 'label': ...}."
            )
        item = {"image": item} if isinstance(item, str) else dict(item)
        for k, v in item.items():
            if isinstance(v, str) and k in ("image", "label"):
                item[k] = os.path.normpath(os.path.join(base, v))
        ident = json.dumps(item, sort_keys=True, default=str)
        if ident in seen:
            duplicates.append(idx)
            if dedupe:
                continue
        seen.add(ident)
        out.append(item)
    if duplicates and dedupe:
        logger.warning(
            "datalist file %s: %d duplicate %r entries removed (entries %s); each case is used once.",
            path, len(duplicates), key, duplicates[:10],
        )
    elif duplicates:
        logger.warning(
            "datalist file %s: %d duplicate %r entries (entries %s) kept; they count more than once in the metrics.",
            path, len(duplicates), key, duplicates[:10],
        )
    return out


def _header(path: str):
    """(spatial+channel shape, affine or None) from the image header only (nibabel for NIfTI, ITK otherwise)."""
    if path.lower().endswith(_NIFTI_SUFFIXES):
        import nibabel as nib

        img = nib.load(path)
        return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=float)
    import itk

    reader = itk.ImageFileReader.New(FileName=path)
    reader.UpdateOutputInformation()
    out = reader.GetOutput()
    size = tuple(int(s) for s in out.GetLargestPossibleRegion().GetSize())
    return size + ((int(out.GetNumberOfComponentsPerPixel()),) if out.GetNumberOfComponentsPerPixel() > 1 else ()), None


def _read_header(path: str) -> tuple[int, ...]:
    return _header(path)[0]


def _read_array(path: str) -> np.ndarray:
    if path.lower().endswith(_NIFTI_SUFFIXES):
        import nibabel as nib

        return np.asanyarray(nib.load(path).dataobj)
    import itk

    return np.asarray(itk.GetArrayViewFromImage(itk.imread(path)))


def check_datalist(
    datalist: Sequence[Mapping[str, Any]],
    keys: Sequence[str] = ("image", "label"),
    label_key: str | None = "label",
    num_classes: int | None = None,
    name: str = "training",
    check_label_values: bool = True,
    check_image_values: bool = True,
    intensity_range: Sequence[float] | None = None,
) -> int:
    """Check a datalist before training/evaluation/inference starts; returns the number of entries.

    Fails with ``ValueError`` naming the entry and file, and saying what to do, when: the list is empty, an entry
    lacks a key, a file does not exist or is a folder (e.g. a DICOM series), a header cannot be read, an image is not
    a single-channel 3-D volume (2-D, 4-D / multi-channel), the label's shape or affine differs from the image's,
    (``check_label_values``) a label holds values outside ``0..num_classes-1`` or non-integers, or
    (``check_image_values``) an image cannot be decoded completely (truncated / corrupt gzip) or holds NaN/Inf.

    Warns (and counts) without failing for: a constant image, and intensities that do not look like CT in HU
    (nothing below the lower quarter of ``intensity_range``: MR, or CT stored without rescale slope/intercept);
    such images are still clipped to ``intensity_range`` and trained on.
    """
    if datalist is None or len(datalist) == 0:
        raise ValueError(
            f"the {name!r} datalist is empty: add entries to the {name!r} list of the datalist JSON "
            "(or point --data_list_file_path / --dataset_dir at the right files)."
        )
    warnings: list[str] = []
    image_key = next((k for k in keys if k != label_key), None)
    for idx, item in enumerate(datalist):
        headers = {}
        for key in keys:
            if key not in item:
                raise ValueError(f"{name} entry {idx} has no {key!r} field: {dict(item)}; add it to the datalist.")
            path = item[key]
            if isinstance(path, str) and os.path.isdir(path):
                raise ValueError(
                    f"{name} entry {idx}: {key} {path!r} is a folder, not an image file (a DICOM series?); convert each "
                    "series to one NIfTI file (e.g. dcm2niix) and list the files: a folder may hold several series "
                    "and the reader would silently pick one."
                )
            if not isinstance(path, str) or not os.path.isfile(path):
                raise ValueError(
                    f"{name} entry {idx}: {key} file {path!r} does not exist; fix the path in the datalist "
                    "or --dataset_dir."
                )
            try:
                shape, affine = _header(path)
            except Exception as err:  # any reader failure means the file is unusable
                raise ValueError(
                    f"{name} entry {idx}: cannot read {key} file {path!r} ({type(err).__name__}: {err}); "
                    "replace it with a valid NIfTI (or ITK-readable) image or remove it from the datalist."
                ) from err
            if len(shape) < 3:
                raise ValueError(f"{name} entry {idx}: {key} file {path!r} is not 3-D (shape {shape}); the bundle "
                                 "needs 3-D volumes.")
            if int(np.prod(shape[3:], dtype=np.int64)) > 1:
                raise ValueError(
                    f"{name} entry {idx}: {key} file {path!r} has shape {shape}: 4-D / {int(np.prod(shape[3:]))} "
                    "channels, but the bundle expects ONE single-channel 3-D volume; split the channels or time points "
                    "into separate files."
                )
            headers[key] = (shape[:3], affine)
        if check_image_values and image_key is not None:
            warn = _check_image_values(item[image_key], f"{name} entry {idx}", intensity_range)
            if warn:
                warnings.append(warn)
        if label_key and label_key in keys:
            path = item[label_key]
            if image_key is not None:
                (ishape, iaff), (lshape, laff) = headers[image_key], headers[label_key]
                if ishape != lshape:
                    raise ValueError(
                        f"{name} entry {idx}: label {path!r} has shape {lshape} but image {item[image_key]!r} "
                        f"has {ishape}; they must be on the same voxel grid."
                    )
                if iaff is not None and laff is not None and not np.allclose(iaff, laff, atol=1e-3, rtol=1e-4):
                    raise ValueError(
                        f"{name} entry {idx}: label {path!r} and image {item[image_key]!r} have different affines "
                        f"(max difference {np.abs(iaff - laff).max():.4g}; origin/spacing/direction differ), so they "
                        "are not on the same voxel grid; resample the label onto the image or fix its header."
                    )
            if check_label_values:
                _check_label_values(path, f"{name} entry {idx}", num_classes)
    if warnings:
        logger.warning("%s datalist: %d of %d images have the warnings above (they are used anyway).", name,
                       len(warnings), len(datalist))
    return len(datalist)


def _check_image_values(path: str, where: str, intensity_range: Sequence[float] | None) -> str | None:
    try:
        arr = np.asarray(_read_array(path), dtype=np.float32)
    except Exception as err:  # truncated / corrupt compressed data shows up only when the voxels are decoded
        raise ValueError(
            f"{where}: cannot read the voxels of image file {path!r} ({type(err).__name__}: {err}); the file is "
            "truncated or corrupt: re-export or re-download it, or remove it from the datalist."
        ) from err
    finite = np.isfinite(arr)
    if not finite.all():
        n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
        raise ValueError(
            f"{where}: image file {path!r} holds {n_nan} NaN and {n_inf} Inf voxels; they would make the loss NaN. "
            "Replace them (e.g. by the background value) or remove the image."
        )
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        msg = f"{where}: image file {path!r} is constant (all voxels {lo:g}): it carries no information."
        logger.warning(msg)
        return msg
    if intensity_range is not None:
        a, b = float(intensity_range[0]), float(intensity_range[1])
        if lo > a + 0.25 * (b - a):
            msg = (f"{where}: image file {path!r} has intensities [{lo:g}, {hi:g}] with nothing below {a + 0.25 * (b - a):g}: "
                   f"not CT in Hounsfield units (air is about -1000)? MR, or CT saved without its rescale slope / "
                   f"intercept, is clipped to the HU window {[a, b]} and trained on as if it were CT.")
            logger.warning(msg)
            return msg
    return None


def _check_label_values(path: str, where: str, num_classes: int | None) -> None:
    try:
        arr = _read_array(path)
    except Exception as err:
        raise ValueError(
            f"{where}: cannot read label file {path!r} ({type(err).__name__}: {err}); replace or remove it."
        ) from err
    values = np.unique(arr)
    non_integer = values[~np.isfinite(values) | (values != np.round(values))] if values.dtype.kind == "f" else values[:0]
    if non_integer.size:
        raise ValueError(
            f"{where}: label file {path!r} holds non-integer values {non_integer[:10].tolist()} (a resampled or "
            "soft label?); labels must be integer class indices: resample with nearest-neighbour or round them."
        )
    bad = values[values < 0]
    if num_classes is not None:
        bad = np.union1d(bad, values[values > num_classes - 1])
    if bad.size:
        raise ValueError(
            f"{where}: label file {path!r} holds values {bad[:10].tolist()} outside the bundle's "
            f"classes 0..{(num_classes or 0) - 1}; remap the label to the bundle's label map "
            "(see docs/README.md) or remove the entry."
        )


def check_config(
    roi_size: Sequence[int],
    resolution_mode: int = 1,
    axis_order: str = "xyz",
    learning_rate: float = 1e-3,
    batch_size: int = 1,
    max_epochs: int = 1,
    epoch_length: int | None = None,
    val_interval: int = 1,
    checkpoint_interval: int = 0,
    num_workers: int = 0,
    cache_rate: float = 1.0,
    pixdim: Sequence[float] | None = None,
    intensity_range: Sequence[float] | None = None,
) -> None:
    """Reject bad numeric settings before anything is built; one ``ValueError`` listing every problem."""
    from misfm_nets.pctnet import RESOLUTION_MODE_SCALES

    problems = []
    roi = list(roi_size)
    if len(roi) != 3 or any(int(r) != r or r <= 0 for r in roi):
        problems.append(f"roi_size must be 3 positive integers, got {roi}")
    elif resolution_mode in range(len(RESOLUTION_MODE_SCALES)):
        div = [s * 4 for s in RESOLUTION_MODE_SCALES[resolution_mode]]
        div = div[::-1] if axis_order == "xyz" else div
        if any(int(r) % d for r, d in zip(roi, div)):
            good = [max(d, int(round(r / d)) * d) for r, d in zip(roi, div)]
            problems.append(f"roi_size {roi} must be divisible by PCT-Net's size_divisor {tuple(div)} "
                            f"(resolution_mode {resolution_mode}); e.g. {good}")
    checks = [
        ("learning_rate", learning_rate, lambda v: v > 0, "> 0"),
        ("batch_size", batch_size, lambda v: int(v) == v and v >= 1, "an integer >= 1"),
        ("max_epochs", max_epochs, lambda v: int(v) == v and v >= 1, "an integer >= 1"),
        ("val_interval", val_interval, lambda v: int(v) == v and v >= 1, "an integer >= 1"),
        ("checkpoint_interval", checkpoint_interval, lambda v: int(v) == v and v >= 0,
         "an integer >= 0 (0 = no training checkpoints)"),
        ("num_workers", num_workers, lambda v: int(v) == v and v >= 0, "an integer >= 0"),
        ("cache_rate", cache_rate, lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    ]
    if epoch_length is not None:
        checks.append(("epoch_length", epoch_length, lambda v: int(v) == v and v >= 1, "null or an integer >= 1"))
    for key, value, ok, want in checks:
        try:
            good = isinstance(value, (int, float)) and not isinstance(value, bool) and bool(ok(value))
        except (TypeError, ValueError):
            good = False
        if not good:
            problems.append(f"{key} must be {want}, got {value!r}")
    if pixdim is not None and (len(pixdim) != 3 or any(not p > 0 for p in pixdim)):
        problems.append(f"pixdim must be 3 spacings > 0 (mm), got {list(pixdim)}")
    if intensity_range is not None and (len(intensity_range) != 2 or not intensity_range[0] < intensity_range[1]):
        problems.append(f"intensity_range must be [min, max] with min < max, got {list(intensity_range)}")
    if problems:
        raise ValueError("bad config values: " + "; ".join(problems) + ". Fix them in the config or the command line.")


def check_fusion_options(fusion_version: str, fuse_on_device: bool, batch_size: int) -> None:
    """Reject inconsistent Volume Fusion settings of the pretraining bundle."""
    if fusion_version not in ("v1", "v2"):
        raise ValueError(f"fusion_version must be 'v1' (paper, random boxes) or 'v2' (VolF, block grid), got {fusion_version!r}.")
    if fuse_on_device and fusion_version != "v1":
        raise ValueError("fuse_on_device=true implements VF-v1 only; set fusion_version='v1' or fuse_on_device=false.")
    if fuse_on_device and int(batch_size) < 2:
        raise ValueError(
            "fuse_on_device=true fuses each sample with the previous one in the batch: set batch_size >= 2 "
            "(with batch_size 1 a volume would be fused with itself)."
        )
