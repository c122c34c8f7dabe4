"""3D shifted-window self-attention, the transformer branch of PCT-Net.

Tokens are kept as channel-last volumes ``(B, S, H, W, C)`` (S = slice axis) between layers, which is the same
token order as the original's ``flatten(2).transpose(1, 2)`` but needs no reshapes between blocks.

Two details must be kept bit-compatible with the original (nnFormer-derived) code so its weights load and
give the same outputs:

* the relative-position index folds the 3-D offset with the factors ``(3ws-1, 2ws-1, 1)`` instead of
  ``((2ws-1)^2, 2ws-1, 1)``, so several offsets share one bias row (:func:`relative_position_index`);
* padded tokens (zeros appended at the end of each axis) take part in attention as keys and values.

Beyond the original, the window padding and the shift mask are derived from the actual input shape (and
cached for the last few shapes), so the layers are not tied to the resolution they were built for. They are
built from the input tensor (``new_*``), not from a device argument, so a ``torch.jit.trace`` holds no device
constant, and without data-dependent shapes, so ``torch.compile(fullgraph=True)`` can put them in its graph.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from monai.data import MetaTensor
from monai.networks.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import fast_cpu
from .fast_cpu import FastCPUModule

__all__ = ["relative_position_index", "window_indices", "WindowAttention", "SwinBlock", "SwinLayer"]

SHIFT_MASK_VALUE = -100.0
# Input shapes whose window indices and shift mask a block keeps (least recently used dropped first): training
# and validation patches, a sliding window and its border windows.
WINDOW_CACHE_SIZE = 4


def relative_position_index(window_size: int) -> torch.Tensor:
    """Index ``(N, N)`` int64, ``N = window_size**3``, into the ``((2ws-1)**3, heads)`` bias table.

    Reproduces the original's folding ``dz*(3ws-1) + dy*(2ws-1) + dx`` of the shifted offsets.
    """
    ws = window_size
    axis = torch.arange(ws)
    coords = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij")).flatten(1)  # (3, N)
    offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)  # (N, N, 3), all >= 0
    weights = torch.tensor([3 * ws - 1, 2 * ws - 1, 1])
    return (offsets * weights).sum(-1)


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """``(B, S, H, W, C)`` with sides divisible by ``ws`` -> windows ``(B, nW, ws**3, C)`` in raster order."""
    ws = window_size
    return rearrange(x, "b (s p) (h q) (w r) c -> b (s h w) (p q r) c", p=ws, q=ws, r=ws)


def window_reverse(windows: torch.Tensor, window_size: int, s: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B, nW, ws**3, C)`` -> ``(B, S, H, W, C)``."""
    ws = window_size
    return rearrange(
        windows, "b (s h w) (p q r) c -> b (s p) (h q) (w r) c", s=s // ws, h=h // ws, w=w // ws, p=ws, q=ws, r=ws
    )


def _arange(n: int, like: torch.Tensor) -> torch.Tensor:
    """``torch.arange(n)`` (int64) on ``like``'s device, made from ``like`` so a trace records no device."""
    return like.new_ones(n, dtype=torch.long).cumsum(0) - 1


def shift_mask(padded_shape: Sequence[int], window_size: int, shift: int, like: torch.Tensor) -> torch.Tensor:
    """Additive float32 mask ``(nW, N, N)`` for the cyclically shifted windows of a padded ``(S, H, W)`` grid, on
    ``like``'s device.

    Each axis is cut into ``[0, P-ws)``, ``[P-ws, P-shift)`` and ``[P-shift, P)``; token pairs from different
    regions get ``-100`` (27 regions, as the original).
    """
    region = like.new_zeros((1, *padded_shape, 1), dtype=torch.long)
    for axis, size in enumerate(padded_shape):
        ids = like.new_zeros(size, dtype=torch.long)
        ids[size - window_size : size - shift] = 1
        ids[size - shift :] = 2
        view = [1, 1, 1, 1, 1]
        view[axis + 1] = size
        region = region * 3 + ids.view(view)
    ids = window_partition(region, window_size)[0, :, :, 0]  # (nW, N)
    mask = ids[:, None, :] != ids[:, :, None]
    return like.new_zeros(mask.shape, dtype=torch.float32).masked_fill_(mask, SHIFT_MASK_VALUE)


def window_indices(
    batch: int, shape: Sequence[int], window_size: int, shift: int, like: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row indices that turn pad (zeros at the end) + ``roll(-shift)`` + :func:`window_partition` into one gather.

    For tokens flattened to ``(B*S*H*W [+ 1 zero row when padding is needed], C)``, ``gather`` picks the rows of
    the windows ``(B, nW, ws**3, C)`` in order (padded positions pick the zero row); ``scatter`` picks, for every
    token of the ``(B, S, H, W)`` grid, its row in the flattened windows, which undoes the partition, the shift
    and the padding (the crop) in one more gather. Both int64, on ``like``'s device.
    """
    ws = window_size
    s, h, w = shape
    padded = [-(-n // ws) * ws for n in shape]
    numel = s * h * w
    grid = like.new_full(padded, numel, dtype=torch.long)  # ``numel`` = the zero row
    grid[:s, :h, :w] = _arange(numel, like).view(s, h, w)
    if shift > 0:
        grid = torch.roll(grid, shifts=(-shift, -shift, -shift), dims=(0, 1, 2))
    windows = window_partition(grid[None, ..., None], ws).reshape(-1)  # (nW * N,) source rows per image
    images = _arange(batch, like)[:, None]
    gather = torch.where(windows == numel, numel * batch, windows + images * numel).reshape(-1)
    # the window slot of every token; the padded slots all write to one spare entry, dropped after
    slots = like.new_zeros(numel + 1, dtype=torch.long).scatter_(0, windows, _arange(windows.numel(), like))
    scatter = (slots[:numel] + images * windows.numel()).reshape(-1)
    return gather, scatter


def _attention_core(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, mask: Optional[torch.Tensor],
    scale: float, dropout: float,
) -> torch.Tensor:
    """``dropout(softmax(q k^T * scale + bias + mask)) v`` on ``(B, nW, h, N, d)``; bias ``(h, N, N)``, mask
    ``(nW, N, N)`` (broadcast, never expanded to one ``(nW*h, N, N)`` tensor)."""
    attn = torch.matmul(q * scale, k.transpose(-2, -1))
    attn += bias.to(q.dtype)
    if mask is not None:
        attn += mask.unsqueeze(1).to(q.dtype)
    return torch.matmul(F.dropout(attn.softmax(-1), dropout, True), v)


class WindowAttention(FastCPUModule):
    """Multi-head self-attention inside cubic windows with a learned relative-position bias.

    ``forward(windows (B, nW, N, C), mask (nW, N, N) or None) -> (B, nW, N, C)``, ``N = window_size**3``.
    The bias and the shift mask enter :func:`torch.nn.functional.scaled_dot_product_attention` as one
    additive mask, so no ``(B*nW, heads, N, N)`` score tensor is kept for the backward pass. Training with
    attention dropout on the CPU (no fused CPU kernel does dropout) uses an explicit softmax with broadcast
    bias and mask (:func:`misfm_nets.fast_cpu.window_attention` where the fast CPU kernels are active);
    ``recompute_attention = True`` recomputes it in backward so no score tensor is kept.
    """

    def __init__(
        self, dim: int, window_size: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"channels ({dim}) must be divisible by num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.attn_drop = attn_drop
        self.recompute_attention = False  # see forward; set by PCTNet(checkpointing="attention")
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 3, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, windows: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, nw, n, c = windows.shape
        h = self.num_heads
        qkv = self.qkv(windows).reshape(b, nw, n, 3, h, c // h).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, h, N, d)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, h).permute(2, 0, 1)  # (h, N, N)
        dropout = self.attn_drop if self.training else 0.0
        fast = self._fast(windows)
        if dropout > 0 and windows.device.type == "cpu":  # with or without grad: the same dropout draw
            # The fused CPU kernel has no attention dropout (SDPA would fall back to its math path, keep the
            # score, softmax and dropout tensors, and expand bias + mask to (nW*h, N, N)): compute explicitly
            # with broadcast bias/mask; with ``recompute_attention`` the probabilities (fast kernels) or the
            # whole core (checkpoint, RNG state replayed) are recomputed in backward.
            q, k, v = qkv.unbind(0)
            if fast:
                out = fast_cpu.window_attention(q, k, v, bias, mask, self.scale, dropout, self.recompute_attention)
            elif self.recompute_attention and torch.is_grad_enabled():
                out = checkpoint(_attention_core, q, k, v, bias, mask, self.scale, dropout, use_reentrant=False)
            else:
                out = _attention_core(q, k, v, bias, mask, self.scale, dropout)
        elif mask is None:
            # one bias for every window: batch = (B * nW), broadcast over it
            q, k, v = qkv.reshape(3, b * nw, h, n, c // h).unbind(0)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias.unsqueeze(0).to(q.dtype), dropout_p=dropout, scale=self.scale
            )
        else:
            # bias + shift mask differ per window: heads = (nW * h), broadcast over B
            attn_mask = (bias.unsqueeze(0) + mask.unsqueeze(1)).reshape(1, nw * h, n, n)
            q, k, v = qkv.reshape(3, b, nw * h, n, c // h).unbind(0)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask.to(q.dtype), dropout_p=dropout, scale=self.scale
            )
        out = out.reshape(b, nw, h, n, c // h).transpose(2, 3).reshape(b, nw, n, c)
        out = self.proj(out)
        return fast_cpu.forward(self.proj_drop, out) if fast else self.proj_drop(out)


class Mlp(FastCPUModule):
    """``Linear -> GELU -> Dropout -> Linear -> Dropout`` on the last axis."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast(x):
            # on rows (N, C): the backward of a dropout on a permuted gradient keeps its strides, which AOTAutograd
            # (torch.compile) mispredicts for the 5-D linear's views
            rows = x.reshape(-1, x.shape[-1])
            return self.drop(self.fc2(self.drop(self.act(self.fc1(rows))))).reshape(x.shape)
        return fast_cpu.forward(self.drop, fast_cpu.transformer_mlp(self.fc1, self.act, self.drop, self.fc2, x))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention block on ``(B, S, H, W, C)`` tokens.

    As the original, a resolution whose smallest side is ``<= window_size`` clamps the window to that side and
    disables the shift; this is decided once from ``input_resolution`` (the bias table size depends on it).
    """

    def __init__(
        self,
        dim: int,
        input_resolution: Sequence[int],
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if min(input_resolution) <= window_size:
            window_size, shift_size = min(input_resolution), 0
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self._windows: "OrderedDict[tuple, Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]" = OrderedDict()

    def _apply(self, fn, recurse=True):
        # .to(device) / .cuda() / .half(): the cached index tensors belong to the old placement, drop them.
        self._windows.clear()
        return super()._apply(fn, recurse)

    def _window_tensors(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """``(gather, scatter, shift mask or None)`` for ``x`` of shape ``(B, S, H, W, C)``; cached per shape and
        device (at most :data:`WINDOW_CACHE_SIZE`) in eager mode. Under ``torch.compile``, export and tracing they
        are built in the graph: a cached tensor would enter it as a constant of another call."""
        b, s, h, w, _ = x.shape
        ws, shift = self.window_size, self.shift_size
        # made from a plain tensor: a MONAI MetaTensor batch would lend the index tensors its batch metadata, and
        # slicing them would then slice (and fail on) that metadata
        like = x.as_tensor() if isinstance(x, MetaTensor) else x

        def build() -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
            padded = (-(-s // ws) * ws, -(-h // ws) * ws, -(-w // ws) * ws)
            mask = shift_mask(padded, ws, shift, like) if shift > 0 else None
            return (*window_indices(b, (s, h, w), ws, shift, like), mask)

        if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
            return build()
        key = (b, s, h, w, x.device)
        if key in self._windows:
            self._windows.move_to_end(key)
            return self._windows[key]
        with torch.inference_mode(False):  # built under inference_mode, they must still serve a training step
            self._windows[key] = build()
        if len(self._windows) > WINDOW_CACHE_SIZE:
            self._windows.popitem(last=False)
        return self._windows[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h, w, c = x.shape
        gather, scatter, mask = self._window_tensors(x)
        # Pad + roll + partition as one row gather (and its inverse as another): 1-2 copies instead of 5-7.
        y = self.norm1(x).reshape(b * s * h * w, c)
        if gather.numel() != b * s * h * w:  # padded: one zero row, the source of every padded token
            y = F.pad(y, (0, 0, 0, 1))
        y = y.index_select(0, gather).reshape(b, -1, self.window_size**3, c)
        y = self.attn(y, mask).reshape(-1, c).index_select(0, scatter).reshape(b, s, h, w, c)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SwinLayer(nn.Module):
    """``depth`` Swin blocks, shift 0 for even and ``window_size // 2`` for odd blocks; no final norm."""

    def __init__(
        self,
        dim: int,
        input_resolution: Sequence[int],
        depth: int,
        num_heads: int,
        window_size: int,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim,
                input_resolution,
                num_heads,
                window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=drop_path,
            )
            for i in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x
