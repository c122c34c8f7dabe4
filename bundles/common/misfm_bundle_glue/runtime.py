"""Process set-up of a bundle run: seeding per rank, determinism, evaluation sharding, output names."""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from .checks import flag

__all__ = ["rank", "world_size", "setup_process", "EvaluationSampler", "output_root", "select_training_cases",
           "budget_count"]

logger = logging.getLogger("misfm.bundle")


def rank() -> int:
    """This process's global rank (0 outside ``torch.distributed``)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def setup_process(seed: int, deterministic: Any = False) -> int:
    """First step of every bundle run: seed this process with ``seed + rank``, choose between speed and bit-exact
    runs, and leave the console to rank 0 (other ranks log warnings and errors only). Returns the rank's seed.

    Every rank draws its own crops, dropout masks and Volume Fusion boxes (one shared seed would repeat the same
    pretext task on every GPU); a rerun with the same seed and world size repeats them.

    ``deterministic`` false (default): cuDNN picks the fastest convolution algorithms (``benchmark``), which may
    differ between runs on a GPU. True: deterministic cuDNN algorithms and ``torch.use_deterministic_algorithms``
    with ``warn_only`` (PyTorch has no deterministic CUDA backward for some ops this network uses, e.g. 3-D max
    pooling: they warn instead of failing). CPU runs are bit-exact either way.
    """
    from monai.utils import set_determinism

    exact = flag(deterministic, "deterministic")
    rank_seed = int(seed) + rank()
    set_determinism(seed=rank_seed)  # python, numpy, torch (CPU and every CUDA device); cuDNN deterministic
    torch.use_deterministic_algorithms(exact, warn_only=True)
    torch.backends.cudnn.deterministic = exact
    torch.backends.cudnn.benchmark = not exact
    if exact:  # cuBLAS needs a fixed workspace for reproducible results (read when CUDA initialises)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if rank() > 0:
        logging.getLogger().setLevel(logging.WARNING)
    logger.info("seed %d (bundle seed %d + rank %d); deterministic=%s", rank_seed, int(seed), rank(), exact)
    return rank_seed


class EvaluationSampler(Sampler[int]):
    """The validation/evaluation cases of this rank: a disjoint shard of the list (no padding, so no case counts
    twice in the metrics); with fewer cases than ranks every rank evaluates the whole list (each case then counts
    once per rank, which leaves every mean unchanged; the per-case CSV lists each case once).

    MONAI's ``DistributedSampler`` refuses fewer cases than ranks, or pads (then the repeated cases bias the mean).
    """

    def __init__(self, dataset: Sequence[Any], num_replicas: int | None = None, rank_: int | None = None) -> None:
        self.n = len(dataset)
        self.num_replicas = world_size() if num_replicas is None else num_replicas
        self.rank = rank() if rank_ is None else rank_
        if self.n < self.num_replicas:
            self.indices = list(range(self.n))
            if self.rank == 0:
                logger.info("%d evaluation case(s) on %d processes: every process evaluates all of them.", self.n,
                            self.num_replicas)
        else:
            self.indices = list(range(self.rank, self.n, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def output_root(datalist: Sequence[Mapping[str, Any]], key: str = "image") -> str:
    """The deepest folder holding every input of ``datalist``: written under ``output_dir`` with their paths
    relative to it, inputs of the same name in different folders (``p1/ct.nii.gz``, ``p2/ct.nii.gz``) get outputs
    of their own (MONAI ``SaveImaged(data_root_dir=...)``). Refuses inputs whose outputs would still collide."""
    paths = [os.path.abspath(os.fspath(item[key])) for item in datalist]
    root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    outputs: dict[str, str] = {}
    for path in paths:
        rel = os.path.relpath(path, root)
        stem = rel[: -len(".nii.gz")] if rel.lower().endswith(".nii.gz") else os.path.splitext(rel)[0]
        if stem in outputs and outputs[stem] != path:
            raise ValueError(
                f"inputs {outputs[stem]!r} and {path!r} would write the same output ({stem}_seg...): rename one of "
                "them or run them separately."
            )
        outputs[stem] = path
    return root


def select_training_cases(datalist: Sequence[Mapping[str, Any]], budget: Any = "all",
                          seed: int = 0) -> list[Mapping[str, Any]]:
    """The training cases of a label budget: ``"all"``, a count (an int >= 1) or a fraction in (0, 1] of the list.

    The cases are the first ``n`` of a permutation drawn with ``seed``, so the same budget and seed always select
    the same cases, and a larger budget with the same seed holds every case of a smaller one (nested subsets, as a
    label-efficiency study needs). Logged; a budget larger than the list is an error.
    """
    total = len(datalist)
    count = budget_count(budget, total)
    if count == total:
        chosen = list(datalist)
    else:
        order = np.random.RandomState(int(seed)).permutation(total)
        chosen = [datalist[int(i)] for i in sorted(order[:count])]
    logger.info("label budget %s: training on %d of %d labelled cases (label_budget_seed %d)%s", budget, count, total,
                int(seed), "" if count == total else ": " + ", ".join(os.path.basename(str(c.get("image", c)))
                                                                     for c in chosen[:20]))
    return chosen


def budget_count(budget: Any, total: int) -> int:
    """How many of ``total`` cases a label budget means (see :func:`select_training_cases`)."""
    if isinstance(budget, str) and budget.strip().lower() == "all":
        return total
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not budget > 0:
        raise ValueError(f"label_budget must be 'all', a number of cases >= 1 or a fraction in (0, 1], got {budget!r}.")
    if isinstance(budget, float) and budget <= 1.0:  # a fraction of the list
        count = max(1, round(budget * total))
    elif float(budget).is_integer():
        count = int(budget)
    else:
        raise ValueError(f"label_budget {budget!r}: a number of cases must be whole, a fraction at most 1.")
    if count > total:
        raise ValueError(f"label_budget {budget!r} asks for {count} cases but the training list has {total}; use a "
                         "smaller budget or 'all'.")
    return count
