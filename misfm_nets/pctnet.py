"""PCT-Net: the parallel convolution + transformer network of MIS-FM (Wang et al. 2023, arXiv 2306.16925)."""

from __future__ import annotations

import contextlib
import functools
import numbers
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import fast_cpu
from .conv_blocks import ConvBlock, ConvLayer, DownSample, UpCatBlock
from .fast_cpu import FastCPUModule
from .swin import SwinLayer, WindowAttention

__all__ = ["PCTNet", "RESOLUTION_MODE_SCALES", "UPSTREAM_CONFIG_KEYS"]

# Down-sampling from the input to the transformer pyramid, per resolution mode, on (slice, row, column).
RESOLUTION_MODE_SCALES = ((4, 4, 4), (2, 4, 4), (1, 4, 4))
# Per mode: kernel dimension of (the first, the second) embedding level and its (first, second) pooling;
# 3 = isotropic, 2 = in-plane only (kernel 1x3x3, pooling 1x2x2).
_CONV_DIMS = ((3, 3), (2, 3), (2, 2))
_DOWN_DIMS = ((3, 3), (2, 3), (2, 2))
# How the original's constructor dict keys map to ours.
UPSTREAM_CONFIG_KEYS = {
    "in_chns": "in_channels",
    "class_num": "out_channels",
    "input_size": "input_size",
    "feature_chns": "feature_channels",
    "dropout": "dropout",
    "depths": "depths",
    "num_heads": "num_heads",
    "window_sizes": "window_sizes",
    "resolution_mode": "resolution_mode",
    "multiscale_pred": "deep_supervision",
}


@contextlib.contextmanager
def _frozen_norm_stats(module: nn.Module) -> Iterator[None]:
    """Undo the running-statistics update of every BatchNorm in ``module`` made inside the block.

    Checkpointing runs a segment's forward a second time during backward; without this, BatchNorm would count
    that batch twice and the running mean/var (so the eval-mode outputs) would differ from a plain run.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    saved = [[b.clone() for b in m.buffers()] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for b, old in zip(m.buffers(), buffers):
                    b.copy_(old)


def _checkpoint_contexts(module: nn.Module) -> Tuple[contextlib.AbstractContextManager, ...]:
    """(forward, recomputation) contexts of :func:`torch.utils.checkpoint.checkpoint` for ``module``."""
    return contextlib.nullcontext(), _frozen_norm_stats(module)


def _maybe_checkpoint(enabled: bool, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    """``module(*args)``, or the same through activation checkpointing (non-reentrant, RNG state preserved)."""
    if not (enabled and module.training and torch.is_grad_enabled()):
        return module(*args)
    if torch.compiler.is_compiling():
        # Compiled, the recomputation is part of the backward graph, which does not update the BatchNorm buffers
        # a second time (and torch.compile accepts no context_fn but a selective-checkpoint policy).
        return checkpoint(module, *args, use_reentrant=False)
    return checkpoint(module, *args, use_reentrant=False, context_fn=functools.partial(_checkpoint_contexts, module))


class PatchEmbedding(FastCPUModule):
    """Convolutional stem: ``x -> (x0 full res, x1 after one pooling, x2 after two poolings)``."""

    def __init__(
        self, in_channels: int, channels: Sequence[int], conv_dims: Sequence[int], down_dims: Sequence[int],
        dropout: Sequence[float],
    ) -> None:
        super().__init__()
        c0, c1, c2 = channels
        kernel, padding = ((3, 3, 3), 1) if conv_dims[0] == 3 else ((1, 3, 3), (0, 1, 1))
        self.proj = nn.Conv3d(in_channels, c0, kernel, padding=padding)
        self.conv0 = ConvBlock(c0, c0, conv_dims[0], dropout[0])
        self.conv1 = ConvBlock(c1, c1, conv_dims[1], dropout[1])
        self.down1 = DownSample(c0, c1, down_dims[0], conv_dims[1])
        self.down2 = DownSample(c1, c2, down_dims[1], 3)
        self.checkpointing = False

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        ckpt = self.checkpointing
        x = fast_cpu.forward(self.proj, x) if self._fast(x) else self.proj(x)
        x0 = _maybe_checkpoint(ckpt, self.conv0, x)
        x1 = _maybe_checkpoint(ckpt, self.conv1, self.down1(x0))
        return [x0, x1, self.down2(x1)]


class ConvTransBlock(FastCPUModule):
    """Parallel CNN and Swin branches summed: ``(B, C, S, H, W) -> (B, C, S, H, W)``; no identity skip."""

    def __init__(
        self, channels: int, input_resolution: Sequence[int], depth: int, num_heads: int, window_size: int,
        dropout: float, drop_path: float,
    ) -> None:
        super().__init__()
        self.conv = ConvBlock(channels, channels, 3, dropout)
        self.trans = SwinLayer(
            channels, input_resolution, depth, num_heads, window_size, drop=dropout, attn_drop=dropout,
            drop_path=drop_path,
        )
        self.pos_drop = nn.Dropout(dropout)
        # Present in the original (and so in its checkpoints) but never used; frozen so DDP needs no
        # find_unused_parameters.
        self.norm_layer = nn.LayerNorm(channels).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.permute(0, 2, 3, 4, 1)
        tokens = fast_cpu.forward(self.pos_drop, tokens) if self._fast(tokens) else self.pos_drop(tokens)
        return self.conv(x) + self.trans(tokens).permute(0, 4, 1, 2, 3)


class PyramidConvTrans(nn.Module):
    """Three-level encoder-decoder of :class:`ConvTransBlock` s at 1, 1/2 and 1/4 of the pyramid resolution.

    ``forward(x2) -> [d2, d3]`` (decoder maps at 1 and 1/2 of the pyramid resolution).
    """

    def __init__(
        self, channels: Sequence[int], resolution: Sequence[int], depths: Sequence[int], num_heads: Sequence[int],
        window_sizes: Sequence[int], dropout: Sequence[float], out_channels: int, drop_path: float,
    ) -> None:
        super().__init__()
        c2, c3, c4 = channels
        r2 = list(resolution)
        r3 = [r // 2 for r in r2]
        r4 = [r // 2 for r in r3]

        def block(level: int, res: Sequence[int]) -> ConvTransBlock:
            return ConvTransBlock(
                channels[level], res, depths[level], num_heads[level], window_sizes[level], dropout[level], drop_path
            )

        self.down3 = DownSample(c2, c3)
        self.down4 = DownSample(c3, c4)
        self.up3 = UpCatBlock(c2, c3)
        self.up4 = UpCatBlock(c3, c4)
        self.convtrans_e2 = block(0, r2)
        self.convtrans_d2 = block(0, r2)
        self.convtrans_e3 = block(1, r3)
        self.convtrans_d3 = block(1, r3)
        self.convtrans_e4 = block(2, r4)
        self.out_conv2 = ConvLayer(c2, out_channels)
        self.out_conv3 = ConvLayer(c3, out_channels)
        self.checkpointing = False

    def forward(self, x2: torch.Tensor) -> List[torch.Tensor]:
        ckpt = self.checkpointing
        e2 = _maybe_checkpoint(ckpt, self.convtrans_e2, x2)
        e3 = _maybe_checkpoint(ckpt, self.convtrans_e3, self.down3(e2))
        e4 = _maybe_checkpoint(ckpt, self.convtrans_e4, self.down4(e3))
        d3 = _maybe_checkpoint(ckpt, self.convtrans_d3, self.up4(e3, e4))
        d2 = _maybe_checkpoint(ckpt, self.convtrans_d2, self.up3(e2, d3))
        return [d2, d3]


class PredictionHead(nn.Module):
    """Decoder from the pyramid output back to full resolution: ``(x0, x1, d2) -> (out, out_1/2)``."""

    def __init__(
        self, channels: Sequence[int], out_channels: int, conv_dims: Sequence[int], down_dims: Sequence[int],
        dropout: Sequence[float],
    ) -> None:
        super().__init__()
        c0, c1, c2 = channels
        self.up1 = UpCatBlock(c0, c1, down_dims[0], conv_dims[0])
        self.up2 = UpCatBlock(c1, c2, down_dims[1], conv_dims[1])
        self.conv0 = ConvBlock(c0, c0, conv_dims[0], dropout[0])
        self.conv1 = ConvBlock(c1, c1, conv_dims[1], dropout[1])
        self.out_conv0 = ConvLayer(c0, out_channels)
        self.out_conv1 = ConvLayer(c1, out_channels)
        self.checkpointing = False

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, d2: torch.Tensor) -> List[torch.Tensor]:
        ckpt = self.checkpointing
        d1 = _maybe_checkpoint(ckpt, self.conv1, _maybe_checkpoint(ckpt, self.up2, x1, d2))
        d0 = _maybe_checkpoint(ckpt, self.conv0, _maybe_checkpoint(ckpt, self.up1, x0, d1))
        return [d0, d1]


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):  # a config string "false" would otherwise be truthy
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__}).")
    return value


def _check_ints(name: str, values: Sequence[int], length: int, minimum: int = 1) -> Tuple[int, ...]:
    values = tuple(values)
    if len(values) != length:
        raise ValueError(f"{name} needs {length} values, got {values}.")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
            raise ValueError(f"{name} must hold integers >= {minimum}, got {values}.")
    return tuple(int(v) for v in values)


class PCTNet(nn.Module):
    """PCT-Net from MIS-FM, with the original's state-dict layout (the published checkpoint loads unchanged).

    A convolutional stem, a 3-level pyramid whose blocks run a CNN branch and a shifted-window transformer
    branch in parallel, and a convolutional prediction head. Three stems/heads exist for the three
    ``resolution_mode`` s (0: isotropic, 1: first pooling in-plane only, 2: both in-plane only); only the selected
    pair is used, the others are kept (frozen) so checkpoints of any mode load. All layers are stock PyTorch
    modules (``nn.Conv3d``, ``nn.BatchNorm3d``, ``nn.PReLU``, ``nn.Dropout``, ...).

    Args:
        in_channels: input channels (1 for CT).
        out_channels: number of classes (background included).
        input_size: the patch size the transformer was built for, in the input's axis order (see ``axis_order``).
            It fixes the attention windows (a window larger than a pyramid level is clamped to it); any other
            input whose sides are multiples of :attr:`size_divisor` also works.
        feature_channels: widths of the 5 levels (stem full, stem 1/2, pyramid 1, 1/2, 1/4).
        dropout: dropout per level (the pyramid levels also use it for attention and MLP dropout).
        depths, num_heads, window_sizes: Swin depth, heads and cubic window per pyramid level; each pyramid width
            must be divisible by its number of heads.
        resolution_mode: 0, 1 or 2; the down-sampling to the pyramid is (4,4,4), (2,4,4) or (1,4,4)
            on (slice, row, column).
        deep_supervision: in training mode, return the ``[full, 1/2, 1/4, 1/8]``-resolution logits, the order
            :class:`monai.losses.DeepSupervisionLoss` expects; in eval mode only the full-resolution logits (as
            MONAI's ``DynUNet``), so inferers and metrics need nothing special. :meth:`forward_all_heads` gives
            the four in any mode.
        axis_order: ``"zyx"`` (the original, ``(N, C, D, H, W)`` with D the slice axis) or ``"xyz"`` for volumes
            as MONAI's ``LoadImage`` gives them ``(N, C, X, Y, Z)``; inputs and outputs are then transposed
            inside the network, so MONAI pipelines, inferers and ``Invertd`` need no extra transform.
        drop_path: stochastic-depth rate of every Swin block (the original uses the constant 0.2).
        checkpointing: activation checkpointing in training. ``True``: every ConvTransBlock of the pyramid and
            every ConvBlock / UpCatBlock of the stem and head keeps only its input and recomputes its inside
            during backward (least memory, most time). ``"attention"``: only the attention probabilities of the
            windowed attention with dropout (CPU training) are not kept but recomputed in backward (one product
            and one softmax per block). Same outputs, gradients and BatchNorm statistics as without.
        channels_last: run the convolutions in ``torch.channels_last_3d`` layout (input converted inside,
            outputs returned contiguous). Same results up to float rounding in eval mode; in training the
            dropout masks are drawn in memory order, so they differ from the contiguous run's (as PyTorch's own
            dropout may). The transformer tokens then need no layout copy.
        fast_cpu_kernels: the switch for :mod:`misfm_nets.fast_cpu`, faster and leaner kernels for float32 CPU
            training: oneDNN for the small convolutions PyTorch would send to its im2col kernel, 1-byte dropout
            masks (``p`` rounded to a multiple of 2**-15, drawn from torch's generator in another order than
            ``nn.Dropout``), BatchNorm-PReLU-conv triples, attention and transformer MLPs that keep only what
            backward cannot cheaply recompute. ``None`` (default, auto): used in float32 CPU training outside
            autocast on the tested torch versions (``fast_cpu.TESTED_TORCH_VERSIONS``); ``True``: on any torch
            version; ``False``: never. Whatever the setting, eval mode, CUDA, other dtypes, ``torch.compile``,
            ``torch.export`` and ``torch.jit`` run the stock modules. The same function and gradients (float
            rounding apart), and the same state dict.

    Shapes: ``(N, in_channels, *spatial) -> (N, out_channels, *spatial)``, ``*spatial`` in ``axis_order``; with
    deep supervision in training, a list of 4 such tensors at 1, 1/2, 1/4 and 1/8 of the pyramid's scale.

    ``torch.compile(net, fullgraph=True)``, ``torch.jit.trace`` and ``torch.export.export`` work (training and
    eval, with or without ``checkpointing``); a trace holds no device constant.

    Example::

        >>> net = PCTNet(1, 14, input_size=(128, 128, 64), axis_order="xyz", deep_supervision=True)
        >>> net.size_divisor
        (16, 16, 8)
        >>> [o.shape[2:] for o in net.train()(torch.zeros(2, 1, 128, 128, 64))][:2]
        [torch.Size([128, 128, 64]), torch.Size([64, 64, 32])]
        >>> net.eval()(torch.zeros(1, 1, 128, 128, 64)).shape
        torch.Size([1, 14, 128, 128, 64])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        input_size: Sequence[int],
        feature_channels: Sequence[int] = (24, 48, 128, 256, 512),
        dropout: Sequence[float] = (0.0, 0.0, 0.2, 0.2, 0.2),
        depths: Sequence[int] = (2, 2, 2),
        num_heads: Sequence[int] = (4, 8, 16),
        window_sizes: Sequence[int] = (6, 6, 6),
        resolution_mode: int = 1,
        deep_supervision: bool = False,
        axis_order: str = "zyx",
        drop_path: float = 0.2,
        checkpointing: Union[bool, str] = False,
        channels_last: bool = False,
        fast_cpu_kernels: Optional[bool] = None,
    ) -> None:
        super().__init__()
        (in_channels,) = _check_ints("in_channels", (in_channels,), 1)
        (out_channels,) = _check_ints("out_channels", (out_channels,), 1)
        input_size = _check_ints("input_size", input_size, 3)
        feature_channels = _check_ints("feature_channels", feature_channels, 5)
        depths = _check_ints("depths", depths, 3, minimum=0)
        num_heads = _check_ints("num_heads", num_heads, 3)
        window_sizes = _check_ints("window_sizes", window_sizes, 3)
        if len(dropout) != 5 or not all(0.0 <= p <= 1.0 for p in dropout):
            raise ValueError(f"dropout needs 5 probabilities in [0, 1], got {tuple(dropout)}.")
        for channels, heads in zip(feature_channels[2:], num_heads):
            if channels % heads:
                raise ValueError(
                    f"each pyramid width must be divisible by its num_heads: feature_channels[2:] "
                    f"{feature_channels[2:]}, num_heads {num_heads}."
                )
        if resolution_mode not in (0, 1, 2):
            raise ValueError(f"resolution_mode must be 0, 1 or 2, got {resolution_mode}.")
        if axis_order not in ("zyx", "xyz"):
            raise ValueError(f"axis_order must be 'zyx' (slice axis first) or 'xyz' (MONAI), got {axis_order!r}.")
        self.resolution_mode = resolution_mode
        self.deep_supervision = _check_bool("deep_supervision", deep_supervision)
        self.transpose = axis_order == "xyz"
        size_zyx = list(input_size)[::-1] if self.transpose else list(input_size)
        scale = RESOLUTION_MODE_SCALES[resolution_mode]
        divisor_zyx = [s * 4 for s in scale]
        if any(size % div for size, div in zip(size_zyx, divisor_zyx)):
            raise ValueError(
                f"input_size {tuple(input_size)} ({axis_order}) must be divisible by "
                f"{tuple(divisor_zyx[::-1] if self.transpose else divisor_zyx)} for resolution_mode {resolution_mode}."
            )
        self.size_divisor = tuple(divisor_zyx[::-1] if self.transpose else divisor_zyx)
        stem_channels = list(feature_channels[:3])
        self.embeddings = nn.ModuleList(
            PatchEmbedding(in_channels, stem_channels, _CONV_DIMS[m], _DOWN_DIMS[m], dropout[:2]) for m in range(3)
        )
        self.pyramid_ct = PyramidConvTrans(
            feature_channels[2:], [s // f for s, f in zip(size_zyx, scale)], depths, num_heads, window_sizes,
            dropout[2:], out_channels, drop_path,
        )
        self.pred_heads = nn.ModuleList(
            PredictionHead(stem_channels, out_channels, _CONV_DIMS[m], _DOWN_DIMS[m], dropout[:2]) for m in range(3)
        )
        self._freeze_unused()
        self.checkpointing = checkpointing
        self.channels_last = channels_last
        self.fast_cpu_kernels = fast_cpu_kernels

    @property
    def checkpointing(self) -> Union[bool, str]:
        return self._checkpointing

    @checkpointing.setter
    def checkpointing(self, value: Union[bool, str]) -> None:
        if not (isinstance(value, bool) or value == "attention"):
            raise ValueError(f"checkpointing must be True, False or 'attention', got {value!r}.")
        self._checkpointing = value
        for module in (*self.embeddings, self.pyramid_ct, *self.pred_heads):
            module.checkpointing = value is True
        for module in self.modules():
            if isinstance(module, WindowAttention):
                module.recompute_attention = value == "attention"

    @property
    def channels_last(self) -> bool:
        return self._channels_last

    @channels_last.setter
    def channels_last(self, enabled: bool) -> None:
        # Only 5-D tensors (conv weights) change layout; names, shapes and values of the state dict do not.
        self._channels_last = _check_bool("channels_last", enabled)
        self.to(memory_format=torch.channels_last_3d if enabled else torch.contiguous_format)

    @property
    def fast_cpu_kernels(self) -> Optional[bool]:
        return self._fast_cpu_kernels

    @fast_cpu_kernels.setter
    def fast_cpu_kernels(self, value: Optional[bool]) -> None:
        if value is not None:
            _check_bool("fast_cpu_kernels", value)
        self._fast_cpu_kernels = value
        for module in self.modules():
            if isinstance(module, FastCPUModule):
                module.fast_cpu_kernels = value

    def _freeze_unused(self) -> None:
        """Stems/heads of other modes (and deep-supervision heads when off) get no gradient: freeze them."""
        for mode in range(3):
            if mode != self.resolution_mode:
                self.embeddings[mode].requires_grad_(False)
                self.pred_heads[mode].requires_grad_(False)
        if not self.deep_supervision:
            self.pred_heads[self.resolution_mode].out_conv1.requires_grad_(False)
            self.pyramid_ct.out_conv2.requires_grad_(False)
            self.pyramid_ct.out_conv3.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        """``x (N, in_channels, *spatial)`` -> logits ``(N, out_channels, *spatial)``; with ``deep_supervision``
        in training mode the list ``[full, 1/2, 1/4, 1/8]`` (see the class docstring)."""
        if self.deep_supervision and self.training:
            return self._heads(x, every_head=True)
        return self._heads(x, every_head=False)[0]

    def forward_all_heads(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The four heads' logits ``[full, 1/2, 1/4, 1/8]`` in the current mode (e.g. to look at the coarse heads
        of a deep-supervision network in eval mode). Without ``deep_supervision`` the three coarse heads are
        frozen at their initialisation (or the checkpoint's values)."""
        return self._heads(x, every_head=True)

    def _heads(self, x: torch.Tensor, every_head: bool) -> List[torch.Tensor]:
        if x.dim() != 5:
            raise ValueError(f"PCTNet expects a 5-D (N, C, *spatial) tensor, got shape {tuple(x.shape)}.")
        for size, div in zip(x.shape[2:], self.size_divisor):
            if not torch.jit.is_tracing() and size % div:  # a trace is made for (and fixed to) one shape
                raise ValueError(
                    f"PCTNet input spatial shape {tuple(x.shape[2:])} must be divisible by {self.size_divisor}; "
                    "pad it (e.g. monai.transforms.DivisiblePad) or use sliding-window inference."
                )
        if self.transpose:
            x = x.permute(0, 1, 4, 3, 2)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        x0, x1, x2 = self.embeddings[self.resolution_mode](x)
        d2, d3 = self.pyramid_ct(x2)
        head = self.pred_heads[self.resolution_mode]
        d0, d1 = head(x0, x1, d2)
        outs = [head.out_conv0(d0)]
        if every_head:
            outs += [head.out_conv1(d1), self.pyramid_ct.out_conv2(d2), self.pyramid_ct.out_conv3(d3)]
        if self.transpose:
            outs = [o.permute(0, 1, 4, 3, 2) for o in outs]
        if self._channels_last:
            outs = [o.contiguous() for o in outs]
        return outs
