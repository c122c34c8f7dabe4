"""Checks of the fast paths of RandPairCropForVolumeFusion: exact tail order statistics, flips folded into the
resize, no aliasing of the input, and the fused intensity chain against the public helpers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from misfm_transforms import RandPairCropForVolumeFusion, adaptive_contrast, gamma_correction, resize_linear
from misfm_transforms import pair_crop
from misfm_transforms.pair_crop import _SUBSAMPLE, _resize, _tail_order_stats


def _arrays():
    rng = np.random.RandomState(0)
    n = 64 * 48
    periodic = np.zeros(n, np.float32)  # every subsampled element is an extreme: the subsample is biased
    periodic[::_SUBSAMPLE] = 100.0
    periodic[1::_SUBSAMPLE] = -100.0
    periodic += rng.rand(n).astype(np.float32)
    yield "noise", rng.randn(20000).astype(np.float32)
    yield "ties", np.clip(np.round(rng.randn(20000) * 2), -3, 3).astype(np.float32)
    yield "cauchy", rng.standard_cauchy(30001).astype(np.float32)
    yield "constant", np.full(5000, 2.5, np.float32)
    yield "tiny", rng.rand(7).astype(np.float32)
    yield "periodic", periodic
    yield "interpolated", resize_linear(torch.from_numpy(rng.randn(1, 9, 33, 65).astype(np.float32)), (16, 64, 128)).numpy().ravel()


@pytest.mark.parametrize("p0,p1", [(0.1, 99.9), (1.3, 98.4), (2.0, 98.0), (0.0, 100.0)])
def test_tail_order_stats_exact(p0, p1):
    for name, flat in _arrays():
        n = flat.size
        k0, k1 = int((n - 1) * p0 / 100), int((n - 1) * p1 / 100)
        low_ranks, high_ranks = [k0, min(k0 + 1, n - 1), 0], [k1, min(k1 + 1, n - 1), n - 1]
        low, high, lo_index, hi_index = _tail_order_stats(flat, low_ranks, high_ranks)
        ordered = np.sort(flat)
        assert low == [float(ordered[k]) for k in low_ranks], name
        assert high == [float(ordered[k]) for k in high_ranks], name
        if lo_index is not None:  # the tails hold every value beyond the selected ranks
            assert np.count_nonzero(flat < low[0]) <= lo_index.size
            assert set(np.flatnonzero(flat <= low[1]).tolist()) <= set(lo_index.tolist()), name
            assert set(np.flatnonzero(flat >= high[0]).tolist()) <= set(hi_index.tolist()), name


@pytest.mark.parametrize("p0,p1", [(0.1, 99.9), (1.7, 98.2)])
def test_adaptive_contrast_equals_percentile_formula(p0, p1):
    for name, flat in _arrays():
        if np.ptp(flat) == 0:
            continue
        v0, v1 = (np.float32(v) for v in np.percentile(flat, [p0, p1]))
        vmin, vmax = flat.min(), flat.max()
        ref = np.subtract(flat, v0)
        ref *= np.float32(0.8) / (v1 - v0) if v1 > v0 else np.float32(0.0)
        ref += np.float32(0.1)
        lower, upper = flat < v0, flat > v1
        with np.errstate(divide="ignore"):  # (v0 == min: no voxel takes the lower piece)
            ref[lower] = (flat[lower] - vmin) * (np.float32(0.1) / (v0 - vmin))
            ref[upper] = (flat[upper] - v1) * (np.float32(0.1) / (vmax - v1)) + np.float32(0.9)
        out = adaptive_contrast(flat, p0, p1)
        np.testing.assert_array_equal(out, ref, err_msg=name)
        assert out is not flat


@pytest.mark.parametrize("crop", [(9, 17, 30), (30, 20, 12), (12, 40, 40), (12, 20, 24), (5, 20, 24), (12, 7, 9)])
def test_resize_with_folded_flips_equals_flip_of_resize(crop):
    image = torch.from_numpy(np.random.RandomState(1).randn(2, 30, 40, 40).astype(np.float32))
    view = image[:, 1 : 1 + crop[0], 2 : 2 + crop[1], 3 : 3 + crop[2]]  # a strided view, as in the transform
    plain = resize_linear(view, (12, 20, 24))
    for flip in itertools.product([False, True], repeat=3):
        dims = [d + 1 for d in range(3) if flip[d]]
        expected = torch.flip(plain, dims) if dims else plain
        out = _resize(view, (12, 20, 24), flip)
        assert out.is_contiguous() and out.data_ptr() != image.data_ptr()
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("cost", [(1.0, 1e9), (1e9, 1.0)])
def test_both_resize_orders_agree(monkeypatch, cost):
    """The cost model only picks the order; both orders give the same values up to float32 rounding."""
    image = torch.from_numpy(np.random.RandomState(2).rand(1, 25, 33, 47).astype(np.float32))
    reference = resize_linear(image, (16, 20, 24))
    monkeypatch.setattr(pair_crop, "_COST_BILINEAR", cost[0])
    monkeypatch.setattr(pair_crop, "_COST_LERP", cost[1])
    torch.testing.assert_close(resize_linear(image, (16, 20, 24)), reference, rtol=0, atol=1e-6)


def test_resize_linear_never_returns_the_input():
    image = torch.rand(1, 6, 7, 8)
    out = resize_linear(image, (6, 7, 8))
    assert torch.equal(out, image) and out.data_ptr() != image.data_ptr()


@pytest.mark.parametrize("intensity", [True, False])
def test_input_not_modified_when_crop_is_the_whole_volume(intensity):
    volume = np.random.RandomState(3).rand(1, 8, 10, 12).astype(np.float32)
    original = volume.copy()
    t = RandPairCropForVolumeFusion((8, 10, 12), scale_range=(1.0, 1.0), flip=False, intensity_augment=intensity)
    for invert_prob in (0.0, 1.0):
        t.invert_prob = invert_prob
        a, b = t.set_random_state(0)(volume)
        np.testing.assert_array_equal(volume, original)
        assert not np.shares_memory(a, volume) and not np.shares_memory(b, volume)
        if not intensity:
            np.testing.assert_array_equal(a, volume)


def test_intensity_chain_matches_public_helpers():
    """The in-place chain (contrast, fast power, inversion) equals gamma_correction(adaptive_contrast(.)) up to the
    power function's rounding (exp2(g * log2(x)) vs np.power: < 1e-6 on [0, 1])."""
    volume = (np.random.RandomState(4).randn(1, 20, 32, 36) * 50 + 10).astype(np.float32)
    for seed in range(6):
        t = RandPairCropForVolumeFusion((12, 20, 24), invert_prob=0.5).set_random_state(seed)
        plain = RandPairCropForVolumeFusion((12, 20, 24), intensity_augment=False).set_random_state(seed)
        patches, raw = t(volume), plain(volume)
        for i in range(2):
            ref = gamma_correction(adaptive_contrast(raw[i], *t.percentiles[i]), t.gammas[i])
            ref = 1 - ref if t.invert else ref
            np.testing.assert_allclose(patches[i], ref, rtol=0, atol=1e-6)


def test_fast_power_accuracy():
    x = np.concatenate([np.linspace(0, 1, 100001, dtype=np.float32), np.float32([1e-30, 1e-38, 0.0, 1.0])])
    for gamma in (0.7, 0.93, 1.0, 1.27, 1.5):
        fast = gamma_correction(np.concatenate([x, np.float32([0, 1])]), gamma, fast_power=True)[: x.size]
        np.testing.assert_allclose(fast, np.power(x, np.float32(gamma)), rtol=0, atol=2e-7)
        assert fast[x == 0].max() == 0 and fast[x == 1].min() == 1


@pytest.mark.parametrize("p0,p1", [(0.1, 99.9), (1.7, 98.2), (2.0, 98.0)])
def test_contrast_range_equals_min_max(p0, p1):
    """The output range derived from the exact order statistics equals the contrast output's min and max."""
    arrays = list(_arrays()) + [("clipped", np.clip(np.random.RandomState(5).randn(20000), -1, 3).astype(np.float32))]
    for name, flat in arrays:
        out, out_min, out_max, finite = pair_crop._contrast_range_inplace(flat.copy(), p0, p1)
        assert finite, name
        assert (out_min, out_max) == (out.min(), out.max()), name


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("count", [1, 50, 10**6])
def test_non_finite_caught_without_check_pass(bad, count):
    """With intensity augmentation the finite check is the contrast's order statistics: one NaN/inf voxel in a
    crop, many (the subsample thresholds themselves non-finite) or all of them raise the usual error."""
    volume = np.random.RandomState(6).randn(1, 20, 32, 36).astype(np.float32)
    flat = volume.reshape(-1)
    flat[np.random.RandomState(7).permutation(flat.size)[: min(count, flat.size)]] = bad
    for intensity in (True, False):
        t = RandPairCropForVolumeFusion((12, 20, 24), scale_range=(1.0, 1.0), intensity_augment=intensity)
        crop_all = RandPairCropForVolumeFusion((20, 32, 36), scale_range=(1.0, 1.0), intensity_augment=intensity)
        message = r"non-finite values \(NaN or inf\) in the cropped input.*\(1, 20, 32, 36\)"
        with pytest.raises(ValueError, match=message):
            crop_all(volume)
        if count > 1:
            with pytest.raises(ValueError, match="non-finite"):
                t.set_random_state(0)(volume)
