"""Datasets for Volume Fusion pretraining."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from monai.data import Dataset
from monai.transforms import Randomizable, apply_transform
from monai.utils import MAX_SEED

__all__ = ["SeededDataset", "VolumePairDataset"]

logger = logging.getLogger(__name__)


class SeededDataset(Dataset, Randomizable):
    """A ``Dataset`` whose random transforms replay the same draws for each item, every epoch and every run.

    With ``seed`` set, the random transforms are re-seeded with ``seed + index`` before item ``index``: a fixed
    validation set of random samples (e.g. fused Volume Fusion samples), identical across epochs and runs. With
    ``seed=None`` it is a plain ``Dataset`` whose random transforms are seeded per worker.
    """

    def __init__(self, data: Sequence[Mapping[str, Any]], transform: Callable | None = None,
                 seed: int | None = None) -> None:
        super().__init__(data=data, transform=transform)
        self.seed = seed

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        """Seed this dataset AND its random transforms.

        MONAI's ``set_rnd`` (DataLoader worker init; the ``num_workers=0`` seeding) stops at the first object with
        ``set_random_state``; without this override each worker would keep the transforms' random state forked
        from the parent, so all workers produced the same crops / fusion boxes.
        """
        super().set_random_state(seed=seed, state=state)
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def randomize(self, data: Any = None) -> None:  # the transforms draw; nothing to draw here
        pass

    def _item(self, index: int) -> dict[str, Any]:
        return dict(self.data[index])

    def _transform(self, index: int):
        item = self._item(index)
        if self.transform is None:
            return item
        if self.seed is not None and isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed=self.seed + index)
        return apply_transform(self.transform, item)


class VolumePairDataset(SeededDataset):
    """Each item is a volume plus the image of ANOTHER random volume under ``foreground_key``.

    VF-v1 fuses two different volumes; with this dataset every sample carries its own foreground volume, so
    fusion can run per sample in the transform chain (``RandVolumeFusiond``). The partner is drawn uniformly
    from the other entries on each access. ``data`` is a sequence of dicts, typically a ``CacheDataset`` of the
    deterministic preprocessing (load, orientation, spacing, intensity), so that ``transform`` only holds the
    random part (crops, fusion) and each volume is read and resampled once, not once per pairing.

    With ``seed`` set the dataset is a *fixed* set (see :class:`SeededDataset`): item ``i`` always pairs with the
    same partner.
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        transform: Callable | None = None,
        image_key: str = "image",
        foreground_key: str = "foreground",
        seed: int | None = None,
    ) -> None:
        super().__init__(data=data, transform=transform, seed=seed)
        self.image_key, self.foreground_key = image_key, foreground_key
        if len(data) < 2:
            logger.warning("VolumePairDataset with %d volume(s): volumes are fused with themselves.", len(data))

    def _partner(self, index: int) -> int:
        n = len(self.data)
        if n < 2:
            return index
        rng = np.random.RandomState(self.seed + index) if self.seed is not None else self.R
        j = int(rng.randint(n - 1))
        return j + 1 if j >= index else j

    def _item(self, index: int) -> dict[str, Any]:
        item = dict(self.data[index])
        item[self.foreground_key] = self.data[self._partner(index)][self.image_key]
        return item
