"""Convolutional building blocks of PCT-Net.

All blocks are "pre-activation" (BatchNorm -> PReLU -> Conv) with one shared PReLU parameter, as in the original
MIS-FM code, and plain ``nn.Sequential`` s of stock layers. Where :func:`misfm_nets.fast_cpu.active` says so
(float32 CPU training, see ``PCTNet(fast_cpu_kernels=...)``) each triple is computed by
:func:`~misfm_nets.fast_cpu.pre_activation_conv` instead, which keeps only its input for backward. The
``nn.Sequential`` layouts fix the state-dict names
(``conv_conv.{0,1,2,3,4,6}``, ``conv.{0,1,2}``, ``up.{0,1,2}``), which must not change or the published checkpoint
stops loading.

Every block works on ``(N, C, D, H, W)`` tensors with D the slice axis. ``dim=2`` means "in-plane only":
kernels ``[1, 3, 3]`` and pooling/up-sampling factors ``[1, 2, 2]``, which leave the slice axis untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from . import fast_cpu
from .fast_cpu import FastCPUModule

__all__ = ["ConvBlock", "ConvLayer", "DownSample", "UpCatBlock"]


def _kernel(dim: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(kernel, padding) of a 'same'-size convolution: 3D ``3x3x3`` or in-plane ``1x3x3``."""
    if dim == 3:
        return (3, 3, 3), (1, 1, 1)
    if dim == 2:
        return (1, 3, 3), (0, 1, 1)
    raise ValueError(f"dim must be 2 (in-plane) or 3, got {dim}.")


def _factor(dim: int) -> tuple[int, int, int]:
    """Down/up-sampling factor: 3D ``2x2x2`` or in-plane ``1x2x2``."""
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 (in-plane) or 3, got {dim}.")
    return (2, 2, 2) if dim == 3 else (1, 2, 2)


def _pre_activation_conv(in_channels: int, out_channels: int, kernel, padding) -> list[nn.Module]:
    return [nn.BatchNorm3d(in_channels), nn.PReLU(), nn.Conv3d(in_channels, out_channels, kernel, padding=padding)]


class ConvBlock(FastCPUModule):
    """Two pre-activation convolutions, no residual: ``(N, C_in, D, H, W) -> (N, C_out, D, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, dim: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        kernel, padding = _kernel(dim)
        self.conv_conv = nn.Sequential(
            *_pre_activation_conv(in_channels, out_channels, kernel, padding),
            nn.BatchNorm3d(out_channels),
            nn.PReLU(),
            nn.Dropout(dropout),
            nn.Conv3d(out_channels, out_channels, kernel, padding=padding),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast(x):
            return self.conv_conv(x)
        norm1, act1, conv1, norm2, act2, drop, conv2 = self.conv_conv
        h = fast_cpu.pre_activation_conv(norm1, act1, conv1, x)
        return fast_cpu.pre_activation_conv(norm2, act2, conv2, h, drop)


class DownSample(FastCPUModule):
    """Max-pooling by 2 (3D or in-plane), then one pre-activation convolution."""

    def __init__(self, in_channels: int, out_channels: int, down_dim: int = 3, conv_dim: int = 3) -> None:
        super().__init__()
        factor = _factor(down_dim)
        kernel, padding = _kernel(conv_dim)
        self.down = nn.MaxPool3d(factor, stride=factor)
        self.conv = nn.Sequential(*_pre_activation_conv(in_channels, out_channels, kernel, padding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return fast_cpu.pre_activation_conv(*self.conv, x) if self._fast(x) else self.conv(x)


class UpCatBlock(FastCPUModule):
    """Up-sample the coarse map, concatenate it after the skip map, fuse with one convolution.

    ``forward(x_low (N, C_low, D, H, W), x_high (N, C_high, D/f, H/f, W/f)) -> (N, C_low, D, H, W)``.
    """

    def __init__(self, low_channels: int, high_channels: int, up_dim: int = 3, conv_dim: int = 3) -> None:
        super().__init__()
        factor = _factor(up_dim)
        kernel, padding = _kernel(conv_dim)
        self.up = nn.Sequential(
            nn.BatchNorm3d(high_channels),
            nn.PReLU(),
            nn.ConvTranspose3d(high_channels, low_channels, kernel_size=factor, stride=factor),
        )
        self.conv = nn.Sequential(*_pre_activation_conv(2 * low_channels, low_channels, kernel, padding))

    def forward(self, x_low: torch.Tensor, x_high: torch.Tensor) -> torch.Tensor:
        if not self._fast(x_high):
            return self.conv(torch.cat([x_low, self.up(x_high)], dim=1))
        x = torch.cat([x_low, fast_cpu.pre_activation_conv(*self.up, x_high)], dim=1)
        return fast_cpu.pre_activation_conv(*self.conv, x)


class ConvLayer(FastCPUModule):
    """Pre-activation ``1x1x1`` convolution, used as an output head."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(*_pre_activation_conv(in_channels, out_channels, 1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_cpu.pre_activation_conv(*self.conv, x) if self._fast(x) else self.conv(x)
