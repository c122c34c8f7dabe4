"""The main job, shortened (preset "smoke"), on the real CT that the project fetches, through the bundles."""

from __future__ import annotations

import csv

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from misfm_demo.fetch_data import fetch_all
from misfm_demo.main_job import _entries, organ_dice, run_main_job

pytestmark = pytest.mark.slow  # runs real bundles / processes: minutes


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return run_main_job("smoke", tmp_path_factory.mktemp("demo"))


def test_every_output_exists(outputs):
    for name in ("summary", "study_csv", "study_plot", "vf_samples_png", "montage_png", "thorax_montage_png",
                 "pretrained_checkpoint"):
        assert outputs[name].is_file() and outputs[name].stat().st_size > 0, name
    assert list(outputs["tensorboard"].rglob("events.out.tfevents.*")), "no TensorBoard event files"
    assert "TotalSegmentator model outputs" in outputs["summary"].read_text()


def test_pictures_decode(outputs):
    for name in ("vf_samples_png", "montage_png", "thorax_montage_png", "study_plot"):
        picture = matplotlib.image.imread(outputs[name])
        assert picture.ndim == 3 and min(picture.shape[:2]) > 200, name
        assert picture[..., :3].std() > 0.05, f"{name} is blank"


def test_segmentations_keep_the_input_grid_and_known_labels(outputs):
    segs = sorted(outputs["segmentations"].rglob("*.nii.gz"))
    assert len(segs) == 3  # unseen DICOM series x (pretrained, scratch) + thorax case
    unseen = _entries(fetch_all(quiet=True)["abdomen"], "validation")[0]  # the study evaluated its models on it
    source = nib.load(unseen["image"])
    for seg_path in segs:
        seg = nib.load(seg_path)
        data = np.asarray(seg.dataobj)
        assert np.issubdtype(data.dtype, np.integer)
        if "abdomen" in seg_path.parent.name:
            np.testing.assert_allclose(seg.affine, source.affine, atol=1e-3)
            assert seg.shape[:3] == source.shape[:3]
            assert set(np.unique(data)) <= set(range(14))
        else:
            assert set(np.unique(data)) <= set(range(5))


def test_pretrained_vs_scratch_comes_from_the_study(outputs):
    """One path: the main job's comparison is the label-efficiency study's table, evaluated by the bundle."""
    with open(outputs["study_csv"], encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["initialisation"] for r in rows) == ["pretrained", "scratch"]
    for row in rows:
        assert 0.0 <= float(row["mean_dice"]) <= 1.0
        assert float(row["dice_liver"]) >= 0.0  # the liver is in the unseen series' reference
    assert "labelled cases" in outputs["summary"].read_text()


def test_organ_dice_scores_only_organs_present_in_the_reference():
    ref = np.zeros((4, 4, 4), int)
    ref[:2] = 1
    pred = np.zeros_like(ref)
    pred[:1] = 1
    pred[3] = 2
    assert organ_dice(pred, ref, {0: "background", 1: "liver", 2: "spleen"}) == {"liver": pytest.approx(2 / 3)}
