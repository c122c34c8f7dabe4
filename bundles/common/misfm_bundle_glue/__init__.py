"""Glue shared by the MIS-FM MONAI bundles: input checks, checkpoint loading, engines pieces, datasets.

In this repository each bundle's ``<bundle>_lib`` package is a shim re-exporting this module; ``bundles/build.py``
vendors this package, ``misfm_nets`` and ``misfm_transforms`` into ``<bundle>_lib`` inside the released zip so the
bundle runs without this repository (imports are rewritten to the vendored copies).
"""

from misfm_nets import LoadReport, PCTNet, load_pretrained
from misfm_transforms import (
    RandPairCropForVolumeFusiond,
    RandVolumeFusiond,
    RandVolumeFusionGridd,
    volume_fusion_batch,
)

from .checks import check_config, check_datalist, check_fusion_options, load_datalist
from .data import VolumePairDataset
from .engines import DeepSupervisionSlidingWindowInferer, VolumeFusionPrepareBatch, sync_batchnorm
from .handlers import PerClassMetricsWriter, load_pretrained_weights
from .resume import AtomicCheckpointSaver, TrainingCheckpointer, atomic_torch_save

__all__ = [
    "PCTNet",
    "LoadReport",
    "load_pretrained",
    "RandVolumeFusiond",
    "RandVolumeFusionGridd",
    "RandPairCropForVolumeFusiond",
    "volume_fusion_batch",
    "check_datalist",
    "check_config",
    "check_fusion_options",
    "load_datalist",
    "VolumePairDataset",
    "DeepSupervisionSlidingWindowInferer",
    "VolumeFusionPrepareBatch",
    "sync_batchnorm",
    "PerClassMetricsWriter",
    "load_pretrained_weights",
    "TrainingCheckpointer",
    "AtomicCheckpointSaver",
    "atomic_torch_save",
]
