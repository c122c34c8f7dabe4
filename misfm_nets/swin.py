"""3D shifted-window self-attention, the transformer branch of PCT-Net.

Tokens are kept as channel-last volumes ``(B, S, H, W, C)`` (S = slice axis) between layers, which is the same
token order as the original's ``flatten(2).transpose(1, 2)`` but needs no reshapes between blocks.

Two details must be kept bit-compatible with the original (nnFormer-derived) code so its weights load and
give the same outputs:

* the relative-position index folds the 3-D offset with the factors ``(3ws-1, 2ws-1, 1)`` instead of
  ``((2ws-1)^2, 2ws-1, 1)``, so several offsets share one bias row (:func:`relative_position_index`);
* padded tokens (zeros appended at the end of each axis) take part in attention as keys and values.

Beyond the original, the window padding and the shift mask are derived from the actual input shape (and
cached per shape), so the layers are not tied to the resolution they were built for.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import fast_cpu
from .fast_cpu import Dropout, transformer_mlp, window_attention

__all__ = ["relative_position_index", "window_indices", "WindowAttention", "SwinBlock", "SwinLayer"]

SHIFT_MASK_VALUE = -100.0


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
    b, s, h, w, c = x.shape
    ws = window_size
    x = x.view(b, s // ws, ws, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, -1, ws * ws * ws, c)


def window_reverse(windows: torch.Tensor, window_size: int, s: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B, nW, ws**3, C)`` -> ``(B, S, H, W, C)``."""
    b, c = windows.shape[0], windows.shape[-1]
    ws = window_size
    x = windows.view(b, s // ws, h // ws, w // ws, ws, ws, ws, c)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, s, h, w, c)


def shift_mask(padded_shape: Sequence[int], window_size: int, shift: int, device: torch.device) -> torch.Tensor:
    """Additive mask ``(nW, N, N)`` for the cyclically shifted windows of a padded ``(S, H, W)`` grid.

    Each axis is cut into ``[0, P-ws)``, ``[P-ws, P-shift)`` and ``[P-shift, P)``; token pairs from different
    regions get ``-100`` (27 regions, as the original).
    """
    region = torch.zeros(1, *padded_shape, 1, device=device)
    for axis, size in enumerate(padded_shape):
        ids = torch.zeros(size, device=device)
        ids[size - window_size : size - shift] = 1
        ids[size - shift :] = 2
        view = [1, 1, 1, 1, 1]
        view[axis + 1] = size
        region = region * 3 + ids.view(view)
    ids = window_partition(region, window_size)[0, :, :, 0]  # (nW, N)
    mask = ids[:, None, :] != ids[:, :, None]
    return torch.zeros(mask.shape, device=device).masked_fill(mask, SHIFT_MASK_VALUE)


def window_indices(
    batch: int, shape: Sequence[int], window_size: int, shift: int, device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row indices that turn pad (zeros at the end) + ``roll(-shift)`` + :func:`window_partition` into one gather.

    For tokens flattened to ``(B*S*H*W [+ 1 zero row when padding is needed], C)``, ``gather`` picks the rows of
    the windows ``(B, nW, ws**3, C)`` in order (padded positions pick the zero row); ``scatter`` picks, for every
    token of the ``(B, S, H, W)`` grid, its row in the flattened windows, which undoes the partition, the shift
    and the padding (the crop) in one more gather.
    """
    ws = window_size
    s, h, w = shape
    padded = [-(-n // ws) * ws for n in shape]
    numel = s * h * w
    grid = torch.full(padded, numel, dtype=torch.long, device=device)  # ``numel`` = the zero row
    grid[:s, :h, :w] = torch.arange(numel, device=device).view(s, h, w)
    if shift > 0:
        grid = torch.roll(grid, shifts=(-shift, -shift, -shift), dims=(0, 1, 2))
    windows = window_partition(grid[None, ..., None], ws).reshape(-1)  # (nW * N,) source rows per image
    pad_row = numel * batch
    offsets = torch.arange(batch, device=device)[:, None] * numel
    gather = torch.where(windows == numel, pad_row, windows + offsets).reshape(-1)
    slots = torch.empty(numel, dtype=torch.long, device=device)
    real = windows != numel
    slots[windows[real]] = torch.arange(windows.numel(), device=device)[real]
    scatter = (slots + torch.arange(batch, device=device)[:, None] * windows.numel()).reshape(-1)
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


class WindowAttention(nn.Module):
    """Multi-head self-attention inside cubic windows with a learned relative-position bias.

    ``forward(windows (B, nW, N, C), mask (nW, N, N) or None) -> (B, nW, N, C)``, ``N = window_size**3``.
    The bias and the shift mask enter :func:`torch.nn.functional.scaled_dot_product_attention` as one
    additive mask, so no ``(B*nW, heads, N, N)`` score tensor is kept for the backward pass. Training with
    attention dropout on the CPU (no fused CPU kernel does dropout) uses an explicit softmax with broadcast
    bias and mask; ``recompute_attention = True`` recomputes it in backward so no score tensor is kept.
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
        self.proj_drop = Dropout(proj_drop)

    def forward(self, windows: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, nw, n, c = windows.shape
        h = self.num_heads
        qkv = self.qkv(windows).view(b, nw, n, 3, h, c // h).permute(3, 0, 1, 4, 2, 5)  # (3, B, nW, h, N, d)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, h).permute(2, 0, 1)  # (h, N, N)
        dropout = self.attn_drop if self.training else 0.0
        if dropout > 0 and windows.device.type == "cpu":  # with or without grad: the same dropout draw
            # The fused CPU kernel has no attention dropout (SDPA would fall back to its math path, keep the
            # score, softmax and dropout tensors, and expand bias + mask to (nW*h, N, N)): compute explicitly
            # with broadcast bias/mask; with ``recompute_attention`` the probabilities (float32: our
            # window_attention) or the whole core (checkpoint, RNG state replayed) are recomputed in backward.
            q, k, v = qkv.unbind(0)
            if fast_cpu.uses_fast_cpu_path(q):
                out = window_attention(q, k, v, bias, mask, self.scale, dropout, self.recompute_attention)
            elif self.recompute_attention:
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
        out = out.view(b, nw, h, n, c // h).transpose(2, 3).reshape(b, nw, n, c)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """``Linear -> GELU -> Dropout -> Linear -> Dropout`` on the last axis."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(transformer_mlp(self.fc1, self.act, self.drop, self.fc2, x))


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
        self._mask_cache: Dict[str, torch.Tensor] = {}

    def _cached(self, key: str, build):
        if torch.jit.is_tracing():  # a cached tensor would enter the trace as a constant of another call
            return build()
        if key not in self._mask_cache:
            self._mask_cache[key] = build()
        return self._mask_cache[key]

    def _shift_mask(self, padded: Tuple[int, int, int], device: torch.device) -> torch.Tensor:
        return self._cached(
            f"mask{padded}{device}", lambda: shift_mask(padded, self.window_size, self.shift_size, device)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h, w, c = x.shape
        ws, shift = self.window_size, self.shift_size
        padded = (-(-s // ws) * ws, -(-h // ws) * ws, -(-w // ws) * ws)
        gather, scatter = self._cached(
            f"index{b}{(s, h, w)}{x.device}", lambda: window_indices(b, (s, h, w), ws, shift, x.device)
        )
        # Pad + roll + partition as one row gather (and its inverse as another): 1-2 copies instead of 5-7.
        y = self.norm1(x).reshape(b * s * h * w, c)
        if padded != (s, h, w):
            y = F.pad(y, (0, 0, 0, 1))  # one zero row, the source of every padded token
        y = y.index_select(0, gather).view(b, -1, ws**3, c)
        mask = self._shift_mask(padded, x.device) if shift > 0 else None
        y = self.attn(y, mask).reshape(-1, c).index_select(0, scatter).view(b, s, h, w, c)
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
