"""Bit-level checks of the Volume Fusion engine (misfm_transforms.engine): the fusion against the lookup-table
formulation, the vectorised box painter against sequential painting, the grid painter against a broadcast
formulation, and the batched form's contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from misfm_transforms import RandVolumeFusion, RandVolumeFusionGrid, fuse_volumes, volume_fusion_batch
from misfm_transforms._checks import check_finite
from misfm_transforms.engine import Boxes, paint_boxes


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


def test_grid_label_equals_broadcast_formulation():
    t = RandVolumeFusionGrid(block_size_min=(2, 3, 4), block_size_max=(9, 10, 11))
    shape = (1, 23, 31, 37)
    bg, fg = np.zeros(shape, np.float32), np.ones(shape, np.float32)
    for seed in range(40):
        _, label = t.set_random_state(seed)(bg, fg)
        (g0, g1, g2), (b0, b1, b2), (o0, o1, o2) = t.block_labels.shape, t.block_size, t.offset
        expected = np.zeros(shape, np.uint8)
        blocks = np.broadcast_to(t.block_labels[:, None, :, None, :, None], (g0, b0, g1, b1, g2, b2))
        expected[0, o0 : o0 + g0 * b0, o1 : o1 + g1 * b1, o2 : o2 + g2 * b2] = blocks.reshape(g0 * b0, g1 * b1, g2 * b2)
        np.testing.assert_array_equal(label, expected)


def _sequential_painting(boxes: Boxes, shape) -> np.ndarray:
    """pymic's painting: box after box, in order, each overwriting its clipped region with its level."""
    n = boxes.counts.shape[0]
    label = np.zeros((n, 1, *shape), np.uint8)
    for i in range(n):
        for m in range(int(boxes.counts[i])):
            (x0, y0, z0), (x1, y1, z1) = boxes.starts[i, m].tolist(), boxes.stops[i, m].tolist()
            label[i, 0, x0:x1, y0:y1, z0:z1] = int(boxes.levels[i, m])
    return label


@pytest.mark.parametrize("max_boxes", [1, 7, 53, 54, 130])  # 53 boxes per painter word: 1, 2 and 3 words
def test_paint_boxes_equals_sequential_painting(max_boxes):
    rng = np.random.RandomState(max_boxes)
    shape = (13, 17, 11)
    n = 3
    sizes = rng.randint(1, 20, (n, max_boxes, 3))  # up to beyond the volume: clipped at every border
    centers = rng.randint(0, shape, (n, max_boxes, 3))
    first = centers - sizes // 2
    starts, stops = np.maximum(first, 0), np.minimum(first + sizes, shape)
    counts = np.array([max_boxes, rng.randint(0, max_boxes + 1), 0])
    levels = rng.randint(1, 256, (n, max_boxes))
    boxes = Boxes(*(torch.from_numpy(a) for a in (sizes, centers, starts, stops, levels, counts)))
    painted = paint_boxes(boxes, shape)
    assert painted.dtype == torch.uint8 and painted.shape == (n, 1, *shape)
    np.testing.assert_array_equal(painted.numpy(), _sequential_painting(boxes, shape))
    assert (painted[0] > 0).any() and not painted[2].any()


@pytest.mark.parametrize("n,c", [(2, 1), (3, 2), (4, 1)])
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
