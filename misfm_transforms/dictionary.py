"""Dictionary versions of the Volume Fusion transforms (MONAI ``MapTransform`` style)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Randomizable

from .fusion import RandVolumeFusion, RandVolumeFusionGrid
from .pair_crop import RandPairCropForVolumeFusion

__all__ = [
    "RandVolumeFusiond",
    "RandVolumeFusionD",
    "RandVolumeFusionDict",
    "RandVolumeFusionGridd",
    "RandVolumeFusionGridD",
    "RandVolumeFusionGridDict",
    "RandPairCropForVolumeFusiond",
    "RandPairCropForVolumeFusionD",
    "RandPairCropForVolumeFusionDict",
]


class _FusionDictBase(Randomizable, MapTransform):
    """Reads ``background_key`` and ``foreground_key``, writes the fused image to ``background_key`` and the
    label map to ``label_key``; the foreground entry is left as it is.

    The default foreground key is ``"foreground"``: avoid names like ``"image_fg"``, which MONAI's dictionary
    transforms (e.g. ``Spacingd``) take for metadata of ``"image"``.
    """

    fusion: RandVolumeFusion | RandVolumeFusionGrid

    def __init__(self, background_key: str, foreground_key: str, label_key: str, allow_missing_keys: bool) -> None:
        MapTransform.__init__(self, [background_key, foreground_key], allow_missing_keys)
        self.background_key, self.foreground_key, self.label_key = background_key, foreground_key, label_key

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> _FusionDictBase:
        super().set_random_state(seed, state)
        self.fusion.set_random_state(seed, state)
        return self

    def randomize(self, data: NdarrayOrTensor) -> None:
        """Draw the inner transform's parameters for an image ``data`` of shape ``(C, X, Y, Z)``."""
        self.fusion.randomize(data.shape[1:])

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        missing = [k for k in (self.background_key, self.foreground_key) if k not in d]
        if missing:
            if self.allow_missing_keys:
                return d
            raise KeyError(f"key(s) {missing} not found in the data (available: {list(d)}).")
        background, foreground = d[self.background_key], d[self.foreground_key]
        fused, label = self.fusion(background, foreground, randomize=True)
        d[self.background_key], d[self.label_key] = fused, label
        return d


class RandVolumeFusiond(_FusionDictBase):
    """Dictionary form of :class:`~misfm_transforms.fusion.RandVolumeFusion` (VF-v1, random boxes).

    Example::

        RandVolumeFusiond(background_key="image", foreground_key="foreground", label_key="label")
        # box sizes (8, 8, 8)..(80, 80, 40): (x, y, z), the paper's bounds for MONAI-loaded volumes
    """

    def __init__(
        self,
        background_key: str = "image",
        foreground_key: str = "foreground",
        label_key: str = "label",
        num_levels: int = 4,
        num_boxes: Sequence[int] | int = (10, 40),
        box_size_min: Sequence[int] = (8, 8, 8),
        box_size_max: Sequence[int] = (80, 80, 40),
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(background_key, foreground_key, label_key, allow_missing_keys)
        self.fusion = RandVolumeFusion(num_levels, num_boxes, box_size_min, box_size_max, prob)


class RandVolumeFusionGridd(_FusionDictBase):
    """Dictionary form of :class:`~misfm_transforms.fusion.RandVolumeFusionGrid` (VF-v2, block grid).

    Example::

        Compose([RandPairCropForVolumeFusiond("image", foreground_key="foreground", spatial_size=(128, 128, 64)),
                 RandVolumeFusionGridd(background_key="image", foreground_key="foreground", label_key="label")])
    """

    def __init__(
        self,
        background_key: str = "image",
        foreground_key: str = "foreground",
        label_key: str = "label",
        num_levels: int = 4,
        foreground_ratio: float = 0.7,
        block_size_min: Sequence[int] = (8, 8, 8),
        block_size_max: Sequence[int] = (32, 32, 32),
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(background_key, foreground_key, label_key, allow_missing_keys)
        self.fusion = RandVolumeFusionGrid(num_levels, foreground_ratio, block_size_min, block_size_max, prob)


class RandPairCropForVolumeFusiond(Randomizable, MapTransform):
    """Dictionary form of :class:`~misfm_transforms.pair_crop.RandPairCropForVolumeFusion`.

    For each key, patch 1 (foreground) goes to the matching ``foreground_key`` and patch 2 (background)
    replaces the key's entry. All keys share one random draw (made from the first key's shape). The default
    ``spatial_size`` is the paper's patch in MONAI's ``(x, y, z)`` order.

    Example::

        RandPairCropForVolumeFusiond(keys="image", foreground_key="foreground", spatial_size=(128, 128, 64))
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        foreground_key: str | Sequence[str] = "foreground",
        spatial_size: Sequence[int] = (128, 128, 64),
        scale_range: Sequence[float] | Sequence[Sequence[float]] = ((0.7, 1.5), (0.7, 1.5), (0.7, 1.5)),
        flip: bool = True,
        intensity_augment: bool = True,
        invert_prob: float = 0.25,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        fg_keys = [foreground_key] if isinstance(foreground_key, str) else list(foreground_key)
        if len(fg_keys) != len(self.keys):
            raise ValueError(f"need one foreground_key per key: keys {self.keys}, foreground_key {fg_keys}.")
        self.foreground_keys = dict(zip(self.keys, fg_keys))
        self.cropper = RandPairCropForVolumeFusion(spatial_size, scale_range, flip, intensity_augment, invert_prob)

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandPairCropForVolumeFusiond:
        super().set_random_state(seed, state)
        self.cropper.set_random_state(seed, state)
        return self

    def randomize(self, data: NdarrayOrTensor) -> None:
        """Draw the crops for an image ``data`` of shape ``(C, X, Y, Z)``."""
        self.cropper.randomize(data.shape[1:])

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        first = True
        for key in self.key_iterator(d):
            if first:
                self.randomize(d[key])
                first = False
            d[self.foreground_keys[key]], d[key] = self.cropper(d[key], randomize=False)
        return d


RandVolumeFusionD = RandVolumeFusionDict = RandVolumeFusiond
RandVolumeFusionGridD = RandVolumeFusionGridDict = RandVolumeFusionGridd
RandPairCropForVolumeFusionD = RandPairCropForVolumeFusionDict = RandPairCropForVolumeFusiond
