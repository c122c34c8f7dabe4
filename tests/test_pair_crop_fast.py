"""Checks of RandPairCropForVolumeFusion's own pieces: the separable resize against MONAI's trilinear Resize, the
two-partition percentiles against numpy.percentile, the degenerate contrast cases, the exp/log power against
np.power, no aliasing of the input, and the error paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Resize

from misfm_transforms import RandPairCropForVolumeFusion, adaptive_contrast, gamma_correction, resize_linear
from misfm_transforms.pair_crop import _percentiles


def _arrays():
    rng = np.random.RandomState(0)
    smooth = torch.nn.functional.interpolate(torch.from_numpy(rng.randn(1, 1, 9, 33, 65).astype(np.float32)),
                                             size=(16, 64, 128), mode="trilinear", align_corners=True)
    yield "noise", rng.randn(20000).astype(np.float32)
    yield "ties", np.clip(np.round(rng.randn(20000) * 2), -3, 3).astype(np.float32)
    yield "cauchy", rng.standard_cauchy(30001).astype(np.float32)
    yield "constant", np.full(5000, 2.5, np.float32)
    yield "tiny", rng.rand(7).astype(np.float32)
    yield "one", np.float32([4.0])
    yield "interpolated", smooth.numpy().ravel()


@pytest.mark.parametrize("shape,out", [((1, 9, 17, 30), (12, 20, 24)), ((3, 20, 30, 40), (10, 31, 17)),
                                       ((2, 1, 5, 7), (3, 5, 9)), ((1, 6, 7, 8), (6, 7, 8))])
def test_resize_linear_is_monai_trilinear_resize(shape, out):
    image = torch.from_numpy(np.random.RandomState(1).randn(*shape).astype(np.float32))
    view = image[:, :, :, 1:] if shape[3] > 2 else image  # a strided view, as a crop is
    ours = resize_linear(view, out)
    monai = Resize(out, mode="trilinear", align_corners=True)(view).as_tensor()
    assert ours.shape == monai.shape and ours.is_contiguous() and ours.data_ptr() != image.data_ptr()
    torch.testing.assert_close(ours, monai, rtol=0, atol=1e-6 * float(image.abs().max()))


@pytest.mark.parametrize("q_low,q_high", [(0.1, 99.9), (1.3, 98.4), (2.0, 98.0), (0.0, 100.0), (50.0, 50.0)])
def test_percentiles_equal_numpy_bitwise(q_low, q_high):
    for name, values in _arrays():
        original = values.copy()
        ours = _percentiles(values, q_low, q_high)
        expected = tuple(float(np.percentile(values, q)) for q in (q_low, q_high))
        assert ours == expected, name
        np.testing.assert_array_equal(values, original)  # partitions a copy


def test_contrast_degenerate_percentiles():
    """v0 == min (ties at the bottom): no lower piece, the middle starts at 0.1. v1 == v0 (a mostly constant
    patch): the middle maps to 0.1 where pymic divides by zero, the upper piece keeps
    0.9 + 0.1 (x - v1) / (max - v1)."""
    ties = np.concatenate([np.zeros(500), np.linspace(0, 1, 500)]).astype(np.float32)
    out = adaptive_contrast(ties, 1.0, 99.0)
    assert out.min() == pytest.approx(0.1) and out.max() == pytest.approx(1.0)
    flat = np.zeros(1000, np.float32)
    flat[:5], flat[-5:] = -np.arange(5, 0, -1), np.arange(1, 6)
    out = adaptive_contrast(flat, 1.0, 99.0)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[5:-5], 0.1, atol=1e-7)
    np.testing.assert_allclose(out[-5:], 0.9 + 0.1 * np.arange(1, 6) / 5, atol=1e-6)
    np.testing.assert_allclose(out[:5], 0.1 * np.arange(5) / 5, atol=1e-6)


def test_gamma_power_accuracy_and_edges():
    """x ** gamma as exp(gamma * log x): within 3e-7 of np.power on [0, 1]; 0 stays 0 and 1 stays 1."""
    x = np.concatenate([np.linspace(0, 1, 100001, dtype=np.float32), np.float32([1e-30, 1e-38])])
    for gamma in (0.7, 0.93, 1.0, 1.27, 1.5):
        out = gamma_correction(x, gamma)
        np.testing.assert_allclose(out, np.power(x, np.float32(gamma)), rtol=0, atol=3e-7)
        assert out[0] == 0 and out[100000] == 1
    with pytest.raises(ValueError, match="gamma must be positive"):
        gamma_correction(x, 0.0)
    with pytest.raises(ValueError, match="p0 <= 50 <= p1"):
        adaptive_contrast(x, 60.0, 99.0)


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


def test_intensity_chain_is_the_public_helpers():
    volume = (np.random.RandomState(4).randn(1, 20, 32, 36) * 50 + 10).astype(np.float32)
    for seed in range(6):
        t = RandPairCropForVolumeFusion((12, 20, 24), invert_prob=0.5).set_random_state(seed)
        plain = RandPairCropForVolumeFusion((12, 20, 24), intensity_augment=False).set_random_state(seed)
        patches, raw = t(volume), plain(volume)
        for i in range(2):
            ref = gamma_correction(adaptive_contrast(raw[i], *t.percentiles[i]), t.gammas[i])
            np.testing.assert_array_equal(patches[i], 1 - ref if t.invert else ref)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("count", [1, 50, 10**6])
def test_non_finite_input_raises(bad, count):
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
