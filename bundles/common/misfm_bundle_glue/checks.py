"""Input validation run in a bundle's ``initialize`` step, before any dataset is built or output written."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["load_datalist", "check_datalist", "check_fusion_options"]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def load_datalist(path: str, key: str, base_dir: str | None = None) -> list[dict[str, Any]]:
    """The ``key`` list of a MONAI decathlon-style datalist JSON, paths joined to ``base_dir``.

    Raises ``ValueError`` naming the file when it is missing, is not JSON, or lacks ``key``.
    """
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
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"datalist file {path!r} is not valid JSON ({err}); fix the file.") from err
    if not isinstance(content, Mapping) or key not in content:
        raise ValueError(f"datalist file {path!r} has no {key!r} list; add one (a list of {{'image': ...}} dicts).")
    items = content[key]
    if not isinstance(items, list):
        raise ValueError(f"datalist file {path!r}: {key!r} must be a list, got {type(items).__name__}.")
    base = base_dir if base_dir is not None else os.path.dirname(os.path.abspath(path))
    out = []
    for item in items:
        item = {"image": item} if isinstance(item, str) else dict(item)
        for k, v in item.items():
            if isinstance(v, str) and k in ("image", "label"):
                item[k] = os.path.normpath(os.path.join(base, v))
        out.append(item)
    return out


def _read_header(path: str) -> tuple[int, ...]:
    """Spatial shape from the image header only (nibabel for NIfTI, ITK for the rest)."""
    if path.lower().endswith(_NIFTI_SUFFIXES):
        import nibabel as nib

        return tuple(int(s) for s in nib.load(path).shape)
    import itk

    reader = itk.ImageFileReader.New(FileName=path)
    reader.UpdateOutputInformation()
    region = reader.GetOutput().GetLargestPossibleRegion()
    return tuple(int(s) for s in region.GetSize())


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
) -> int:
    """Check a datalist before training/evaluation/inference starts; returns the number of entries.

    Fails with ``ValueError`` naming the entry and file, and saying what to do, when: the list is empty, an entry
    lacks a key, a file does not exist, an image header cannot be read, the label's shape differs from the
    image's, or (``check_label_values``) a label holds values outside ``0..num_classes-1`` or non-integers.
    """
    if datalist is None or len(datalist) == 0:
        raise ValueError(
            f"the {name!r} datalist is empty: add entries to the {name!r} list of the datalist JSON "
            "(or point --data_list_file_path / --dataset_dir at the right files)."
        )
    for idx, item in enumerate(datalist):
        for key in keys:
            if key not in item:
                raise ValueError(f"{name} entry {idx} has no {key!r} field: {dict(item)}; add it to the datalist.")
            path = item[key]
            if not isinstance(path, str) or not os.path.isfile(path):
                raise ValueError(
                    f"{name} entry {idx}: {key} file {path!r} does not exist; fix the path in the datalist "
                    "or --dataset_dir."
                )
            try:
                shape = _read_header(path)
            except Exception as err:  # any reader failure means the file is unusable
                raise ValueError(
                    f"{name} entry {idx}: cannot read {key} file {path!r} ({type(err).__name__}: {err}); "
                    "replace it with a valid NIfTI (or ITK-readable) image or remove it from the datalist."
                ) from err
            if len(shape) < 3:
                raise ValueError(f"{name} entry {idx}: {key} file {path!r} is not 3-D (shape {shape}).")
        if label_key and label_key in keys and check_label_values:
            path = item[label_key]
            try:
                arr = _read_array(path)
            except Exception as err:
                raise ValueError(
                    f"{name} entry {idx}: cannot read label file {path!r} ({type(err).__name__}: {err}); "
                    "replace or remove it."
                ) from err
            values = np.unique(arr)
            bad = values[(values != np.round(values)) | (values < 0)]
            if num_classes is not None:
                bad = np.union1d(bad, values[values > num_classes - 1])
            if bad.size:
                raise ValueError(
                    f"{name} entry {idx}: label file {path!r} holds values {bad[:10].tolist()} outside the bundle's "
                    f"classes 0..{(num_classes or 0) - 1}; remap the label to the bundle's label map "
                    "(see docs/README.md) or remove the entry."
                )
            image_key = next((k for k in keys if k != label_key), None)
            if image_key is not None:
                ishape, lshape = _read_header(item[image_key])[:3], tuple(arr.shape[:3])
                if ishape != lshape:
                    raise ValueError(
                        f"{name} entry {idx}: label {path!r} has shape {lshape} but image {item[image_key]!r} "
                        f"has {ishape}; they must be on the same voxel grid."
                    )
    return len(datalist)


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
