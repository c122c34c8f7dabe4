"""PCT-Net for MONAI, state-dict compatible with the original MIS-FM code, and its checkpoint loader."""

from .pctnet import PCTNet
from .pretrained import LoadReport, load_pretrained

__all__ = ["PCTNet", "LoadReport", "load_pretrained"]
