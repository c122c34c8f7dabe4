"""Code shared by the MIS-FM MONAI bundles: checks, loading, weights, engine pieces, datasets, resume.

Installed with misfm. Each bundle reaches it through its own package ``<bundle>_lib`` (in the repository a
re-export of this one; in a released zip a vendored copy of it, ``misfm_nets`` and ``misfm_transforms``), which
``python -m monai.bundle run`` can import because it puts the bundle folder on ``sys.path``.
"""

from misfm_nets import LoadReport, PCTNet, load_pretrained
from misfm_transforms import (
    RandPairCropForVolumeFusiond,
    RandVolumeFusiond,
    RandVolumeFusionGridd,
    volume_fusion_batch,
)

from .checks import (
    check_batches,
    check_config,
    check_datalist,
    check_fusion_options,
    check_output_folders,
    flag,
    load_datalist,
)
from .data import SeededDataset, VolumePairDataset
from .engines import VolumeFusionPrepareBatch, sync_batchnorm
from .handlers import HausdorffDistanceMM, PerClassMetricsWriter, RunRecord
from .loading import LoadCheckedImaged
from .resume import AtomicCheckpointSaver, TrainingCheckpointer, atomic_torch_save
from .runtime import EvaluationSampler, output_root, select_training_cases, setup_process
from .weights import CheckedCheckpointLoader, file_sha256, load_pretrained_weights

__all__ = [
    "PCTNet",
    "LoadReport",
    "load_pretrained",
    "RandVolumeFusiond",
    "RandVolumeFusionGridd",
    "RandPairCropForVolumeFusiond",
    "volume_fusion_batch",
    "flag",
    "load_datalist",
    "check_datalist",
    "check_config",
    "check_fusion_options",
    "check_output_folders",
    "check_batches",
    "LoadCheckedImaged",
    "SeededDataset",
    "VolumePairDataset",
    "VolumeFusionPrepareBatch",
    "sync_batchnorm",
    "PerClassMetricsWriter",
    "HausdorffDistanceMM",
    "load_pretrained_weights",
    "CheckedCheckpointLoader",
    "file_sha256",
    "TrainingCheckpointer",
    "AtomicCheckpointSaver",
    "atomic_torch_save",
    "setup_process",
    "EvaluationSampler",
    "output_root",
    "select_training_cases",
    "RunRecord",
]
