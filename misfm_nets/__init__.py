"""PCT-Net for MONAI, state-dict compatible with the original MIS-FM code."""

from .pctnet import PCTNet

__all__ = ["PCTNet"]
