"""Convolutional building blocks of PCT-Net.

All blocks are "pre-activation" (BatchNorm -> PReLU -> Conv) with one shared PReLU parameter, as in the original
MIS-FM code; :func:`~misfm_nets.fast_cpu.pre_activation_conv` computes each such triple (in CPU training it keeps
only the block input for backward). Their ``nn.Sequential`` layouts fix the state-dict names
(``conv_conv.{0,1,2,3,4,6}``, ``conv.{0,1,2}``, ``up.{0,1,2}``), which must not change or the published checkpoint
stops loading.

Every block works on ``(N, C, D, H, W)`` tensors with D the slice axis. ``dim=2`` means "in-plane only":
kernels ``[1, 3, 3]`` and pooling/up-sampling factors ``[1, 2, 2]``, which leave the slice axis untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from .fast_cpu import Conv3d, Dropout, PReLU, pre_activation_conv

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
    return [nn.BatchNorm3d(in_channels), PReLU(), Conv3d(in_channels, out_channels, kernel, padding=padding)]


class ConvBlock(nn.Module):
    """Two pre-activation convolutions, no residual: ``(N, C_in, D, H, W) -> (N, C_out, D, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, dim: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        kernel, padding = _kernel(dim)
        self.conv_conv = nn.Sequential(
            *_pre_activation_conv(in_channels, out_channels, kernel, padding),
            nn.BatchNorm3d(out_channels),
            PReLU(),
            Dropout(dropout),
            Conv3d(out_channels, out_channels, kernel, padding=padding),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm1, act1, conv1, norm2, act2, drop, conv2 = self.conv_conv
        return pre_activation_conv(norm2, act2, conv2, pre_activation_conv(norm1, act1, conv1, x), drop)


class DownSample(nn.Module):
    """Max-pooling by 2 (3D or in-plane), then one pre-activation convolution."""

    def __init__(self, in_channels: int, out_channels: int, down_dim: int = 3, conv_dim: int = 3) -> None:
        super().__init__()
        factor = _factor(down_dim)
        kernel, padding = _kernel(conv_dim)
        self.down = nn.MaxPool3d(factor, stride=factor)
        self.conv = nn.Sequential(*_pre_activation_conv(in_channels, out_channels, kernel, padding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pre_activation_conv(*self.conv, self.down(x))


class UpCatBlock(nn.Module):
    """Up-sample the coarse map, concatenate it after the skip map, fuse with one convolution.

    ``forward(x_low (N, C_low, D, H, W), x_high (N, C_high, D/f, H/f, W/f)) -> (N, C_low, D, H, W)``.
    """

    def __init__(self, low_channels: int, high_channels: int, up_dim: int = 3, conv_dim: int = 3) -> None:
        super().__init__()
        factor = _factor(up_dim)
        kernel, padding = _kernel(conv_dim)
        self.up = nn.Sequential(
            nn.BatchNorm3d(high_channels),
            PReLU(),
            nn.ConvTranspose3d(high_channels, low_channels, kernel_size=factor, stride=factor),
        )
        self.conv = nn.Sequential(*_pre_activation_conv(2 * low_channels, low_channels, kernel, padding))

    def forward(self, x_low: torch.Tensor, x_high: torch.Tensor) -> torch.Tensor:
        return pre_activation_conv(*self.conv, torch.cat([x_low, pre_activation_conv(*self.up, x_high)], dim=1))


class ConvLayer(nn.Module):
    """Pre-activation ``1x1x1`` convolution, used as an output head."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(*_pre_activation_conv(in_channels, out_channels, 1, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pre_activation_conv(*self.conv, x)
