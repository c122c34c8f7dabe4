"""The main job's pictures keep the physical proportions of the volume (tests of the layout, not of pixels)."""

from __future__ import annotations

import numpy as np
import pytest

from misfm_demo.visualize import _body_box, _views, montage_layout, save_segmentation_montage


def _slab(shape, spacing):
    image = np.full(shape, -1000.0, np.float32)
    image[8:-8, 8:-8, :] = 40.0  # the body, everywhere along z
    return image, _views(image, [s // 2 for s in shape], spacing, _body_box(image))


@pytest.mark.parametrize("shape,spacing,flat", [
    ((512, 512, 20), (0.98, 0.98, 2.0), True),    # a 20-slice series: 40 mm thick, ~490 mm wide
    ((256, 256, 200), (1.5, 1.5, 1.5), False),    # an isotropic volume
    ((512, 512, 48), (0.57, 0.57, 5.0), False),   # thick slices, 240 mm long
])
def test_every_panel_has_its_physical_aspect_at_one_scale(shape, spacing, flat):
    _, views = _slab(shape, spacing)
    boxes, height = montage_layout(views)
    scales = set()
    for (_, _, width_mm, height_mm), (left, bottom, w, h) in zip(views, boxes):
        assert w / h == pytest.approx(width_mm / height_mm, rel=1e-9)  # never stretched or squeezed
        scales.add(round(w / width_mm, 9))
        assert 0 <= left and left + w <= 12.0 + 1e-9 and 0 <= bottom and bottom + h <= height + 1e-9
    assert len(scales) == 1  # one mm-per-inch scale for all views
    axial, coronal, sagittal = boxes
    if flat:  # the flat views sit beside the axial one, as wide as the volume, not shrunk into a corner
        assert coronal[0] == sagittal[0] > axial[0] + axial[2]
        assert coronal[2] == pytest.approx(axial[2], rel=0.05)
    else:
        assert axial[0] < coronal[0] < sagittal[0]


def test_views_are_cropped_to_the_body_and_sized_in_mm():
    image, views = _slab((64, 48, 10), (2.0, 1.0, 5.0))
    (_, axial, aw, ah), (_, coronal, cw, ch), (_, sagittal, sw, sh) = views
    assert axial.shape == (48 - 8, 64 - 8)  # rows y, columns x: the 8-voxel air margins minus the 4-voxel margin
    assert (aw, ah) == (56 * 2.0, 40 * 1.0) and (cw, ch) == (56 * 2.0, 10 * 5.0) and (sw, sh) == (40 * 1.0, 50.0)


def test_montage_png_decodes(tmp_path):
    import matplotlib.image as mpimg

    image, _ = _slab((64, 64, 12), (1.0, 1.0, 3.0))
    seg = (image > 0).astype(np.int16)
    path = save_segmentation_montage(tmp_path / "m.png", image, {"reference": seg, "model": seg}, {1: "body"},
                                     (1.0, 1.0, 3.0), title="test")
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[1] == 12 * 90 and pixels.std() > 0
