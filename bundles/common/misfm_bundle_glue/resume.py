"""Crash-safe training: atomic checkpoint writes, a full training checkpoint every N iterations, exact resume.

``TrainingCheckpointer`` (a train handler) writes ``<save_dir>/checkpoint.pt`` every ``interval`` iterations and at
the end of every epoch that crossed an interval boundary (after validation, so the best-metric bookkeeping is in it):
network, optimizer, lr scheduler, AMP scaler, the trainer's iteration/epoch, the evaluator's best metric, the
``model.pt`` saver's bookkeeping, and every random state the data stream depends on (torch CPU/CUDA, numpy, python
``random``, the ``R`` of each MONAI ``Randomizable`` reachable from the training dataset) both now and at the moment
the current data-loader iterator was created. When the same command runs again and the file exists (``resume``), the
trainer continues from that iteration: the iterator is recreated from the saved states and the batches already used
are drawn again and dropped (data loading only, no training step), then the current states are restored, so on CPU
the resumed run ends with the same weights as an uninterrupted one.

Under ``torch.distributed`` (torchrun + ``multi_gpu_train.json``) only rank 0 writes the file, but it holds the
random states of EVERY rank (gathered at each save; each rank's random transforms draw different numbers), and the
world size. On resume every rank reads the same file (``ckpt_dir`` must be on a file system all ranks see), restores
the weights/optimizer and its own random states; the ranks then check, collectively, that they all resumed from the
same iteration (or all started from scratch) before the first step, so no rank trains from a different state.

Every write goes to a temporary file in the same folder, is flushed and fsync'ed, then ``os.replace``'d over the
target (and the folder fsync'ed): a kill at any moment leaves either the old or the new complete file.
"""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .checks import flag
from .runtime import rank, world_size
from .weights import describe_load_error

__all__ = ["atomic_torch_save", "TrainingCheckpointer", "AtomicCheckpointSaver", "capture_rng", "restore_rng"]

logger = logging.getLogger("misfm.bundle")

# test hook: "SECONDS" or "SECONDS@ITERATION": sleep between the complete temporary file and the rename
SLOW_WRITE_ENV = "MISFM_TEST_SLOW_CHECKPOINT_WRITE"
_TMP_PREFIX = ".tmp-"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _slow_write_hook(path: str, iteration: int | None) -> None:
    spec = os.environ.get(SLOW_WRITE_ENV)
    if not spec:
        return
    seconds, _, at = spec.partition("@")
    if at and (iteration is None or int(at) != iteration):
        return
    logger.info("%s: temporary file of %s complete (iteration %s), sleeping %ss before the rename",
                SLOW_WRITE_ENV, os.path.basename(path), iteration, seconds)
    for h in logging.getLogger().handlers:
        h.flush()
    time.sleep(float(seconds))


def atomic_torch_save(obj: Any, path: str, iteration: int | None = None) -> None:
    """``torch.save(obj, path)`` via temp file + flush + fsync + ``os.replace`` (+ folder fsync)."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + os.path.basename(path) + ".", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        _slow_write_hook(path, iteration)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


def remove_stale_temporaries(folder: str, name: str) -> list[str]:
    """Delete temporary files of interrupted ``atomic_torch_save`` calls for ``name`` (they are never complete)."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    pattern = re.compile(re.escape(_TMP_PREFIX + name + ".") + r".+")
    for entry in os.listdir(folder):
        if pattern.fullmatch(entry):
            os.remove(os.path.join(folder, entry))
            removed.append(entry)
    return removed


# ---------------------------------------------------------------------------------------------------- RNG states


def _randomizables(root: Any) -> list[Any]:
    """``Randomizable`` objects reachable from a dataset, one per distinct random state, in a fixed (DFS) order:
    the dataset, its transforms, their sub-transforms (e.g. ``RandSpatialCropd.cropper``), wrapped datasets."""
    from monai.transforms import Randomizable, Transform
    from torch.utils.data import Dataset

    kinds = (Dataset, Transform, Randomizable)
    found: list[Any] = []
    seen: set[int] = set()
    seen_states: set[int] = set()

    def visit(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, Randomizable) and isinstance(getattr(obj, "R", None), np.random.RandomState):
            if id(obj.R) not in seen_states:
                seen_states.add(id(obj.R))
                found.append(obj)
        for key, child in sorted(vars(obj).items()) if hasattr(obj, "__dict__") else ():
            if key.startswith("__") or key == "_cache":
                continue
            items = child if isinstance(child, (list, tuple)) else [child]
            for item in items:
                if isinstance(item, kinds):
                    visit(item)

    visit(root)
    return found


def _np_state(rs: np.random.RandomState) -> dict:
    name, keys, pos, has_gauss, cached = rs.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_np_state(rs: np.random.RandomState, s: Mapping) -> None:
    rs.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))


def capture_rng(randomizables: Sequence[Any] = ()) -> dict:
    """All random states as a ``torch.load(weights_only=True)``-compatible dict."""
    version, internal, gauss = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": _np_state(np.random.mtrand._rand),
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "transforms": [_np_state(t.R) for t in randomizables],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # this rank's own device only
        out["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return out


def restore_rng(states: Mapping, randomizables: Sequence[Any] = ()) -> None:
    torch.set_rng_state(states["torch"])
    _set_np_state(np.random.mtrand._rand, states["numpy"])
    py = states["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"], torch.cuda.current_device())
    saved = states.get("transforms", [])
    if len(saved) != len(randomizables):
        raise ValueError(
            f"the checkpoint holds {len(saved)} transform random states but the training pipeline has "
            f"{len(randomizables)} random transforms: the transforms changed since it was written. "
            "Delete checkpoint.pt or pass --resume false to start over."
        )
    for t, s in zip(randomizables, saved):
        _set_np_state(t.R, s)


# ---------------------------------------------------------------------------------------------------- handler


def _all_gather(obj: Any) -> list:
    """``obj`` of every rank (a list of one outside ``torch.distributed``)."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _fingerprint(value: Any) -> str:
    """A short stable digest of a JSON-like value (a datalist of 100k entries takes well under a second)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tag() -> str:
    return f"[rank {rank()}/{world_size()}] " if world_size() > 1 else ""


def _unwrap(module: Any) -> Any:
    return module.module if isinstance(module, (torch.nn.parallel.DistributedDataParallel,
                                                torch.nn.DataParallel)) else module


class _TrackedLoader:
    """Iterable wrapper the trainer draws batches from: records the random states at each ``iter()`` and counts
    the batches drawn since; on resume, its first ``iter()`` rebuilds the saved position."""

    def __init__(self, loader: Any, owner: TrainingCheckpointer) -> None:
        self.loader, self.owner = loader, owner

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:  # sampler, dataset, batch_size... of the wrapped loader
        return getattr(self.loader, name)

    def __iter__(self):
        owner = self.owner
        pending, owner._pending = owner._pending, None
        if pending is not None:
            restore_rng(pending["iterator_rng"], owner._randomizables)
            it = iter(self.loader)
            for _ in range(pending["batches_drawn"]):
                next(it)
            restore_rng(pending["rng"], owner._randomizables)
            owner._iterator_rng, owner._drawn = pending["iterator_rng"], pending["batches_drawn"]
        else:
            owner._iterator_rng, owner._drawn = capture_rng(owner._randomizables), 0
            it = iter(self.loader)
        return self._count(it)

    def _count(self, it):
        for batch in it:
            self.owner._drawn += 1
            yield batch


class TrainingCheckpointer:
    """Full training checkpoint every ``interval`` iterations to ``<save_dir>/<filename>``; resume from it.

    Args:
        save_dir: the bundle's ``ckpt_dir``.
        save_dict: objects with ``state_dict``/``load_state_dict`` (network, optimizer, lr_scheduler).
        interval: iterations between checkpoints (``checkpoint_interval``); 0 disables writing.
        resume: continue from an existing checkpoint (``resume``, default true).
        evaluator: the validation evaluator (its best metric is kept across a resume).
        metric_savers: handlers of the evaluator; the ``CheckpointSaver`` among them keeps its best-score record
            across a resume (so ``model.pt`` is not replaced by a worse model after resuming).
        filename: default ``checkpoint.pt``.
        run_info: what identifies the run (the bundle's name, the training datalist, ...): its fingerprint is
            saved, and a resume whose ``run_info`` differs is refused (another bundle's checkpoint, a changed
            datalist).
    """

    def __init__(self, save_dir: str, save_dict: Mapping[str, Any], interval: int = 100, resume: Any = True,
                 evaluator: Any = None, metric_savers: Sequence[Any] | None = None,
                 filename: str = "checkpoint.pt", run_info: Mapping[str, Any] | None = None) -> None:
        if int(interval) < 0:
            raise ValueError(f"checkpoint_interval must be >= 0 (0 = no training checkpoints), got {interval}.")
        self.save_dir, self.save_dict, self.interval = os.fspath(save_dir), dict(save_dict), int(interval)
        self.resume, self.evaluator, self.filename = flag(resume, "resume"), evaluator, filename
        self.run_info = {k: _fingerprint(v) for k, v in (run_info or {}).items()}
        self.metric_savers = [h for h in (metric_savers or []) if getattr(h, "_key_metric_checkpoint", None)]
        self.path = os.path.join(self.save_dir, filename)
        self._pending: dict | None = None
        self._iterator_rng: dict | None = None
        self._drawn = 0
        self._randomizables: list[Any] = []
        self._last_saved = -1

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)

    # -- save
    def _rank_rng(self) -> dict:
        rng = capture_rng(self._randomizables)
        return {"rng": rng, "iterator_rng": self._iterator_rng if self._iterator_rng is not None else rng}

    def state(self, engine: Any, rank_rng: Sequence[dict] | None = None) -> dict:
        out: dict[str, Any] = {k: _unwrap(v).state_dict() for k, v in self.save_dict.items()}
        out["trainer"] = {"iteration": int(engine.state.iteration), "epoch": int(engine.state.epoch),
                          "epoch_length": int(engine.state.epoch_length), "max_epochs": int(engine.state.max_epochs)}
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and getattr(engine, "amp", False):
            out["scaler"] = scaler.state_dict()
        if self.evaluator is not None:
            st = self.evaluator.state
            out["evaluator"] = {"best_metric": float(getattr(st, "best_metric", -1.0)),
                                "best_metric_epoch": int(getattr(st, "best_metric_epoch", -1))}
        out["metric_savers"] = [
            [[float(p), str(f)] for p, f in h._key_metric_checkpoint.state_dict()["_saved"]] for h in self.metric_savers
        ]
        rank_rng = list(rank_rng) if rank_rng is not None else [self._rank_rng()]
        out["rng"], out["iterator_rng"] = rank_rng[0]["rng"], rank_rng[0]["iterator_rng"]  # rank 0 (format 1)
        out["batches_drawn"] = int(self._drawn)
        out["world_size"] = len(rank_rng)
        out["rank_rng"] = rank_rng[1:]  # ranks 1.. (empty for one process)
        out["run_info"] = self.run_info
        out["format"] = 1
        return out

    def save(self, engine: Any) -> None:
        it = int(engine.state.iteration)
        if self.interval <= 0 or it == self._last_saved:
            return
        self._last_saved = it
        # collective under torch.distributed: every rank reaches the same iterations here (same interval/epochs)
        rank_rng = _all_gather(self._rank_rng())
        if rank() != 0:
            return
        atomic_torch_save(self.state(engine, rank_rng), self.path, iteration=it)
        logger.info("training checkpoint saved: %s (iteration %d, epoch %d)", self.path, it, engine.state.epoch)

    def _iteration_completed(self, engine: Any) -> None:
        it, length = engine.state.iteration, engine.state.epoch_length
        # the last iteration of an epoch is saved after the epoch's validation (see _epoch_completed)
        if self.interval > 0 and it % self.interval == 0 and not (length and it % length == 0):
            self.save(engine)

    def _epoch_completed(self, engine: Any) -> None:
        it = engine.state.iteration
        done = engine.state.epoch >= engine.state.max_epochs
        if self.interval > 0 and (it // self.interval > max(self._last_saved, 0) // self.interval or done):
            self.save(engine)

    # -- resume
    def _started(self, engine: Any) -> None:
        from ignite.engine import Events

        # save AFTER the other handlers of the same event (lr scheduler step, validation, model.pt saver), so the
        # checkpoint holds their effect: registered here, i.e. last
        if not engine.has_event_handler(self._iteration_completed, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        if not engine.has_event_handler(self._epoch_completed, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        loader = engine.state.dataloader
        if not isinstance(loader, _TrackedLoader):
            self._randomizables = _randomizables(getattr(loader, "dataset", loader))
            engine.state.dataloader = _TrackedLoader(loader, self)
        if rank() == 0:
            for name in remove_stale_temporaries(self.save_dir, self.filename):
                logger.warning("removed %s: temporary file of an interrupted checkpoint write", name)
        if not self.resume:
            logger.info("%sresume=false: training from the start (an existing %s will be overwritten).", _tag(),
                        self.path)
            return
        if world_size() == 1:
            if not os.path.isfile(self.path):
                logger.info("no training checkpoint at %s: training from the start.", self.path)
                return
            self.load(engine)
            return
        import torch.distributed as dist

        dist.barrier()  # rank 0 has removed stale temporaries; the file (if any) is the last complete one
        # every rank decides and loads on its own, then all compare: a rank that failed or saw another file stops all
        error, iteration = None, -1
        try:
            if os.path.isfile(self.path):
                iteration = self.load(engine)
            else:
                logger.info("%sno training checkpoint at %s: training from the start.", _tag(), self.path)
        except Exception as err:  # re-raised below, on every rank, after the collective
            error = err
        seen = _all_gather((iteration, None if error is None else f"{type(error).__name__}: {error}"))
        if error is not None:
            raise error
        problems = [f"rank {r}: {msg}" for r, (_, msg) in enumerate(seen) if msg]
        if problems:
            raise RuntimeError("resume failed on another rank: " + "; ".join(problems))
        if len({it for it, _ in seen}) != 1:
            raise RuntimeError(
                f"the ranks found different training checkpoints at {self.path!r} (iteration per rank, -1 = none: "
                f"{[it for it, _ in seen]}): ckpt_dir must be on a file system shared by all ranks (only rank 0 "
                "writes it)."
            )

    def load(self, engine: Any) -> int:
        try:
            ckpt = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"cannot read the training checkpoint {self.path!r} ({type(err).__name__}: {err}); delete it or "
                "pass --resume false to start over."
            ) from err
        saved_world, world = int(ckpt.get("world_size", 1)), world_size()
        if saved_world != world:
            raise ValueError(
                f"training checkpoint {self.path!r} was written by {saved_world} process(es), this run has {world}: "
                "each rank's data shard and random states would differ, it cannot resume exactly. Run with "
                f"{saved_world} process(es), or delete it / pass --resume false to start over."
            )
        for key, value in self.run_info.items():
            saved = ckpt.get("run_info", {}).get(key)
            if saved != value:
                what = "another bundle" if key == "bundle" else f"another {key}"
                raise ValueError(
                    f"training checkpoint {self.path!r} was written by a run with {what} ({key} fingerprint {saved} "
                    f"vs {value} now): it cannot be resumed here. Pass another --ckpt_dir, or delete it / pass "
                    "--resume False to start over."
                )
        me = rank()
        mine = {"rng": ckpt["rng"], "iterator_rng": ckpt["iterator_rng"]} if me == 0 else ckpt["rank_rng"][me - 1]
        t = ckpt["trainer"]
        if t["epoch_length"] != engine.state.epoch_length:
            raise ValueError(
                f"training checkpoint {self.path!r} was written with epoch_length {t['epoch_length']}, this run has "
                f"{engine.state.epoch_length} (epoch_length / batch_size / datalist changed): it cannot resume "
                "exactly. Restore the settings, or delete it / pass --resume false to start over."
            )
        for key, obj in self.save_dict.items():
            try:
                _unwrap(obj).load_state_dict(ckpt[key])
            except (RuntimeError, ValueError, KeyError) as err:
                raise ValueError(
                    f"training checkpoint {self.path!r} does not fit this run's {key}: {describe_load_error(err)}. "
                    "Were the widths (feature_channels, num_heads), roi_size or classes changed? Restore them, or "
                    "pass another --ckpt_dir / --resume False to start over."
                ) from None  # PyTorch's own message lists every entry: thousands of lines
        if "scaler" in ckpt and getattr(engine, "scaler", None) is not None:
            engine.scaler.load_state_dict(ckpt["scaler"])
        if self.evaluator is not None and "evaluator" in ckpt:
            self.evaluator.state.best_metric = ckpt["evaluator"]["best_metric"]
            self.evaluator.state.best_metric_epoch = ckpt["evaluator"]["best_metric_epoch"]
        for h, saved in zip(self.metric_savers, ckpt.get("metric_savers", [])):
            h._key_metric_checkpoint.load_state_dict({"_saved": [(p, f) for p, f in saved]})
        iteration = int(t["iteration"])
        engine.state.iteration = iteration
        engine.state.epoch = iteration // engine.state.epoch_length
        self._last_saved = iteration
        self._pending = {"iterator_rng": mine["iterator_rng"], "batches_drawn": int(ckpt["batches_drawn"]),
                         "rng": mine["rng"]}
        if iteration >= engine.state.epoch_length * engine.state.max_epochs:
            logger.info("%sresuming from iteration %d: %s says training is complete (max_epochs %d); nothing to do. "
                        "Raise max_epochs to train further.", _tag(), iteration, self.path, engine.state.max_epochs)
        else:
            logger.info("%sresuming from iteration %d (epoch %d, %d batches into it) of %s", _tag(), iteration,
                        engine.state.epoch + 1, iteration % engine.state.epoch_length, self.path)
        return iteration


# ---------------------------------------------------------------------------------------------------- model.pt


def _atomic_disk_saver(dirname: str, fixed_filename: str | None):
    from ignite.handlers import DiskSaver

    class _AtomicDiskSaver(DiskSaver):
        """ignite DiskSaver writing through ``atomic_torch_save``; with a fixed filename, ``remove`` is a no-op
        (the new file replaces the old one in one rename, so a best model is never deleted before its successor
        is complete)."""

        def __init__(self) -> None:
            super().__init__(dirname=dirname, require_empty=False, atomic=True, create_dir=True)
            self.fixed = fixed_filename

        def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
            if rank() == self.save_on_rank:
                atomic_torch_save(checkpoint, os.path.join(dirname, self.fixed or filename))

        def remove(self, filename: str) -> None:
            if self.fixed is None:
                super().remove(filename)

    return _AtomicDiskSaver()


def AtomicCheckpointSaver(*args: Any, **kwargs: Any):
    """MONAI ``CheckpointSaver`` whose writes are atomic.

    MONAI's saver uses ignite's ``DiskSaver`` with ``atomic=False`` and, for a fixed ``key_metric_filename``
    (``model.pt``), first *deletes* the previous best file and then ``torch.save``s straight into the target: a
    kill in between leaves no ``model.pt`` or a truncated one. Here every file goes through ``atomic_torch_save``.
    """
    from monai.handlers import CheckpointSaver

    saver = CheckpointSaver(*args, **kwargs)
    fixed = {"_final_checkpoint": kwargs.get("final_filename"), "_key_metric_checkpoint": kwargs.get(
        "key_metric_filename"), "_interval_checkpoint": None}
    for attr, name in fixed.items():
        ckpt = getattr(saver, attr, None)
        if ckpt is not None:
            ckpt.save_handler = _atomic_disk_saver(saver.save_dir, name)
    return saver
