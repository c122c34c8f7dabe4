"""Tests of the Volume Fusion core, VF-v1 boxes, VF-v2 grid, the batched form and the dict forms."""

from __future__ import annotations

import importlib.util
import os
import random

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from misfm_transforms import (
    RandVolumeFusion,
    RandVolumeFusionD,
    RandVolumeFusiond,
    RandVolumeFusionDict,
    RandVolumeFusionGrid,
    RandVolumeFusionGridD,
    RandVolumeFusionGridd,
    fuse_volumes,
    volume_fusion_batch,
)

K = 4
SHAPE = (1, 20, 24, 28)


def _pair(seed: int = 0, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    return rng.rand(*shape).astype(np.float32), rng.rand(*shape).astype(np.float32)


def _reference(fg, bg, label, k=K):
    """The defining identity evaluated directly in float32."""
    a = np.asarray(label).astype(np.float32) / np.float32(k)
    return a * np.asarray(fg, np.float32) + (np.float32(1) - a) * np.asarray(bg, np.float32)


def _pymic_vf_util():
    pymic = pytest.importorskip("pymic")
    path = os.path.join(os.path.dirname(pymic.__file__), "net_run", "self_sup", "util.py")
    spec = importlib.util.spec_from_file_location("pymic_self_sup_util", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_SMALL = {
    RandVolumeFusion: {"box_size_min": (2, 2, 2), "box_size_max": (6, 6, 6)},
    RandVolumeFusionGrid: {"block_size_min": (3, 3, 3), "block_size_max": (7, 7, 7)},
}


def _small(cls):
    """A transform with sizes that suit the small test volumes."""
    return cls(**_SMALL[cls])


# --------------------------------------------------------------------------- fusion core and identity
@pytest.mark.parametrize("kind", ["numpy", "torch", "meta"])
@pytest.mark.parametrize("cls", [RandVolumeFusion, RandVolumeFusionGrid])
def test_identity_exact(kind, cls):
    bg, fg = _pair(1)
    if kind == "torch":
        bg_in, fg_in = torch.from_numpy(bg), torch.from_numpy(fg)
    elif kind == "meta":
        affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0]))
        bg_in, fg_in = MetaTensor(bg, affine=affine, meta={"name": "bg"}), torch.from_numpy(fg)
    else:
        bg_in, fg_in = bg, fg
    fused, label = _small(cls).set_random_state(3)(bg_in, fg_in)
    assert type(fused) is type(bg_in) and type(label) is type(bg_in)
    fused_np, label_np = np.asarray(fused), np.asarray(label)
    assert fused_np.dtype == np.float32 and label_np.dtype == np.uint8
    assert label_np.shape == SHAPE and fused_np.shape == SHAPE
    assert 0 < (label_np > 0).mean() < 1
    np.testing.assert_array_equal(fused_np, _reference(fg, bg, label_np))
    if kind == "meta":
        assert torch.equal(fused.affine, bg_in.affine) and torch.equal(label.affine, bg_in.affine)
        assert fused.meta["name"] == "bg" and label.meta["name"] == "bg"


@pytest.mark.parametrize("as_torch", [False, True])
def test_fuse_volumes_identity_and_dtype(as_torch):
    fg, bg = _pair(2, (2, 6, 7, 8))
    label = np.random.RandomState(0).randint(0, K + 1, (1, 6, 7, 8)).astype(np.uint8)
    args = (torch.from_numpy(fg), torch.from_numpy(bg), torch.from_numpy(label)) if as_torch else (fg, bg, label)
    out = fuse_volumes(*args, K)
    assert isinstance(out, torch.Tensor) == as_torch
    out = np.asarray(out)
    assert out.dtype == np.float32 and out.shape == fg.shape
    np.testing.assert_array_equal(out, _reference(fg, bg, label))
    np.testing.assert_array_equal(np.asarray(fuse_volumes(fg, bg, np.zeros_like(label), K)), bg)
    np.testing.assert_array_equal(np.asarray(fuse_volumes(fg, bg, np.full_like(label, K), K)), fg)


# --------------------------------------------------------------------------- VF-v1 geometry
def test_v1_box_params_over_seeds():
    shape = np.array(SHAPE[1:])
    t = RandVolumeFusion(num_levels=3, num_boxes=(2, 7), box_size_min=(2, 3, 4), box_size_max=(9, 30, 5))
    counts = set()
    for seed in range(200):
        t.set_random_state(seed)
        t.randomize(SHAPE[1:])
        m = len(t.box_levels)
        counts.add(m)
        assert 2 <= m <= 7
        assert t.box_sizes.shape == t.box_centers.shape == t.box_starts.shape == t.box_stops.shape == (m, 3)
        assert (t.box_sizes >= (2, 3, 4)).all() and (t.box_sizes <= (9, 30, 5)).all()
        assert (t.box_centers >= 0).all() and (t.box_centers < shape).all()
        assert ((t.box_levels >= 1) & (t.box_levels <= 3)).all()
        raw = t.box_centers - t.box_sizes // 2
        np.testing.assert_array_equal(t.box_starts, np.maximum(raw, 0))
        np.testing.assert_array_equal(t.box_stops, np.minimum(raw + t.box_sizes, shape))
    assert counts == set(range(2, 8))  # inclusive range, every count reached


def test_v1_label_is_last_box_painted():
    bg, fg = _pair(3)
    t = RandVolumeFusion(num_boxes=(5, 10), box_size_min=(4, 4, 4), box_size_max=(12, 12, 12)).set_random_state(7)
    _, label = t(bg, fg)
    expected = np.zeros(SHAPE, np.uint8)
    for s, e, lv in zip(t.box_starts, t.box_stops, t.box_levels):
        expected[0, s[0] : e[0], s[1] : e[1], s[2] : e[2]] = lv
    np.testing.assert_array_equal(label, expected)
    assert set(np.unique(label)) <= set(range(K + 1))


def test_prob_zero_returns_background():
    bg, fg = _pair(4)
    fused, label = RandVolumeFusion(prob=0.0)(bg, fg)
    assert not label.any()
    np.testing.assert_array_equal(fused, bg)


# --------------------------------------------------------------------------- MONAI-order defaults
PATCH_XYZ = (128, 128, 64)  # the paper's 64 x 128 x 128 patch as MONAI loads it: (x, y, z), slice axis z last


def _extents(label: torch.Tensor) -> np.ndarray:
    """Per-axis extent of the non-zero voxels of a (1, X, Y, Z) label."""
    where = np.nonzero(np.asarray(label)[0])
    return np.array([w.max() - w.min() + 1 for w in where])


def test_default_box_bounds_are_xyz():
    """With their defaults, the array, dict and batched VF-v1 forms draw boxes of at most 80 x 80 along x, y and
    at most 40 along the slice axis z of a (x, y, z) patch; x and y reach beyond 40."""
    array = RandVolumeFusion().set_random_state(0)
    sizes = []
    for _ in range(20):
        array.randomize(PATCH_XYZ)
        sizes.append(array.box_sizes)
    sizes = np.concatenate(sizes)
    assert (sizes.min(0) >= 8).all() and tuple(sizes.max(0)) == (80, 80, 40)

    bg, fg = _pair(0, (1, *PATCH_XYZ))
    single = RandVolumeFusiond(num_boxes=1).set_random_state(1)  # one box: the label's extent is the box's
    extents = np.array([_extents(single({"image": bg, "foreground": fg})["label"]) for _ in range(40)])
    assert (extents <= (80, 80, 40)).all() and (extents[:, :2] > 40).any()
    assert tuple(single.fusion.box_size_max) == (80, 80, 40)

    images = torch.from_numpy(np.concatenate([bg, fg] * 4)[:, None])  # (8, 1, 128, 128, 64)
    g = torch.Generator().manual_seed(2)
    labels = torch.cat([volume_fusion_batch(images, num_boxes=1, generator=g)[1] for _ in range(4)])
    extents = np.array([_extents(lab) for lab in labels])
    assert (extents <= (80, 80, 40)).all() and (extents[:, :2] > 40).any()


# --------------------------------------------------------------------------- VF-v2 geometry
def test_v2_grid_params_over_seeds():
    shape = np.array(SHAPE[1:])
    bg, fg = _pair(5)
    t = RandVolumeFusionGrid(num_levels=K, foreground_ratio=0.6, block_size_min=(3, 4, 5), block_size_max=(7, 9, 11))
    for seed in range(60):
        _, label = t.set_random_state(seed)(bg, fg)
        b, o, grid = t.block_size, t.offset, t.block_labels
        assert (b >= (3, 4, 5)).all() and (b <= (7, 9, 11)).all()
        assert (o >= 0).all() and (o <= shape % b).all()
        assert grid.shape == tuple(shape // b)
        n = grid.size
        assert (grid > 0).sum() == int(n * 0.6)
        assert grid.max() <= K
        end = o + np.array(grid.shape) * b
        inner = label[0, o[0] : end[0], o[1] : end[1], o[2] : end[2]]
        blocks = inner.reshape(grid.shape[0], b[0], grid.shape[1], b[1], grid.shape[2], b[2])
        assert (blocks == grid[:, None, :, None, :, None]).all()  # every block is constant = its level
        margin = np.ones(SHAPE[1:], bool)
        margin[o[0] : end[0], o[1] : end[1], o[2] : end[2]] = False
        assert not label[0][margin].any()  # margins are label 0
        assert int((blocks > 0).sum()) == int(n * 0.6) * int(np.prod(b))


def test_v2_extreme_ratios():
    bg, fg = _pair(6)
    _, label = RandVolumeFusionGrid(foreground_ratio=0.0, block_size_min=(4, 4, 4), block_size_max=(5, 5, 5))(bg, fg)
    assert not label.any()
    t = RandVolumeFusionGrid(foreground_ratio=1.0, block_size_min=(4, 4, 4), block_size_max=(4, 4, 4))
    _, label = t(bg, fg)
    assert (label > 0).all()  # 20, 24, 28 are multiples of 4: no margins


# --------------------------------------------------------------------------- determinism and dict forms
@pytest.mark.parametrize("cls", [RandVolumeFusion, RandVolumeFusionGrid])
def test_determinism(cls):
    bg, fg = _pair(7)
    a = _small(cls).set_random_state(11)(bg, fg)
    b = _small(cls).set_random_state(11)(bg, fg)
    c = _small(cls).set_random_state(12)(bg, fg)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[1], c[1])
    t = _small(cls).set_random_state(11)
    first = t(bg, fg)[1]
    np.testing.assert_array_equal(t(bg, fg, randomize=False)[1], first)  # replay of the last draw


@pytest.mark.parametrize("dict_cls,array_cls", [(RandVolumeFusiond, RandVolumeFusion),
                                                (RandVolumeFusionGridd, RandVolumeFusionGrid)])
def test_dict_forwards_seed_and_writes_keys(dict_cls, array_cls):
    bg, fg = _pair(8)
    affine = torch.diag(torch.tensor([1.5, 1.5, 2.0, 1.0]))
    data = {"image": MetaTensor(bg, affine=affine), "foreground": MetaTensor(fg), "other": 1}
    small = _SMALL[array_cls]
    out = dict_cls(**small).set_random_state(5)(data)
    fused, label = array_cls(**small).set_random_state(5)(bg, fg)
    np.testing.assert_array_equal(out["label"].numpy(), label)
    np.testing.assert_array_equal(out["image"].numpy(), fused)
    assert torch.equal(out["image"].affine, affine) and torch.equal(out["label"].affine, affine)
    assert out["other"] == 1 and out["foreground"] is data["foreground"]
    other = dict_cls(**small).set_random_state(6)(data)
    assert not torch.equal(other["label"], out["label"])
    t = dict_cls(background_key="a", foreground_key="b", label_key="c")
    assert t.set_random_state(1) is t
    with pytest.raises(KeyError, match="not found"):
        t({"a": bg})
    assert dict_cls(background_key="a", foreground_key="b", allow_missing_keys=True)({"a": bg}) == {"a": bg}


def test_aliases():
    assert RandVolumeFusionD is RandVolumeFusiond and RandVolumeFusionDict is RandVolumeFusiond
    assert RandVolumeFusionGridD is RandVolumeFusionGridd


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "make,err,words",
    [
        (lambda: RandVolumeFusion(num_levels=0), ValueError, "num_levels"),
        (lambda: RandVolumeFusion(num_levels=2.5), TypeError, "num_levels"),
        (lambda: RandVolumeFusion(num_boxes=(5, 2)), ValueError, "min > max"),
        (lambda: RandVolumeFusion(num_boxes=(-1, 2)), ValueError, "negative"),
        (lambda: RandVolumeFusion(box_size_min=(9, 8, 8), box_size_max=(8, 8, 8)), ValueError, "min > max"),
        (lambda: RandVolumeFusion(box_size_min=(-2, 8, 8)), ValueError, "negative"),
        (lambda: RandVolumeFusion(box_size_min=(8, 8)), ValueError, "3 values"),
        (lambda: RandVolumeFusionGrid(foreground_ratio=1.5), ValueError, "foreground_ratio"),
        (lambda: RandVolumeFusionGrid(foreground_ratio=-0.1), ValueError, "[0, 1]"),
        (lambda: RandVolumeFusionGrid(block_size_min=(40, 8, 8), block_size_max=(32, 32, 32)), ValueError, "min > max"),
    ],
)
def test_constructor_errors(make, err, words):
    with pytest.raises(err, match=words.replace("[", r"\[").replace("]", r"\]")):
        make()


@pytest.mark.parametrize("cls", [RandVolumeFusion, RandVolumeFusionGrid])
def test_call_errors(cls):
    bg, fg = _pair(9)
    t = cls(block_size_min=(2, 2, 2), block_size_max=(4, 4, 4)) if cls is RandVolumeFusionGrid else cls()
    with pytest.raises(ValueError, match=r"\(C, X, Y, Z\).*\(20, 24, 28\)"):
        t(bg[0], fg[0])
    with pytest.raises(ValueError, match="shapes differ.*\\(1, 20, 24, 27\\)"):
        t(bg, fg[..., :-1])
    bad = fg.copy()
    bad[0, 3, 4, 5] = np.nan
    with pytest.raises(ValueError, match="non-finite.*\\(1, 20, 24, 28\\)"):
        t(bg, bad)
    bad[0, 3, 4, 5] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        t(torch.from_numpy(bad), torch.from_numpy(fg))


def test_grid_volume_smaller_than_block():
    bg, fg = _pair(10, (1, 6, 24, 28))
    with pytest.raises(ValueError, match=r"\(6, 24, 28\) is smaller than block_size_min"):
        RandVolumeFusionGrid(block_size_min=(8, 8, 8))(bg, fg)


def test_fuse_volumes_errors():
    fg, bg = _pair(11, (1, 4, 4, 4))
    with pytest.raises(ValueError, match="label values must be in 0..4"):
        fuse_volumes(fg, bg, np.full((1, 4, 4, 4), 5, np.uint8), 4)
    with pytest.raises(ValueError, match="does not broadcast"):
        fuse_volumes(fg, bg, np.zeros((1, 4, 4, 3), np.uint8), 4)
    with pytest.raises(ValueError, match="num_levels"):
        fuse_volumes(fg, bg, np.zeros((1, 4, 4, 4), np.uint8), 0)


# --------------------------------------------------------------------------- batched torch form
def test_batch_shapes_identity_determinism():
    x = torch.rand(3, 2, 12, 16, 20)
    g = torch.Generator().manual_seed(0)
    fused, label = volume_fusion_batch(x, num_boxes=(3, 6), box_size_min=(2, 2, 2), box_size_max=(8, 10, 12),
                                       generator=g)
    assert fused.shape == x.shape and fused.dtype == torch.float32 and fused.device == x.device
    assert label.shape == (3, 1, 12, 16, 20) and label.dtype == torch.int64
    assert 0 <= int(label.min()) and int(label.max()) <= K and (label > 0).any()
    ref = _reference(x.roll(1, 0).numpy(), x.numpy(), label.numpy())
    np.testing.assert_array_equal(fused.numpy(), ref)
    again = volume_fusion_batch(x, num_boxes=(3, 6), box_size_min=(2, 2, 2), box_size_max=(8, 10, 12),
                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[1], label) and torch.equal(again[0], fused)
    other = volume_fusion_batch(x, num_boxes=(3, 6), box_size_min=(2, 2, 2), box_size_max=(8, 10, 12),
                                generator=torch.Generator().manual_seed(1))
    assert not torch.equal(other[1], label)


def test_batch_of_one_is_refused_and_errors():
    x = torch.rand(1, 1, 8, 8, 8)
    with pytest.raises(ValueError,
                       match=r"at least 2 volumes.*batch of 1 would fuse a volume with itself.*batch_size >= 2"):
        volume_fusion_batch(x, box_size_min=(2, 2, 2), box_size_max=(4, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, C, X, Y, Z\).*\(1, 8, 8, 8\)"):
        volume_fusion_batch(x[0])
    with pytest.raises(TypeError, match="torch.Tensor"):
        volume_fusion_batch(x.numpy())
    pair = torch.rand(2, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="num_levels"):
        volume_fusion_batch(pair, num_levels=0)
    with pytest.raises(ValueError, match=r"generator is on cpu but images are on meta.*torch.Generator\(device="):
        volume_fusion_batch(pair.to("meta"), generator=torch.Generator())
    nan = torch.full((2, 1, 4, 4, 4), float("nan"))
    with pytest.raises(ValueError, match=r"non-finite.*\(2, 1, 4, 4, 4\)"):
        volume_fusion_batch(nan, box_size_min=(1, 1, 1), box_size_max=(2, 2, 2))
    fused, _ = volume_fusion_batch(nan, box_size_min=(1, 1, 1), box_size_max=(2, 2, 2), validate=False)
    assert torch.isnan(fused).all()  # validate=False skips the check (the device default)


def test_batch_on_meta_tensors_makes_no_host_sync():
    """Meta tensors hold no data: any .item(), .tolist(), bool(tensor) or data-dependent shape raises. The whole
    batched path (draws, painting, fusion) runs on them; validate=None skips the NaN check off the CPU."""
    images = torch.empty(3, 2, 24, 20, 12, device="meta")
    for num_boxes in ((10, 40), (0, 120)):  # 120 boxes: three painter words
        fused, label = volume_fusion_batch(images, num_boxes=num_boxes, box_size_min=(2, 2, 2),
                                           box_size_max=(12, 10, 6))
        assert fused.device.type == "meta" and fused.shape == images.shape and fused.dtype == torch.float32
        assert label.device.type == "meta" and label.shape == (3, 1, 24, 20, 12) and label.dtype == torch.int64


def test_batch_box_count_statistics():
    """With boxes of one voxel that never overlap much, the painted-voxel count tracks the box count range."""
    x = torch.rand(64, 1, 32, 32, 32)
    _, label = volume_fusion_batch(x, num_boxes=(0, 4), box_size_min=(1, 1, 1), box_size_max=(1, 1, 1),
                                   generator=torch.Generator().manual_seed(3))
    painted = (label > 0).flatten(1).sum(1)
    assert painted.max() <= 4 and painted.min() == 0
    assert abs(painted.float().mean().item() - 2.0) < 0.5


# --------------------------------------------------------------------------- pymic oracle: exact replay
def test_replay_vf1_against_pymic():
    util = _pymic_vf_util()
    x = torch.rand(3, 1, 16, 24, 24, generator=torch.Generator().manual_seed(0))
    for seed in range(5):
        random.seed(seed)
        pm_fused, pm_label = util.volume_fusion(x, K, [3, 10], [2, 4, 4], [8, 16, 16])
        ours = fuse_volumes(x.roll(1, 0), x, pm_label, K)
        assert (pm_label > 0).any()
        torch.testing.assert_close(ours, pm_fused, rtol=0, atol=1e-6)


def test_replay_vf2_against_pymic():
    pytest.importorskip("pymic")
    from pymic import TaskType
    from pymic.transform.crop4vf import Crop4VolumeFusion, VolumeFusion

    params = {"task": TaskType.SEGMENTATION, "crop4volumefusion_output_size": [16, 32, 32],
              "volumefusion_cls_num": K + 1, "volumefusion_foreground_ratio": 0.7,
              "volumefusion_patchsize_min": [3, 4, 4], "volumefusion_patchsize_max": [8, 12, 12]}
    volume = np.random.RandomState(0).rand(1, 24, 40, 40).astype(np.float32)
    for seed in range(5):
        random.seed(seed)
        np.random.seed(seed)
        sample = Crop4VolumeFusion(params)({"image": volume.copy()})
        patch_1, patch_2 = (p.copy() for p in sample["image"])
        sample = VolumeFusion(params)(sample)
        ours = fuse_volumes(patch_1, patch_2, sample["label"], K)  # patch_1 is the foreground
        assert sample["image"].dtype == np.float64 and ours.dtype == np.float32
        np.testing.assert_allclose(ours, sample["image"], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- pymic oracle: statistics
def _level_fractions(labels) -> np.ndarray:
    counts = sum(np.bincount(np.asarray(lab).ravel().astype(np.int64), minlength=K + 1) for lab in labels)
    return counts / counts.sum()


def test_vf2_level_statistics_match_pymic():
    pytest.importorskip("pymic")
    from pymic import TaskType
    from pymic.transform.crop4vf import VolumeFusion

    shape = (1, 24, 32, 40)
    params = {"task": TaskType.SEGMENTATION, "volumefusion_cls_num": K + 1, "volumefusion_foreground_ratio": 0.7,
              "volumefusion_patchsize_min": [3, 4, 5], "volumefusion_patchsize_max": [9, 14, 17]}
    fg, bg = _pair(12, shape)
    pm = VolumeFusion(params)
    ours = RandVolumeFusionGrid(K, 0.7, (3, 4, 5), (9, 14, 17)).set_random_state(0)
    pm_labels, our_labels = [], []
    random.seed(0)
    for _ in range(300):
        pm_labels.append(pm({"image": (fg, bg)})["label"])
        our_labels.append(ours(bg, fg)[1])
    f_pm, f_ours = _level_fractions(pm_labels), _level_fractions(our_labels)
    assert f_ours[0] > 0.3  # margins + 30 % background blocks
    np.testing.assert_allclose(f_ours, f_pm, atol=0.02)


def test_vf1_level_statistics_match_pymic():
    """600 samples each: the level-0 fraction has a per-sample std of ~0.08, so 0.02 is > 4 standard errors."""
    util = _pymic_vf_util()
    x = torch.rand(2, 1, 16, 24, 24, generator=torch.Generator().manual_seed(1))
    args = dict(num_boxes=(2, 8), box_size_min=(2, 4, 4), box_size_max=(10, 16, 16))
    random.seed(0)
    pm_labels = [util.volume_fusion(x, K, [2, 8], [2, 4, 4], [10, 16, 16])[1] for _ in range(300)]
    ours = RandVolumeFusion(K, **args).set_random_state(0)
    our_labels = [ours(x[0], x[1])[1] for _ in range(600)]
    g = torch.Generator().manual_seed(0)
    batch_labels = [volume_fusion_batch(x, K, generator=g, **args)[1] for _ in range(300)]
    f_pm, f_ours, f_batch = _level_fractions(pm_labels), _level_fractions(our_labels), _level_fractions(batch_labels)
    assert 0.2 < f_pm[0] < 0.9
    np.testing.assert_allclose(f_ours, f_pm, atol=0.02)
    np.testing.assert_allclose(f_batch, f_pm, atol=0.02)
