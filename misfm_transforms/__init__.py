"""MONAI transforms for MIS-FM Volume Fusion pretraining (VF-v1 random boxes, VF-v2 block grid)."""

from .batch import volume_fusion_batch
from .dictionary import (
    RandPairCropForVolumeFusionD,
    RandPairCropForVolumeFusiond,
    RandPairCropForVolumeFusionDict,
    RandVolumeFusionD,
    RandVolumeFusiond,
    RandVolumeFusionDict,
    RandVolumeFusionGridD,
    RandVolumeFusionGridd,
    RandVolumeFusionGridDict,
)
from .fusion import RandVolumeFusion, RandVolumeFusionGrid, fuse_volumes
from .pair_crop import RandPairCropForVolumeFusion, adaptive_contrast, gamma_correction, resize_linear

__all__ = [
    "fuse_volumes",
    "RandVolumeFusion",
    "RandVolumeFusionGrid",
    "RandPairCropForVolumeFusion",
    "resize_linear",
    "adaptive_contrast",
    "gamma_correction",
    "volume_fusion_batch",
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
