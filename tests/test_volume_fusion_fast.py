"""Bit-level checks of the fast Volume Fusion paths (uint8 label maps, cast + divide instead of a lookup,
in-place products, the per-sample batch loop, the repeat-based grid rendering)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from misfm_transforms import RandVolumeFusion, RandVolumeFusionGrid, fuse_volumes, volume_fusion_batch
from misfm_transforms._checks import check_finite


def _bits(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32)).view(np.uint32)


def _reference(fg, bg, label, k):
    """The defining identity in float32 with the lookup-table alpha (the original formulation)."""
    lut = np.arange(k + 1, dtype=np.float32) / np.float32(k)
    index = np.asarray(label).astype(np.int64)
    return np.take(lut, index) * np.asarray(fg, np.float32) + np.take(1 - lut, index) * np.asarray(bg, np.float32)


def _signed_volume(rng, shape):
    """Values of both signs, exact zeros of both signs and subnormals: every rounding and sign case."""
    x = (rng.randn(*shape) * 3).astype(np.float32)
    flat = x.reshape(-1)
    flat[::7], flat[3::11], flat[5::13] = 0.0, -0.0, np.float32(1e-40)
    return x


@pytest.mark.parametrize("k", [1, 3, 4, 7, 255])
def test_fuse_volumes_bitwise(k):
    rng = np.random.RandomState(k)
    fg, bg = _signed_volume(rng, (2, 5, 6, 7)), _signed_volume(rng, (2, 5, 6, 7))
    for label in (rng.randint(0, k + 1, (1, 5, 6, 7)).astype(np.uint8), rng.randint(0, k + 1, (2, 5, 6, 7))):
        expected = _bits(_reference(fg, bg, label, k))
        np.testing.assert_array_equal(_bits(fuse_volumes(fg, bg, label, k)), expected)
        out = fuse_volumes(torch.from_numpy(fg), torch.from_numpy(bg), torch.from_numpy(label), k)
        np.testing.assert_array_equal(_bits(out), expected)


@pytest.mark.parametrize("cls", [RandVolumeFusion, RandVolumeFusionGrid])
@pytest.mark.parametrize("kind", ["numpy", "torch", "meta"])
def test_transforms_bitwise(cls, kind):
    rng = np.random.RandomState(1)
    shape = (1, 22, 26, 29)
    bg, fg = _signed_volume(rng, shape), _signed_volume(rng, shape)
    wrap = {"numpy": lambda x: x, "torch": torch.from_numpy, "meta": MetaTensor}[kind]
    small = {"box_size_min": (2, 2, 2), "box_size_max": (9, 9, 9)} if cls is RandVolumeFusion else \
        {"block_size_min": (3, 4, 5), "block_size_max": (7, 8, 9)}
    t = cls(**small)
    for seed in range(8):
        fused, label = t.set_random_state(seed)(wrap(bg.copy()), wrap(fg.copy()))
        assert np.asarray(label).dtype == np.uint8
        np.testing.assert_array_equal(_bits(fused), _bits(_reference(fg, bg, label, 4)))


def test_grid_render_equals_broadcast_formulation():
    t = RandVolumeFusionGrid(block_size_min=(2, 3, 4), block_size_max=(9, 10, 11))
    shape = (23, 31, 37)
    for seed in range(40):
        t.set_random_state(seed).randomize(shape)
        (g0, g1, g2), (b0, b1, b2), (o0, o1, o2) = t.block_labels.shape, t.block_size, t.offset
        expected = np.zeros((1, *shape), np.uint8)
        blocks = np.broadcast_to(t.block_labels[:, None, :, None, :, None], (g0, b0, g1, b1, g2, b2))
        expected[0, o0 : o0 + g0 * b0, o1 : o1 + g1 * b1, o2 : o2 + g2 * b2] = blocks.reshape(g0 * b0, g1 * b1, g2 * b2)
        np.testing.assert_array_equal(t._render(shape), expected)


@pytest.mark.parametrize("n,c", [(1, 1), (2, 1), (3, 2), (4, 1)])
def test_batch_bitwise_and_contract(n, c):
    rng = np.random.RandomState(n * 10 + c)
    x = torch.from_numpy(_signed_volume(rng, (n, c, 10, 14, 18)))
    before = x.clone()
    fused, label = volume_fusion_batch(x, num_boxes=(2, 6), box_size_min=(2, 2, 2), box_size_max=(6, 8, 10),
                                       generator=torch.Generator().manual_seed(n))
    assert torch.equal(x, before)  # the input batch is not modified
    assert label.dtype == torch.int64 and label.shape == (n, 1, 10, 14, 18) and label.is_contiguous()
    assert fused.dtype == torch.float32 and fused.shape == x.shape and fused.is_contiguous()
    expected = _reference(x.roll(1, 0).numpy(), x.numpy(), label.numpy(), 4)
    np.testing.assert_array_equal(_bits(fused), _bits(expected))


def test_batch_accepts_metatensor_and_float64():
    x = torch.rand(2, 1, 8, 8, 8, dtype=torch.float64)
    fused, label = volume_fusion_batch(MetaTensor(x), box_size_min=(2, 2, 2), box_size_max=(4, 4, 4),
                                       generator=torch.Generator().manual_seed(0))
    assert fused.dtype == torch.float32 and label.dtype == torch.int64
    expected = _reference(x.roll(1, 0).float().numpy(), x.float().numpy(), label.numpy(), 4)
    np.testing.assert_array_equal(_bits(fused), _bits(expected))


def test_check_finite_on_read_only_and_strided_arrays():
    a = np.ones((4, 5), np.float32)
    a.flags.writeable = False
    check_finite("a", a, a.shape)
    b = np.ones((4, 6), np.float32)[:, ::2]
    b[1, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        check_finite("b", b, b.shape)
    c = np.full((3, 3), 3e38, np.float32)  # the sum overflows but every value is finite
    check_finite("c", c, c.shape)
