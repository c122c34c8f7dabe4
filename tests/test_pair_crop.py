"""Tests of RandPairCropForVolumeFusion (VF-v2 input pair) and its helpers, with pymic 0.6.2 as oracle."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from misfm_transforms import (
    RandPairCropForVolumeFusion,
    RandPairCropForVolumeFusionD,
    RandPairCropForVolumeFusiond,
    RandVolumeFusionGridd,
    adaptive_contrast,
    gamma_correction,
    resize_linear,
)

OUT = (12, 20, 24)


def _volume(seed: int = 0, shape=(1, 20, 32, 36)) -> np.ndarray:
    """Smooth structure plus noise, so crops, flips and contrast have visible effects."""
    rng = np.random.RandomState(seed)
    grid = np.meshgrid(*[np.linspace(0, 1, s) for s in shape[1:]], indexing="ij")
    smooth = np.sin(3 * grid[0]) + grid[1] ** 2 - 0.5 * grid[2]
    return (smooth[None] * 300 + rng.randn(*shape) * 40).astype(np.float32)


@pytest.mark.parametrize("crop,out", [((9, 17, 30), OUT), ((20, 32, 36), (20, 16, 50)), ((1, 5, 7), (3, 5, 9))])
def test_resize_matches_scipy_zoom(crop, out):
    """Same corner-aligned grid as zoom(order=1). mode="nearest": with zoom's default mode="constant" (used by
    pymic) a last slice whose coordinate rounds to n - 1 + 4e-15 becomes cval = 0; ours keeps the edge value."""
    image = _volume(1)[:, : crop[0], : crop[1], : crop[2]]
    ours = resize_linear(torch.from_numpy(np.ascontiguousarray(image)), out).numpy()
    ref = ndimage.zoom(image, [1.0] + [o / c for o, c in zip(out, crop)], order=1, mode="nearest")
    assert ours.shape == ref.shape == (1, *out)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(image).max())


def test_crop_without_augmentation_is_zoom_of_drawn_crop():
    volume = _volume(2)
    t = RandPairCropForVolumeFusion(OUT, flip=False, intensity_augment=False).set_random_state(4)
    patches = t(volume)
    for i, patch in enumerate(patches):
        (x0, y0, z0), (sx, sy, sz) = t.crop_starts[i], t.crop_sizes[i]
        crop = volume[:, x0 : x0 + sx, y0 : y0 + sy, z0 : z0 + sz]
        ref = ndimage.zoom(crop, [1.0] + [o / c for o, c in zip(OUT, crop.shape[1:])], order=1, mode="nearest")
        np.testing.assert_allclose(patch, ref, rtol=0, atol=1e-3)


def test_drawn_parameters_over_seeds():
    shape = np.array((20, 32, 36))
    t = RandPairCropForVolumeFusion(OUT, scale_range=(0.5, 2.0))
    flips, inverts = [], []
    for seed in range(300):
        t.set_random_state(seed)
        t.randomize(tuple(shape))
        assert (t.crop_sizes >= np.floor(np.array(OUT) * 0.5)).all()
        assert (t.crop_sizes <= np.minimum(np.array(OUT) * 2.0, shape)).all()
        assert (t.crop_starts >= 0).all() and (t.crop_starts + t.crop_sizes <= shape).all()
        assert ((t.percentiles[:, 0] >= 0.1) & (t.percentiles[:, 0] <= 2.0)).all()
        assert ((t.percentiles[:, 1] >= 98.0) & (t.percentiles[:, 1] <= 99.9)).all()
        assert ((t.gammas >= 0.7) & (t.gammas <= 1.5)).all()
        flips.append(t.flips)
        inverts.append(t.invert)
    assert abs(np.mean(flips) - 0.5) < 0.05 and abs(np.mean(inverts) - 0.25) < 0.06


def test_flip_is_applied():
    volume = _volume(3)
    base = RandPairCropForVolumeFusion(OUT, flip=False, intensity_augment=False).set_random_state(9)
    flipped = RandPairCropForVolumeFusion(OUT, intensity_augment=False).set_random_state(9)
    plain, out = base(volume), flipped(volume)
    for i in range(2):
        dims = [d + 1 for d in range(3) if flipped.flips[i, d]]
        np.testing.assert_allclose(out[i], np.flip(plain[i], dims) if dims else plain[i], atol=1e-4)


@pytest.mark.parametrize("kind", ["noise", "ties", "heavy"])
@pytest.mark.parametrize("p0,p1", [(0.1, 99.9), (1.3, 98.4), (2.0, 98.0)])
def test_adaptive_contrast_matches_pymic(kind, p0, p1):
    pytest.importorskip("pymic")
    from pymic.transform.intensity import adaptive_contrast_adjust

    rng = np.random.RandomState(5)
    image = {
        "noise": rng.rand(1, 24, 30, 30),
        "ties": np.clip(np.round(rng.randn(1, 24, 30, 30) * 3), -3, 4),  # many ties; v0 == min
        "heavy": rng.standard_cauchy((1, 24, 30, 30)),
    }[kind].astype(np.float32)
    ours = adaptive_contrast(image, p0, p1)
    ref = adaptive_contrast_adjust(image.copy(), p0, p1)
    assert ours.dtype == np.float32 and ours.shape == image.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6)
    assert ours.min() >= 0 and ours.max() <= 1 + 1e-6


def test_gamma_matches_pymic():
    pytest.importorskip("pymic")
    from pymic.transform.intensity import gamma_correction as pm_gamma

    image = _volume(6)
    for seed, img in enumerate([image, (image - image.min()) / (image.max() - image.min())]):
        random.seed(seed)
        ref = pm_gamma(img.copy(), 0.7, 1.5)
        random.seed(seed)
        gamma = random.random() * 0.8 + 0.7
        np.testing.assert_allclose(gamma_correction(img.copy(), gamma), ref, rtol=1e-5, atol=1e-4)
    const = np.full((1, 2, 2, 2), 3.0, np.float32)
    np.testing.assert_array_equal(gamma_correction(const.copy(), 1.3), const)


def test_full_pipeline_against_pymic_with_replayed_params():
    """Our pair crop with pymic's drawn parameters plugged in reproduces pymic's patches."""
    volume = _volume(7)
    t = RandPairCropForVolumeFusion(OUT, flip=False).set_random_state(0)
    p1, p2 = t(volume)
    pytest.importorskip("pymic")
    from pymic.transform.intensity import adaptive_contrast_adjust

    for i, patch in enumerate((p1, p2)):
        (x0, y0, z0), (sx, sy, sz) = t.crop_starts[i], t.crop_sizes[i]
        crop = volume[:, x0 : x0 + sx, y0 : y0 + sy, z0 : z0 + sz]
        ref = ndimage.zoom(crop, [1.0] + [o / c for o, c in zip(OUT, crop.shape[1:])], order=1, mode="nearest")
        ref = adaptive_contrast_adjust(ref, *t.percentiles[i])
        ref = ref ** np.float32(t.gammas[i])  # after the contrast step min = 0 and max = 1
        ref = 1 - ref if t.invert else ref
        np.testing.assert_allclose(patch, ref, rtol=0, atol=2e-3)


def test_statistics_match_pymic():
    """Mean / std / flip-sensitive moment of the patches over 200 seeds agree with pymic's Crop4VolumeFusion."""
    pytest.importorskip("pymic")
    from pymic import TaskType
    from pymic.transform.crop4vf import Crop4VolumeFusion

    volume = _volume(8)
    params = {"task": TaskType.SEGMENTATION, "crop4volumefusion_output_size": list(OUT)}
    pm = Crop4VolumeFusion(params)
    ours = RandPairCropForVolumeFusion(OUT).set_random_state(0)
    ramp = np.linspace(-1, 1, OUT[0])[:, None, None]  # a first-axis moment: its sign flips with the patch

    def stats(patches):
        a = np.stack([np.asarray(p, np.float64)[0] for p in patches])
        return np.array([a.mean(), a.std(axis=(1, 2, 3)).mean(), np.abs((a * ramp).mean(axis=(1, 2, 3))).mean()])

    random.seed(0)
    pm_patches = [p for _ in range(200) for p in pm({"image": volume.copy()})["image"]]
    our_patches = [p for _ in range(200) for p in ours(volume)]
    s_pm, s_ours = stats(pm_patches), stats(our_patches)
    np.testing.assert_allclose(s_ours, s_pm, atol=0.03)


@pytest.mark.parametrize("kind", ["numpy", "torch", "meta"])
def test_types_and_determinism(kind):
    volume = _volume(9)
    affine = torch.diag(torch.tensor([0.5, 0.5, 2.0, 1.0]))
    img = {"numpy": volume, "torch": torch.from_numpy(volume), "meta": MetaTensor(volume, affine=affine)}[kind]
    a = RandPairCropForVolumeFusion(OUT).set_random_state(3)(img)
    b = RandPairCropForVolumeFusion(OUT).set_random_state(3)(img)
    c = RandPairCropForVolumeFusion(OUT).set_random_state(4)(img)
    for x, y in zip(a, b):
        assert type(x) is type(img) and tuple(x.shape) == (1, *OUT)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert np.asarray(x).dtype == np.float32
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))
    if kind == "meta":
        assert torch.equal(a[0].affine, affine)


def test_dict_form_and_pipeline():
    volume = _volume(10)
    d = RandPairCropForVolumeFusiond(keys="image", foreground_key="foreground", spatial_size=OUT).set_random_state(2)
    out = d({"image": volume})
    fg, bg = RandPairCropForVolumeFusion(OUT).set_random_state(2)(volume)
    np.testing.assert_array_equal(out["foreground"], fg)
    np.testing.assert_array_equal(out["image"], bg)
    fused = RandVolumeFusionGridd(block_size_min=(3, 3, 3), block_size_max=(6, 6, 6)).set_random_state(0)(out)
    assert fused["label"].shape == (1, *OUT) and fused["image"].dtype == np.float32
    assert RandPairCropForVolumeFusionD is RandPairCropForVolumeFusiond
    with pytest.raises(ValueError, match="one foreground_key per key"):
        RandPairCropForVolumeFusiond(keys=("a", "b"), foreground_key="a_fg", spatial_size=OUT)


def test_dict_default_spatial_size_is_xyz():
    """The dict form's default patch is the paper's 64 x 128 x 128 in MONAI's (x, y, z) order."""
    volume = np.random.RandomState(12).rand(1, 160, 150, 80).astype(np.float32)
    out = RandPairCropForVolumeFusiond(keys="image").set_random_state(0)({"image": volume})
    assert out["image"].shape == out["foreground"].shape == (1, 128, 128, 64)


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"spatial_size": (4, 4)}, "3 positive"),
        ({"spatial_size": (4, -4, 4)}, "negative"),
        ({"spatial_size": OUT, "scale_range": (1.5, 0.7)}, "min > max"),
        ({"spatial_size": OUT, "scale_range": (-1.0, 0.7)}, "positive"),
        ({"spatial_size": OUT, "scale_range": (1, 2, 3)}, "scale_range"),
        ({"spatial_size": OUT, "invert_prob": 1.5}, "invert_prob"),
    ],
)
def test_constructor_errors(kwargs, words):
    with pytest.raises(ValueError, match=words):
        RandPairCropForVolumeFusion(**kwargs)


def test_call_errors():
    t = RandPairCropForVolumeFusion(OUT)
    with pytest.raises(ValueError, match=r"\(C, X, Y, Z\).*\(20, 32, 36\)"):
        t(_volume(11)[0])
    bad = _volume(11)
    bad[...] = np.nan
    with pytest.raises(ValueError, match=r"non-finite.*\(1, 20, 32, 36\)"):
        t(bad)
    t.set_random_state(0)(_volume(11))
    with pytest.raises(ValueError, match=r"\(1, 5, 5, 5\) is smaller than the crops"):
        t(np.zeros((1, 5, 5, 5), np.float32), randomize=False)
