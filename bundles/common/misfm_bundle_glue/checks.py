"""Checks the bundles run before any dataset is built: settings, datalist structure, output folders, flags.

They are cheap (no image is read), so start-up does not grow with the dataset: the voxels are checked as each
volume is loaded (:class:`~misfm_bundle_glue.loading.LoadCheckedImaged`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "flag",
    "load_datalist",
    "check_datalist",
    "check_config",
    "check_fusion_options",
    "check_output_folders",
    "check_batches",
]

logger = logging.getLogger("misfm.bundle")

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def flag(value: Any, name: str) -> bool:
    """A config switch as a bool.

    ``python -m monai.bundle`` passes ``--amp false`` on as the *string* ``'false'``, which Python takes for True;
    here ``true/false/yes/no/on/off/1/0`` (any case), ``True``/``False`` and the ints 0/1 are accepted, anything
    else is an error naming the key.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be true or false (also accepted: 1/0, yes/no), got {value!r}.")


def load_datalist(path: str, key: str, base_dir: str | None = None, dedupe: bool | None = None) -> list[dict[str, Any]]:
    """The ``key`` list of a MONAI decathlon-style datalist JSON, paths joined to ``base_dir``.

    Raises ``ValueError`` naming the file when it is missing, is not JSON, or lacks ``key``. Exact duplicate
    entries (same files after path normalisation) are reported with a warning giving their count, and (``dedupe``,
    default: only for the ``training`` list) dropped: a training case listed twice would be sampled twice as often.
    Other lists keep them.
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
        with open(path, encoding="utf-8") as f:
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
    if duplicates:
        logger.warning(
            "datalist file %s: %d duplicate %r entries %s (entries %s)%s.", path, len(duplicates), key,
            "removed" if dedupe else "kept", duplicates[:10],
            "; each case is used once" if dedupe else "; they count more than once in the metrics",
        )
    return out


def check_datalist(datalist: Sequence[Mapping[str, Any]], name: str = "training",
                   keys: Sequence[str] = ("image", "label")) -> int:
    """Structure of a datalist, without reading any image; returns the number of entries.

    ``ValueError`` naming the entry and file, and what to do, when: the list is empty, an entry lacks one of
    ``keys``, a file does not exist or is a folder (e.g. a DICOM series). Costs one ``stat`` per file.
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
            if isinstance(path, str) and os.path.isdir(path):
                raise ValueError(
                    f"{name} entry {idx}: {key} {path!r} is a folder, not an image file "
                    "(a DICOM series?); convert each "
                    "series to one NIfTI file (e.g. dcm2niix) and list the files: a folder may hold several series "
                    "and the reader would silently pick one."
                )
            if not isinstance(path, str) or not os.path.isfile(path):
                raise ValueError(
                    f"{name} entry {idx}: {key} file {path!r} does not exist; fix the path in the datalist "
                    "or --dataset_dir."
                )
    return len(datalist)


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
    device: Any = None,
) -> None:
    """Reject bad settings before anything is built; one ``ValueError`` listing every problem."""
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
    if device is not None:
        problem = _device_problem(device)
        if problem:
            problems.append(problem)
    if problems:
        raise ValueError("bad config values: " + "; ".join(problems) + ". Fix them in the config or the command line.")


def _device_problem(device: Any) -> str | None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        return f"device {device!r} is not a torch device ({err})"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"device {str(dev)!r} was asked for but this machine has no usable CUDA GPU; pass --device cpu"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"device {str(dev)!r} does not exist: {torch.cuda.device_count()} CUDA GPU(s) are visible"
    return None


def check_fusion_options(fusion_version: str, fuse_on_device: Any, batch_size: int,
                         fusion_transforms: Sequence[Any] = (), training_transforms: Sequence[Any] = ()) -> None:
    """The pretraining bundle's Volume Fusion set-up is consistent: the variant keys agree with the pipeline the
    config files built (``--fusion_version v2`` alone would change nothing: the variants are override files), the
    variants are not combined, and fusion on the device has batches of at least 2 volumes."""
    from misfm_transforms import RandVolumeFusiond, RandVolumeFusionGridd

    if fusion_version not in ("v1", "v2"):
        raise ValueError(f"fusion_version must be 'v1' (paper, random boxes) or 'v2' (VolF, block grid), got "
                         f"{fusion_version!r}.")
    on_device = flag(fuse_on_device, "fuse_on_device")
    if on_device and fusion_version != "v1":
        raise ValueError("configs/fuse_on_device.json implements VF-v1 only; "
                         "do not combine it with configs/vf_v2.json.")
    built_v2 = any(isinstance(t, RandVolumeFusionGridd) for t in fusion_transforms)
    fused_in_loader = any(isinstance(t, (RandVolumeFusiond, RandVolumeFusionGridd)) for t in training_transforms)
    if fusion_transforms and built_v2 != (fusion_version == "v2"):
        raise ValueError(f"fusion_version is {fusion_version!r} but the pipeline is "
                         f"VF-{'v2' if built_v2 else 'v1'}: the "
                         "variants are config files; add (or leave out) configs/vf_v2.json instead of setting the key.")
    if training_transforms and fused_in_loader == on_device:
        where = "in the data loader" if fused_in_loader else "nowhere"
        raise ValueError(f"fuse_on_device is {on_device} but the training pipeline fuses {where}: the variants are "
                         "config files; add (or leave out) configs/fuse_on_device.json instead of setting the key.")
    if on_device and int(batch_size) < 2:
        raise ValueError(
            "configs/fuse_on_device.json fuses each sample with the previous one in the batch: set batch_size >= 2 "
            "(with batch_size 1 a volume would be fused with itself)."
        )


def check_output_folders(ckpt_dir: str, output_dir: str, resume: Any = True) -> None:
    """The run can write its outputs, and will not silently replace a model of an earlier run.

    ``ValueError`` when ``ckpt_dir`` or ``output_dir`` (or, when they do not exist yet, the folder they would be
    created in) is not writable, or when ``ckpt_dir`` holds a ``model.pt`` but no ``checkpoint.pt`` to resume from
    and ``resume`` is true: training would replace that model after its first validation. Nothing is created.
    """
    for key, folder in (("ckpt_dir", ckpt_dir), ("output_dir", output_dir)):
        folder = os.path.abspath(os.fspath(folder))
        existing = folder
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise ValueError(f"{key} {folder!r}: {existing!r} is a file, not a folder; pass another --{key}.")
        try:  # a file created and removed at once: permissions, read-only mounts, quotas (also for root)
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as err:
            where = "" if existing == folder else f" (it would be created in {existing!r})"
            raise ValueError(f"{key} {folder!r} is not writable{where} ({err.strerror}); fix its permissions or pass "
                             f"another --{key}.") from err
    model, checkpoint = os.path.join(ckpt_dir, "model.pt"), os.path.join(ckpt_dir, "checkpoint.pt")
    if flag(resume, "resume") and os.path.isfile(model) and not os.path.isfile(checkpoint):
        raise ValueError(
            f"ckpt_dir {os.path.abspath(ckpt_dir)!r} holds a model.pt of an earlier run but no checkpoint.pt to resume "
            "from: this run would replace that model. Pass another --ckpt_dir, move model.pt away, or pass "
            "--resume False to start over and replace it."
        )


def check_batches(loader: Any, batch_size: int) -> int:
    """The training loader yields at least one batch in this process; returns how many.

    With ``drop_last`` (on-device fusion) a process holding fewer volumes than ``batch_size`` gets none: the run
    would train zero iterations and exit as if it had succeeded.
    """
    count = len(loader)
    if count == 0:
        samples = len(getattr(loader, "sampler", None) or loader.dataset)
        raise ValueError(
            f"the training data loader yields no batch: this process has {samples} volume(s) but batch_size is "
            f"{batch_size} and incomplete batches are dropped. Add volumes to the training list or lower batch_size."
        )
    return count
