"""Drop-in replacements that give PCT-Net's float32 CPU training PyTorch's fast kernels and compact masks.

Each computes the same function as the PyTorch layer it replaces and keeps its parameters and state-dict names;
they differ only on the CPU in float32 outside autocast and tracing (elsewhere they call the stock code):

- :class:`Conv3d`: PyTorch sends a float32 convolution of one sample with ``N*C*D*H <= 20480`` to its im2col
  ``slow_conv3d`` kernel, 4-30x slower than oneDNN on PCT-Net's 3x3x3 shapes. The same convolution as two
  groups over ``[x, x]`` is routed to oneDNN (PyTorch always uses oneDNN for ``groups > 1``). A pointwise
  (1x1x1) convolution runs as one batched matrix product, ~5x faster than either convolution kernel.
- :class:`Dropout` / :func:`dropout`: PyTorch's CPU dropout draws a float32 Bernoulli mask (slow) and keeps it
  (4 bytes per element) for backward. Here the mask is 15-bit integers against a threshold, kept as bool
  (1 byte per element); ``p`` is rounded to a multiple of ``2**-15`` and the kept values scaled by the exact
  inverse keep probability, so the expectation is unchanged.
- :func:`window_attention`: ``dropout(softmax(q k^T * scale + bias + mask)) @ v`` keeping only the
  probabilities and the bool mask for backward (autograd would keep the probabilities, the float mask and the
  dropped matrix), or with ``recompute`` only the mask (one product and one softmax recomputed in backward).
- :func:`pre_activation_conv`: PCT-Net's ``conv(dropout(prelu(batch_norm(x))))`` keeping only ``x`` for backward
  (autograd would keep ``x``, the normalised and the activated tensors); the two are recomputed in backward from
  the saved batch statistics, which costs two elementwise passes and no convolution.

Figures: ``benchmarks/README.md`` (``bench_pctnet.py``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["Conv3d", "Dropout", "dropout", "pre_activation_conv", "uses_fast_cpu_path", "window_attention"]

_MASK_LEVELS = 2**15  # dropout draws are 15-bit integers, uniform on [0, 2**15)
_SLOW_CONV3D_MAX = 20480  # PyTorch's N*C*D*H bound under which a batch-1 float32 conv takes slow_conv3d


def uses_fast_cpu_path(x: torch.Tensor) -> bool:
    """True where these layers replace the stock kernels: float32 CPU tensor, no CPU autocast, not tracing."""
    return (
        x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_tracing() and not torch.jit.is_scripting()
    )


def _drop_mask(shape: Tuple[int, ...], p: float, device: torch.device) -> Tuple[torch.Tensor, float]:
    """``(drop (bool, shape), scale)``: drop with probability ``p`` rounded to k / 2**15, and
    ``scale = 1 / P(keep)``. Drawn from torch's default generator, so ``torch.manual_seed`` fixes it.

    One 63-bit draw gives four 15-bit numbers (int64 ``random_`` viewed as int16, sign bits cleared): one draw
    per four elements. The mask is applied with ``masked_fill`` (in place where the tensor is ours): a
    float-by-bool product would cast the mask to a float temporary first.
    """
    threshold = round(p * _MASK_LEVELS)
    if threshold >= _MASK_LEVELS:
        return torch.ones(shape, dtype=torch.bool, device=device), 0.0
    numel = math.prod(shape)
    bits = torch.empty(-(-numel // 4), dtype=torch.int64, device=device).random_().view(torch.int16)[:numel]
    drop = bits.bitwise_and_(_MASK_LEVELS - 1) < threshold
    return drop.view(shape), _MASK_LEVELS / (_MASK_LEVELS - threshold)


class _MaskedScale(torch.autograd.Function):
    """``x`` with the ``drop`` entries zeroed, times ``scale``; only the bool mask is saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, drop: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(drop)
        ctx.scale = scale
        return x.masked_fill(drop, 0.0).mul_(scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (drop,) = ctx.saved_tensors
        return grad.masked_fill(drop, 0.0).mul_(ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """:func:`torch.nn.functional.dropout` with a bool mask on the CPU (see the module docstring)."""
    # The same draw with or without grad (a reentrant checkpoint runs the forward without, then again with it).
    if not training or p == 0.0 or not uses_fast_cpu_path(x):
        return F.dropout(x, p, training)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    drop, scale = _drop_mask(x.shape, p, x.device)
    return _MaskedScale.apply(x, drop, scale)


class Dropout(nn.Dropout):
    """:class:`torch.nn.Dropout` computed by :func:`dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training)


def _attention_probs(
    q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, mask: Optional[torch.Tensor], scale: float
) -> torch.Tensor:
    """``softmax(q k^T * scale + bias + mask)``: q, k ``(B, nW, h, N, d)``, bias ``(h, N, N)``, mask ``(nW, N, N)``."""
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    scores += bias
    if mask is not None:
        scores += mask.unsqueeze(1)
    return scores.softmax(-1)


class _WindowAttention(torch.autograd.Function):
    """``dropout(softmax(q k^T * scale + bias + mask)) @ v`` with a bool dropout mask. Backward keeps the
    probabilities, or with ``recompute`` only q, k, v and the mask: the probabilities are recomputed (one product
    and one softmax), nothing else."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, scale: float, p: float, recompute: bool):
        probs = _attention_probs(q, k, bias, mask, scale)
        drop, drop_scale = _drop_mask(probs.shape, p, probs.device)
        out = torch.matmul(probs.masked_fill(drop, 0.0), v).mul_(drop_scale)
        ctx.save_for_backward(q, k, v, bias, mask, drop, None if recompute else probs)
        ctx.scale, ctx.drop_scale = scale, drop_scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, bias, mask, drop, probs = ctx.saved_tensors
        if probs is None:
            probs = _attention_probs(q, k, bias, mask, ctx.scale)
        grad_out = grad_out * ctx.drop_scale
        grad_v = torch.matmul(probs.masked_fill(drop, 0.0).transpose(-2, -1), grad_out)
        grad_probs = torch.matmul(grad_out, v.transpose(-2, -1)).masked_fill_(drop, 0.0)
        grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        del grad_probs, probs
        grad_q = torch.matmul(grad_scores, k).mul_(ctx.scale)
        grad_k = torch.matmul(grad_scores.transpose(-2, -1), q).mul_(ctx.scale)
        grad_bias = grad_scores.sum(dim=tuple(range(grad_scores.dim() - 3))) if ctx.needs_input_grad[3] else None
        return grad_q, grad_k, grad_v, grad_bias, None, None, None, None


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, mask: Optional[torch.Tensor],
    scale: float, p: float, recompute: bool = False,
) -> torch.Tensor:
    """``dropout(softmax(q k^T * scale + bias + mask), p) @ v`` in training on the CPU (float32, ``p > 0``).

    q, k, v ``(B, nW, h, N, d)``, bias ``(h, N, N)``, mask ``(nW, N, N)`` or None (broadcast, never expanded)
    -> ``(B, nW, h, N, d)``. Backward keeps the probabilities and a bool mask (autograd would also keep a float
    mask and the dropped matrix); ``recompute=True`` keeps neither probabilities nor scores.
    """
    if mask is not None:
        mask = mask.to(q.dtype)
    return _WindowAttention.apply(q, k, v, bias.to(q.dtype), mask, scale, p, recompute)


def _routes_to_slow_conv3d(x: torch.Tensor, groups: int, kernel: Tuple[int, ...]) -> bool:
    """PyTorch's CPU heuristic (``ConvParams::use_mkldnn``) for a float32 3-D convolution with a kernel wider
    than 1x1 in its last two axes: oneDNN only for groups > 1, a kernel > 3 in both last axes, batch > 1 or
    ``N*C*D*H > 20480``."""
    n, c, d, h = x.shape[:4]
    return (
        groups == 1 and n == 1 and n * c * d * h <= _SLOW_CONV3D_MAX and not (kernel[-1] > 3 and kernel[-2] > 3)
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    )


class Conv3d(nn.Conv3d):
    """:class:`torch.nn.Conv3d` with its small and pointwise CPU cases on faster kernels (see module docstring)."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.padding_mode == "zeros" and x.dim() == 5 and uses_fast_cpu_path(x):
            if self.is_pointwise():
                return self._pointwise(x, weight, bias)
            if self.routes_to_onednn(x):
                # groups=2 over the input twice: each group computes half the output channels from all of x
                return F.conv3d(torch.cat([x, x], 1), weight, bias, self.stride, self.padding, self.dilation, 2)
        return super()._conv_forward(x, weight, bias)

    def routes_to_onednn(self, x: torch.Tensor) -> bool:
        """Whether this convolution of ``x`` runs as two groups (PyTorch would take ``slow_conv3d``)."""
        return (
            _routes_to_slow_conv3d(x, self.groups, self.kernel_size) and self.out_channels % 2 == 0
            and not self.is_pointwise()
        )

    def is_pointwise(self) -> bool:
        return (
            self.kernel_size == (1, 1, 1) and self.stride == (1, 1, 1) and self.groups == 1
            and isinstance(self.padding, tuple) and all(p == 0 for p in self.padding)
        )

    @staticmethod
    def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``(N, C_in, D, H, W) -> (N, C_out, D, H, W)`` as ``bias + W @ x`` per sample (layout kept)."""
        n, _, d, h, w = x.shape
        w2 = weight.flatten(1)  # (C_out, C_in)
        if x.is_contiguous():
            flat = x.view(n, -1, d * h * w)
            if bias is None:
                return torch.matmul(w2, flat).view(n, -1, d, h, w)
            return torch.baddbmm(bias.view(1, -1, 1).expand(n, -1, 1), w2.expand(n, -1, -1), flat).view(n, -1, d, h, w)
        # channels-last (or any other layout): a linear map of the channel axis
        return F.linear(x.permute(0, 2, 3, 4, 1), w2, bias).permute(0, 4, 1, 2, 3)


def _prelu_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``prelu(x, weight)`` with one shared slope: the input's is leaky ReLU's backward (a vectorised
    kernel, ~3x faster than PReLU's, which also materialises a full-size slope gradient), the slope's is
    ``sum(grad * min(x, 0))``."""
    grad_x = torch.ops.aten.leaky_relu_backward(grad, x, float(weight), False)
    if x.dim() == 5 and not x.is_contiguous():  # channels-last: pair the elements in memory order, no copy
        grad, x = grad.permute(0, 2, 3, 4, 1), x.permute(0, 2, 3, 4, 1)
    grad_w = torch.dot(grad.reshape(-1), x.clamp(max=0).reshape(-1)).view_as(weight)
    return grad_x, grad_w


class _PreActivationConv(torch.autograd.Function):
    """``conv(drop(prelu(batch_norm(x))))`` in training mode, keeping only ``x`` (and the batch statistics and
    the bool dropout mask) for backward. The normalised and activated tensors, which autograd would keep (two
    tensors the size of ``x``), are recomputed in backward from the saved statistics: one fused
    multiply-add and one PReLU; the convolution itself is not recomputed."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, act_weight, conv_weight, conv_bias, norm, conv, momentum, drop, scale):
        h, mean, invstd = torch.ops.aten.native_batch_norm(
            x, norm_weight, norm_bias, norm.running_mean, norm.running_var, True, momentum, norm.eps
        )
        h = F.prelu(h, act_weight)
        if drop is not None:
            h.masked_fill_(drop, 0.0).mul_(scale)
        ctx.routed = conv.routes_to_onednn(h)
        y = conv._conv_forward(h, conv_weight, conv_bias)
        ctx.save_for_backward(x, norm_weight, norm_bias, act_weight, conv_weight, mean, invstd, drop)
        ctx.conv, ctx.eps, ctx.scale, ctx.has_bias = conv, norm.eps, scale, conv_bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, norm_weight, norm_bias, act_weight, conv_weight, mean, invstd, drop = ctx.saved_tensors
        conv = ctx.conv
        shape = (1, -1) + (1,) * (x.dim() - 2)
        gain = invstd * norm_weight
        normed = torch.addcmul((norm_bias - mean * gain).view(shape), x, gain.view(shape))
        h_in, groups = F.prelu(normed, act_weight), conv.groups
        if drop is not None:
            h_in.masked_fill_(drop, 0.0).mul_(ctx.scale)
        if ctx.routed:
            h_in, groups = torch.cat([h_in, h_in], 1), 2
        grad_h, grad_cw, grad_cb = torch.ops.aten.convolution_backward(
            grad_y, h_in, conv_weight, [conv_weight.shape[0]] if ctx.has_bias else None, conv.stride, conv.padding,
            conv.dilation, False, [0] * len(conv.stride), groups, [True, ctx.needs_input_grad[4], ctx.has_bias],
        )
        del h_in
        if ctx.routed:
            half = grad_h.shape[1] // 2
            grad_h = grad_h[:, :half] + grad_h[:, half:]
        if drop is not None:
            grad_h.masked_fill_(drop, 0.0).mul_(ctx.scale)
        grad_normed, grad_aw = _prelu_backward(grad_h, normed, act_weight)
        del normed, grad_h
        grad_x, grad_nw, grad_nb = torch.ops.aten.native_batch_norm_backward(
            grad_normed, x, norm_weight, None, None, mean, invstd, True, ctx.eps,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]],
        )
        return grad_x, grad_nw, grad_nb, grad_aw, grad_cw, grad_cb, None, None, None, None, None


def pre_activation_conv(
    norm: nn.BatchNorm3d, act: nn.PReLU, conv: nn.Conv3d, x: torch.Tensor, drop: Optional[nn.Dropout] = None
) -> torch.Tensor:
    """``conv(drop(act(norm(x))))``. In float32 CPU training only ``x`` is kept for backward (see
    :class:`_PreActivationConv`); elsewhere, and for pointwise convolutions, the modules are called in turn."""
    p = drop.p if drop is not None and drop.training else 0.0
    fused = (
        torch.is_grad_enabled() and type(norm) is nn.BatchNorm3d and norm.training and norm.affine  # not SyncBN
        and uses_fast_cpu_path(x) and x.numel() > x.shape[1]  # BatchNorm3d itself rejects one value per channel
        and not any(m._forward_hooks or m._forward_pre_hooks for m in (norm, act, conv))  # e.g. weight_norm
        and isinstance(conv, Conv3d) and not conv.is_pointwise() and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple) and type(act) is nn.PReLU and act.num_parameters == 1 and 0.0 <= p < 1.0
        and (x.requires_grad or any(t.requires_grad for t in (norm.weight, act.weight, conv.weight)))
    )
    if not fused:
        h = act(norm(x))
        return conv(drop(h) if drop is not None else h)
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if norm.track_running_stats and norm.num_batches_tracked is not None:  # as nn.BatchNorm3d.forward
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            momentum = 1.0 / float(norm.num_batches_tracked)
    drop, scale = _drop_mask(tuple(x.shape[:1]) + (conv.in_channels,) + tuple(x.shape[2:]), p, x.device) \
        if p > 0.0 else (None, 1.0)
    return _PreActivationConv.apply(
        x, norm.weight, norm.bias, act.weight, conv.weight, conv.bias, norm, conv, momentum, drop, scale
    )
