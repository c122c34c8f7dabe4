"""Handlers: a record of what a training run used, Hausdorff distance in millimetres, a per-class metrics CSV."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.handlers import HausdorffDistance

__all__ = ["HausdorffDistanceMM", "PerClassMetricsWriter", "RunRecord"]

logger = logging.getLogger("misfm.bundle")


class RunRecord:
    """Write ``<save_dir>/run.json`` when training starts (rank 0): what this run trained on and from (label budget,
    the training cases, the pretrained checkpoint and its SHA-256, ...), so a result can be traced to its inputs.

    Attached to the trainer, it writes after every check and the data loading passed (nothing on a failed start).
    """

    def __init__(self, save_dir: str, info: Mapping[str, Any], filename: str = "run.json") -> None:
        self.path = os.path.join(os.fspath(save_dir), filename)
        self.info = dict(info)

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._write)

    def _write(self, engine: Any) -> None:
        from .runtime import rank

        if rank() != 0:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.info, f, indent=2, default=str)
        os.replace(tmp, self.path)
        logger.info("run record written to %s", self.path)


class HausdorffDistanceMM(HausdorffDistance):
    """MONAI's ``HausdorffDistance`` handler in millimetres: each case is measured with its own voxel spacing, read
    from the prediction's metadata (``MetaTensor.pixdim``; the bundles invert predictions to the original grid, so
    this is the input image's spacing). MONAI's handler passes no spacing, i.e. measures in voxels."""

    def update(self, output: Sequence[Any]) -> None:
        y_pred, y = output
        for pred, label in zip(y_pred, y):
            spacing = [float(s) for s in pred.pixdim] if hasattr(pred, "pixdim") else None
            self.metric_fn([pred], [label], spacing=spacing)


class PerClassMetricsWriter:
    """Write ``<save_dir>/<filename>``: one row per image, one column per (metric, class name), plus a mean row.

    Attach to an evaluator whose metrics were created with ``save_details=True`` (MONAI ``MeanDice``,
    ``HausdorffDistance``...). Works under DDP: filenames are gathered from every rank, rank 0 writes.
    """

    def __init__(self, save_dir: str, metric_names: Sequence[str], class_names: Sequence[str],
                 filename: str = "per_class_metrics.csv", image_key: str = "image") -> None:
        self.save_dir, self.metric_names, self.class_names = save_dir, list(metric_names), list(class_names)
        self.filename, self.image_key = filename, image_key
        self._files: list[str] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self._files.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _collect(self, engine: Any) -> None:
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else [batch]
        for item in items:
            meta = getattr(item.get(self.image_key), "meta", {}) or {}
            name = meta.get("filename_or_obj", "")
            names = name if isinstance(name, (list, tuple)) else [name]
            self._files += [os.path.basename(str(n)) for n in names]

    def _write(self, engine: Any) -> None:
        import torch.distributed as dist
        from monai.utils import string_list_all_gather

        files = self._files
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            files = string_list_all_gather(files)
            if dist.get_rank() != 0:
                return
        rows = _first_occurrences(files)  # every rank evaluates every case when there are fewer cases than ranks
        header, columns = ["filename"], []
        for metric in self.metric_names:
            details = engine.state.metric_details.get(metric)
            if details is None:
                raise ValueError(f"metric {metric!r} has no details: create it with save_details=True.")
            values = np.asarray(torch.as_tensor(details).float().cpu()).reshape(len(files), -1)[rows]
            names = self.class_names[-values.shape[1]:]  # metrics without background drop class 0
            header += [f"{metric}_{n}" for n in names]
            columns.append(values)
        table = np.concatenate(columns, axis=1) if columns else np.zeros((len(files), 0))
        os.makedirs(self.save_dir, exist_ok=True)
        with open(os.path.join(self.save_dir, self.filename), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for name, row in zip([files[i] for i in rows], table):
                writer.writerow([name] + [f"{v:.4f}" for v in row])
            writer.writerow(["mean"] + [f"{v:.4f}" for v in np.nanmean(table, axis=0)] if len(table) else ["mean"])
        logger.info("per-class metrics written to %s", os.path.join(self.save_dir, self.filename))


def _first_occurrences(names: list[str]) -> list[int]:
    seen: set[str] = set()
    keep = []
    for i, name in enumerate(names):
        if name not in seen:
            seen.add(name)
            keep.append(i)
    return keep
