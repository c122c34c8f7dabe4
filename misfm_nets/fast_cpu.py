"""PCT-Net's fast CPU training kernels, used only where :func:`active` says so (``PCTNet(fast_cpu_kernels=...)``).

Each function computes what the stock modules it is given compute, with their parameters (the state dict is
untouched); the network calls them only in float32 CPU training outside autocast, ``torch.compile``, export and
tracing, and calls the plain modules everywhere else. What they change, and why:

- :func:`forward` of an ``nn.Conv3d``: PyTorch sends a float32 convolution of one sample with ``N*C*D*H <= 20480``
  to its im2col ``slow_conv3d`` kernel, much slower than oneDNN on PCT-Net's 3x3x3 shapes; the same convolution
  as two groups over ``[x, x]`` goes to oneDNN (PyTorch always uses it for ``groups > 1``). A pointwise (1x1x1)
  convolution runs as one batched matrix product, faster than either convolution kernel.
- :func:`dropout` (and :func:`forward` of an ``nn.Dropout``): PyTorch's CPU dropout draws a float32 Bernoulli
  mask (slow) and keeps it (4 bytes per element) for backward. Here the mask is 15-bit integers against a
  threshold, kept as bool (1 byte per element); ``p`` is rounded to a multiple of ``2**-15`` and the kept values
  scaled by the exact inverse keep probability, so the expectation is unchanged.
- :func:`window_attention`: ``dropout(softmax(q k^T * scale + bias + mask)) @ v`` keeping only the
  probabilities and the bool mask for backward (autograd would keep the probabilities, the float mask and the
  dropped matrix), or with ``recompute`` only the mask (one product and one softmax recomputed in backward).
- :func:`pre_activation_conv`: PCT-Net's ``conv(dropout(prelu(batch_norm(x))))`` keeping only ``x`` for backward
  (autograd would keep ``x``, the normalised and the activated tensors); the two are recomputed in backward from
  the saved batch statistics, which costs two elementwise passes and no convolution. One shared PReLU slope runs
  as leaky ReLU (the same products on a faster kernel).
- :func:`transformer_mlp`: the Swin blocks' ``fc2(dropout(gelu(fc1(x))))`` keeping ``x`` and the pre-activation
  for backward (autograd would also keep the dropped activation); backward recomputes one GELU.

Large temporaries are updated in place wherever nothing else holds them: glibc maps every allocation over
32 MiB anew, and faulting in a fresh large tensor costs more than the pass that fills it.

The functions are ``once_differentiable`` (no double backward), which is why eval mode, where input-gradient
penalties need ``create_graph``, stays on stock modules. Figures: ``benchmarks/README.md`` (``bench_pctnet.py``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "FastCPUModule", "TESTED_TORCH_VERSIONS", "active", "dropout", "forward", "pre_activation_conv", "transformer_mlp",
    "window_attention",
]

# The torch versions (major, minor) whose kernels and dispatch these functions were tested against: the
# convolution routing below copies a PyTorch heuristic, so ``fast_cpu_kernels=None`` (auto) uses them only there.
TESTED_TORCH_VERSIONS = ((2, 13),)
_MASK_LEVELS = 2**15  # dropout draws are 15-bit integers, uniform on [0, 2**15)
_SLOW_CONV3D_MAX = 20480  # PyTorch's N*C*D*H bound under which a batch-1 float32 conv takes slow_conv3d
_CHUNK = 1 << 18  # elements per step of the chunked elementwise passes (1 MiB float32 temporaries)
_MIN_IN_PLACE_SLOPE = 2.0**-20  # PReLU slopes from which backward reads the input's negative part off the result


def _torch_version() -> Tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def active(setting: Optional[bool], x: torch.Tensor, training: bool) -> bool:
    """The one switch: whether a module in ``training`` mode computes ``x`` on these kernels.

    ``setting`` is the network's ``fast_cpu_kernels``: ``False`` never; ``True`` wherever they apply; ``None``
    (auto) wherever they apply on a torch version of :data:`TESTED_TORCH_VERSIONS`. They apply to a float32 CPU
    tensor in training mode outside CPU autocast, and never while ``torch.compile``/``torch.export`` or
    ``torch.jit`` trace or script (those get the plain modules, which they understand).
    """
    if setting is False or not training:
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    return setting is True or _torch_version() in TESTED_TORCH_VERSIONS


class FastCPUModule(nn.Module):
    """A module whose forward takes these kernels where :func:`active` says so: ``fast_cpu_kernels`` is its
    switch (``None`` auto, ``True``, ``False``), set for a whole network by ``PCTNet.fast_cpu_kernels``."""

    fast_cpu_kernels: Optional[bool] = None

    def _fast(self, x: torch.Tensor) -> bool:
        return active(self.fast_cpu_kernels, x, self.training)


def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, on the fast kernels for a plain ``nn.Conv3d`` or ``nn.Dropout`` without hooks (the caller
    has checked :func:`active`); other modules, and modules with hooks (e.g. weight norm), are called."""
    if not (module._forward_hooks or module._forward_pre_hooks):
        if type(module) is nn.Conv3d:
            return _conv3d(module, x, module.weight, module.bias)
        if type(module) is nn.Dropout and not module.inplace:
            return dropout(x, module.p, module.training)
    return module(x)


def _memory_order_view(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``t``'s elements as a 1-D view in memory order (contiguous, channels-last or any dense permutation), or
    None where ``t`` has gaps or overlaps. A plain tensor even for subclasses (slices of a batched MONAI
    ``MetaTensor`` would be taken as batch items)."""
    t = t.as_subclass(torch.Tensor)
    order = sorted(range(t.dim()), key=lambda i: t.stride(i), reverse=True)
    permuted = t.permute(order)
    return permuted.view(-1) if permuted.is_contiguous() else None


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same strides on every axis longer than 1 (element ``i`` of one pairs with element ``i``
    of the other in memory order)."""
    return a.shape == b.shape and all(sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


def _flat_in_step(*tensors: torch.Tensor) -> Optional[Tuple[torch.Tensor, ...]]:
    """The tensors' :func:`_memory_order_view` s where all are dense and share the first one's layout (so chunks of
    the views pair element by element), else None."""
    flats = tuple(_memory_order_view(t) for t in tensors)
    if any(f is None for f in flats) or not all(_same_layout(tensors[0], t) for t in tensors[1:]):
        return None
    return flats


def _keep_mask(like: torch.Tensor, p: float) -> Tuple[torch.Tensor, float]:
    """``(keep (bool, like's shape), scale)``: an element is dropped with probability ``p`` rounded to k / 2**15,
    and ``scale = 1 / P(keep)`` (0 when all are dropped). Drawn from torch's default generator, so
    ``torch.manual_seed`` fixes it. For a dense ``like`` (contiguous, channels-last, ...) the mask has its strides
    and is drawn in its memory order, so :func:`_masked_scale` can walk both tensors in step; otherwise it is
    contiguous.

    One 63-bit draw gives four 15-bit numbers (int64 ``random_`` viewed as int16, sign bits cleared): one draw
    per four elements.
    """
    threshold = round(p * _MASK_LEVELS)
    if threshold >= _MASK_LEVELS:
        return torch.zeros_like(like, dtype=torch.bool), 0.0
    numel = like.numel()
    bits = torch.empty(-(-numel // 4), dtype=torch.int64, device=like.device).random_().view(torch.int16)[:numel]
    keep = bits.bitwise_and_(_MASK_LEVELS - 1) >= threshold
    if _memory_order_view(like) is not None:
        keep = keep.as_strided(like.shape, like.stride())
    return keep.view(like.shape), _MASK_LEVELS / (_MASK_LEVELS - threshold)


def _masked_scale(x: torch.Tensor, keep: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """``out = x * keep * scale`` elementwise (``out`` may be ``x``); returns ``out``.

    ``masked_fill_`` with a bool mask is a scalar loop (slower than a multiply), and ``x * keep`` casts the
    whole mask to a float temporary first (a fresh allocation that costs more in page faults than the multiply).
    Tensors of one layout are therefore walked in chunks whose float temporaries the allocator reuses.
    """
    flats = _flat_in_step(x, keep, out)
    if flats is None:
        torch.mul(x, keep, out=out)
        return out.mul_(scale) if scale != 1.0 else out
    flat_x, flat_keep, flat_out = flats
    for start in range(0, flat_x.numel(), _CHUNK):
        chunk = slice(start, start + _CHUNK)
        part = torch.mul(flat_x[chunk], flat_keep[chunk], out=flat_out[chunk])
        if scale != 1.0:
            part.mul_(scale)
    return out


class _MaskedScale(torch.autograd.Function):
    """``x * keep * scale``; only the bool mask is saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _masked_scale(x, keep, scale, torch.empty_like(keep, dtype=x.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return _masked_scale(grad, keep, ctx.scale, torch.empty_like(keep, dtype=grad.dtype)), None, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """:func:`torch.nn.functional.dropout` with a bool mask on the CPU (see the module docstring); the mask is
    drawn from torch's default generator (``torch.manual_seed`` fixes it), in another order than PyTorch's."""
    # The same draw with or without grad (a reentrant checkpoint runs the forward without, then again with it).
    if not training or p == 0.0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    keep, scale = _keep_mask(x, p)
    return _MaskedScale.apply(x, keep, scale)


def _attention_probs(
    q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, mask: Optional[torch.Tensor], scale: float
) -> torch.Tensor:
    """``softmax(q k^T * scale + bias + mask)``: q, k ``(B, nW, h, N, d)``, bias ``(h, N, N)``, mask ``(nW, N, N)``.

    One fresh ``(B, nW, h, N, N)`` tensor; bias, mask and softmax are applied to it in place.
    """
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    scores += bias
    if mask is not None:
        scores += mask.unsqueeze(1)
    return torch.ops.aten._softmax.out(scores, -1, False, out=scores)


class _WindowAttention(torch.autograd.Function):
    """``dropout(softmax(q k^T * scale + bias + mask)) @ v`` with a bool dropout mask. Backward keeps the
    probabilities, or with ``recompute`` only q, k, v and the mask: the probabilities are recomputed (one product
    and one softmax), nothing else.

    At the paper's sizes the ``(B, nW, h, N, N)`` tensors are large: each fresh one costs more in page faults
    (glibc maps allocations over 32 MiB anew) than the pass that fills it, so they are updated in place wherever
    they are not kept: forward allocates one (two without ``recompute``), backward two.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, scale: float, p: float, recompute: bool):
        probs = _attention_probs(q, k, bias, mask, scale)
        keep, drop_scale = _keep_mask(probs, p)
        dropped = _masked_scale(probs, keep, 1.0, probs if recompute else torch.empty_like(probs))
        out = torch.matmul(dropped, v).mul_(drop_scale)
        del dropped
        ctx.save_for_backward(q, k, v, bias, mask, keep, None if recompute else probs)
        ctx.scale, ctx.drop_scale = scale, drop_scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, bias, mask, keep, saved_probs = ctx.saved_tensors
        probs = _attention_probs(q, k, bias, mask, ctx.scale) if saved_probs is None else saved_probs
        grad_out = grad_out * ctx.drop_scale
        grad_scores = torch.matmul(grad_out, v.transpose(-2, -1))  # d loss / d dropped probabilities
        _masked_scale(grad_scores, keep, 1.0, grad_scores)
        torch.ops.aten._softmax_backward_data.out(grad_scores, probs, -1, probs.dtype, grad_input=grad_scores)
        # the dropped probabilities for grad_v: in place when recomputed here (softmax backward is done with them)
        dropped = _masked_scale(probs, keep, 1.0, probs if saved_probs is None else torch.empty_like(probs))
        del probs, saved_probs
        grad_v = torch.matmul(dropped.transpose(-2, -1), grad_out)
        del dropped
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


class _TransformerMlp(torch.autograd.Function):
    """``linear2(dropout(gelu(linear1(x))))`` keeping ``x`` and the hidden pre-activation for backward (autograd
    would also keep the dropped activation, the size of the pre-activation); backward recomputes the activation
    (one GELU pass) and updates every hidden-size temporary in place."""

    @staticmethod
    def forward(ctx, x, weight1, bias1, weight2, bias2, approximate: str, p: float):
        pre = F.linear(x, weight1, bias1)
        hidden = F.gelu(pre, approximate=approximate)
        keep, scale = _keep_mask(hidden, p) if p > 0.0 else (None, 1.0)
        if keep is not None:
            _masked_scale(hidden, keep, scale, hidden)
        out = F.linear(hidden, weight2, bias2)
        ctx.save_for_backward(x, weight1, weight2, pre, keep)
        ctx.approximate, ctx.scale = approximate, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight1, weight2, pre, keep = ctx.saved_tensors
        x_shape = x.shape
        grad_out = grad_out.reshape(-1, grad_out.shape[-1])
        x, pre = x.view(-1, x.shape[-1]), pre.view(-1, pre.shape[-1])
        need = ctx.needs_input_grad
        grad_w2 = grad_b2 = None
        if need[3]:
            hidden = F.gelu(pre, approximate=ctx.approximate)
            if keep is not None:
                _masked_scale(hidden, keep.view_as(hidden), ctx.scale, hidden)
            grad_w2 = grad_out.t().mm(hidden)
            del hidden
        if need[4]:
            grad_b2 = grad_out.sum(0)
        grad_pre = grad_out.mm(weight2)
        if keep is not None:
            _masked_scale(grad_pre, keep.view_as(grad_pre), ctx.scale, grad_pre)
        torch.ops.aten.gelu_backward.grad_input(grad_pre, pre, approximate=ctx.approximate, grad_input=grad_pre)
        grad_x = grad_pre.mm(weight1).view(x_shape) if need[0] else None
        grad_w1 = grad_pre.t().mm(x) if need[1] else None
        grad_b1 = grad_pre.sum(0) if need[2] else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None


def transformer_mlp(fc1: nn.Linear, act: nn.GELU, drop: nn.Dropout, fc2: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``fc2(drop(act(fc1(x))))`` on the last axis of ``x``. In float32 CPU training only ``x`` and the
    pre-activation are kept for backward (see :class:`_TransformerMlp`); otherwise (no grad, hooks, other layer
    types) the modules are called in turn, the dropout on :func:`dropout`."""
    fused = (
        torch.is_grad_enabled() and fc1.training and x.is_contiguous()
        and type(fc1) is nn.Linear and type(fc2) is nn.Linear and type(act) is nn.GELU and type(drop) is nn.Dropout
        and not drop.inplace and fc1.bias is not None and fc2.bias is not None
        and not any(m._forward_hooks or m._forward_pre_hooks for m in (fc1, act, drop, fc2))
        and (x.requires_grad or any(t.requires_grad for t in (fc1.weight, fc1.bias, fc2.weight, fc2.bias)))
    )
    if not fused:
        return fc2(forward(drop, act(fc1(x))))
    p = drop.p if drop.training else 0.0
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return _TransformerMlp.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, act.approximate, p)


def _routes_to_slow_conv3d(x: torch.Tensor, groups: int, kernel: Tuple[int, ...]) -> bool:
    """PyTorch's CPU heuristic (``ConvParams::use_mkldnn``) for a float32 3-D convolution with a kernel wider
    than 1x1 in its last two axes: oneDNN only for groups > 1, a kernel > 3 in both last axes, batch > 1 or
    ``N*C*D*H > 20480``."""
    n, c, d, h = x.shape[:4]
    return (
        groups == 1 and n == 1 and n * c * d * h <= _SLOW_CONV3D_MAX and not (kernel[-1] > 3 and kernel[-2] > 3)
        and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    )


def _is_pointwise(conv: nn.Conv3d) -> bool:
    return (
        conv.kernel_size == (1, 1, 1) and conv.stride == (1, 1, 1) and conv.groups == 1
        and isinstance(conv.padding, tuple) and all(p == 0 for p in conv.padding)
    )


def _routes_to_onednn(conv: nn.Conv3d, x: torch.Tensor) -> bool:
    """Whether :func:`_conv3d` runs this convolution of ``x`` as two groups (PyTorch would take ``slow_conv3d``)."""
    return (
        conv.padding_mode == "zeros" and x.dim() == 5 and not _is_pointwise(conv)
        and _routes_to_slow_conv3d(x, conv.groups, conv.kernel_size) and conv.out_channels % 2 == 0
    )


def _conv3d(conv: nn.Conv3d, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``conv``'s forward with the given parameters, its small and pointwise cases on faster kernels."""
    if conv.padding_mode == "zeros" and x.dim() == 5 and _is_pointwise(conv):
        return _pointwise(x, weight, bias)
    if _routes_to_onednn(conv, x):
        # groups=2 over the input twice: each group computes half the output channels from all of x
        return F.conv3d(torch.cat([x, x], 1), weight, bias, conv.stride, conv.padding, conv.dilation, 2)
    return conv._conv_forward(x, weight, bias)


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


def _dot_negative_part(a: torch.Tensor, b: torch.Tensor) -> float:
    """``sum(a * min(b, 0))`` for tensors of one shape, accumulated in float64 over chunks (no temporary the size
    of ``b`` where both have one dense layout)."""
    flats = _flat_in_step(a, b)
    if flats is None:
        return float(torch.dot(a.reshape(-1), b.clamp(max=0).reshape(-1)))
    flat_a, flat_b = flats
    return math.fsum(
        float(torch.dot(flat_a[i : i + _CHUNK], flat_b[i : i + _CHUNK].clamp(max=0)))
        for i in range(0, flat_a.numel(), _CHUNK)
    )


def _conv_apply(conv: nn.Module, h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The forward of ``conv`` (an ``nn.Conv3d`` or ``nn.ConvTranspose3d``) with the given parameters."""
    if type(conv) is nn.Conv3d:
        return _conv3d(conv, h, weight, bias)
    return F.conv_transpose3d(h, weight, bias, conv.stride, conv.padding, conv.output_padding, conv.groups,
                              conv.dilation)


def _pointwise_backward(
    grad_y: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, needs: Tuple[bool, bool]
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of the 1x1x1 convolution ``y = W h + b`` as matrix products over the channel axis:
    ``(d h, d W (if needs[0]), d b (if needs[1]))``; channels-last tensors are read in their own layout."""
    w2 = weight.flatten(1)  # (C_out, C_in)
    if grad_y.is_contiguous() and h.is_contiguous():  # (N, C, D*H*W) per sample
        gy, hh = grad_y.flatten(2), h.flatten(2)
        grad_h = torch.matmul(w2.t(), gy).view(h.shape)
        grad_w = torch.matmul(gy, hh.transpose(1, 2)).sum(0).view_as(weight) if needs[0] else None
    else:  # (N, D, H, W, C): views without a copy for channels-last tensors
        gy, hh = grad_y.movedim(1, -1), h.movedim(1, -1)
        grad_h = torch.matmul(gy, w2).movedim(-1, 1)
        grad_w = gy.reshape(-1, gy.shape[-1]).t().mm(hh.reshape(-1, hh.shape[-1])).view_as(weight) if needs[0] else None
    grad_b = grad_y.sum((0, 2, 3, 4)) if needs[1] else None
    return grad_h, grad_w, grad_b


def _conv_backward(
    conv: nn.Module, grad_y: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, routed: bool,
    needs: Tuple[bool, bool],
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(d h, d weight, d bias)`` of :func:`_conv_apply` (``needs``: whether weight and bias gradients are wanted)."""
    transposed = type(conv) is not nn.Conv3d
    if not transposed and _is_pointwise(conv):
        return _pointwise_backward(grad_y, h, weight, needs)
    h_in, groups = (torch.cat([h, h], 1), 2) if routed else (h, conv.groups)
    grad_h, grad_w, grad_b = torch.ops.aten.convolution_backward(
        grad_y, h_in, weight, [grad_y.shape[1]] if needs[1] else None, conv.stride, conv.padding, conv.dilation,
        transposed, conv.output_padding if transposed else [0] * len(conv.stride), groups, [True, needs[0], needs[1]],
    )
    del h_in
    if routed:
        half = grad_h.shape[1] // 2
        grad_h = grad_h[:, :half] + grad_h[:, half:]
    return grad_h, grad_w, grad_b


class _PreActivationConv(torch.autograd.Function):
    """``conv(drop(prelu(batch_norm(x))))`` in training mode, keeping only ``x`` (and the batch statistics and
    the bool dropout mask) for backward. The normalised and activated tensors, which autograd would keep (two
    tensors the size of ``x``), are recomputed in backward from the saved statistics: one fused
    multiply-add and one activation; the convolution itself is not recomputed.

    PReLU with its one shared slope runs as leaky ReLU (the same products, a faster vectorised kernel in both
    directions, in place); its slope gradient is ``sum(grad * min(input, 0))``. With a slope of
    at least ``2**-20`` the activation has its input's sign and ``slope * input`` as negative part, so backward
    activates the recomputed input in place and reads both from the result: one tensor the size of ``x``
    alive instead of two.
    """

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, act_weight, conv_weight, conv_bias, norm, conv, momentum, keep, scale):
        h, mean, invstd = torch.ops.aten.native_batch_norm(
            x, norm_weight, norm_bias, norm.running_mean, norm.running_var, True, momentum, norm.eps
        )
        F.leaky_relu_(h, float(act_weight))
        if keep is not None:
            _masked_scale(h, keep, scale, h)
        ctx.routed = type(conv) is nn.Conv3d and _routes_to_onednn(conv, h)
        y = _conv_apply(conv, h, conv_weight, conv_bias)
        ctx.save_for_backward(x, norm_weight, norm_bias, act_weight, conv_weight, mean, invstd, keep)
        ctx.conv, ctx.eps, ctx.scale, ctx.has_bias = conv, norm.eps, scale, conv_bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, norm_weight, norm_bias, act_weight, conv_weight, mean, invstd, keep = ctx.saved_tensors
        conv, slope = ctx.conv, float(act_weight)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        gain = invstd * norm_weight
        normed = torch.addcmul((norm_bias - mean * gain).view(shape), x, gain.view(shape))
        in_place = slope >= _MIN_IN_PLACE_SLOPE and ctx.scale > 0.0  # scale 0: p rounded to 1, all dropped
        h_in = F.leaky_relu_(normed, slope) if in_place else F.leaky_relu(normed, slope)
        if keep is not None:
            _masked_scale(h_in, keep, ctx.scale, h_in)
        grad_h, grad_cw, grad_cb = _conv_backward(
            conv, grad_y, h_in, conv_weight, ctx.routed, (ctx.needs_input_grad[4], ctx.has_bias)
        )
        if keep is not None:  # dropped entries get no gradient, so their activation values no longer matter
            _masked_scale(grad_h, keep, ctx.scale, grad_h)
        # the activation's input (its sign and negative part): the result itself when activated in place
        source, negative_scale = (h_in, 1.0 / (slope * ctx.scale)) if in_place else (normed, 1.0)
        del h_in, normed
        grad_aw = act_weight.new_full(act_weight.shape, _dot_negative_part(grad_h, source) * negative_scale)
        torch.ops.aten.leaky_relu_backward.grad_input(grad_h, source, slope, False, grad_input=grad_h)
        del source
        grad_x, grad_nw, grad_nb = torch.ops.aten.native_batch_norm_backward(
            grad_h, x, norm_weight, None, None, mean, invstd, True, ctx.eps,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]],
        )
        return grad_x, grad_nw, grad_nb, grad_aw, grad_cw, grad_cb, None, None, None, None, None


def pre_activation_conv(
    norm: nn.BatchNorm3d, act: nn.PReLU, conv: nn.Module, x: torch.Tensor, drop: Optional[nn.Dropout] = None
) -> torch.Tensor:
    """``conv(drop(act(norm(x))))`` with ``conv`` an ``nn.Conv3d`` (pointwise included) or ``nn.ConvTranspose3d``.
    With grad, in training, only ``x`` is kept for backward (see :class:`_PreActivationConv`); otherwise (no grad,
    hooks, SyncBatchNorm, other layer types) the modules are called in turn, convolution and dropout on
    :func:`forward`."""
    p = drop.p if drop is not None and drop.training else 0.0
    fused = (
        torch.is_grad_enabled() and type(norm) is nn.BatchNorm3d and norm.training and norm.affine  # not SyncBN
        and x.numel() > x.shape[1]  # BatchNorm3d itself rejects one value per channel
        and not any(m._forward_hooks or m._forward_pre_hooks for m in (norm, act, conv))  # e.g. weight_norm
        and type(conv) in (nn.Conv3d, nn.ConvTranspose3d) and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple) and type(act) is nn.PReLU and act.num_parameters == 1 and 0.0 <= p < 1.0
        and (x.requires_grad or any(t.requires_grad for t in (norm.weight, act.weight, conv.weight)))
    )
    if not fused:
        h = act(norm(x))
        return forward(conv, forward(drop, h) if drop is not None else h)
    momentum = 0.0 if norm.momentum is None else norm.momentum
    if norm.track_running_stats and norm.num_batches_tracked is not None:  # as nn.BatchNorm3d.forward
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            momentum = 1.0 / float(norm.num_batches_tracked)
    keep, scale = _keep_mask(x, p) if p > 0.0 else (None, 1.0)
    return _PreActivationConv.apply(
        x, norm.weight, norm.bias, act.weight, conv.weight, conv.bias, norm, conv, momentum, keep, scale
    )
