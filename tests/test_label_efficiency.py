"""The label-efficiency study runs the real bundle (train + evaluate subprocesses) per budget, seed and init."""

from __future__ import annotations

import csv
import json

import matplotlib.image
import pytest
import torch

from misfm_demo import label_efficiency as le
from misfm_nets import PCTNet

import bundle_utils as bu

pytestmark = pytest.mark.slow  # runs real bundles / processes: minutes

THORAX = "misfm_thorax_ct_segmentation"
TINY = dict(bu.TINY_TRAIN, max_epochs=1, val_interval=1)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    datalist = bu.make_dataset(root / "ds", bu.num_classes(THORAX), n_train=3, n_val=1, n_test=0)
    pretrained = root / "pretext.pt"  # a 5-class pretext network of the same widths: its heads are skipped
    net = PCTNet(1, 5, TINY["roi_size"], feature_channels=TINY["feature_channels"], num_heads=TINY["num_heads"],
                 axis_order="xyz")
    torch.save(net.state_dict(), pretrained)
    return root, datalist, pretrained


@pytest.fixture(scope="module")
def study(inputs):
    root, datalist, pretrained = inputs
    out = root / "out"
    outputs = le.run_study("thorax", datalist, pretrained, ["1", "all"], 1, out, datalist.parent / "data", TINY)
    return out, outputs


def test_study_writes_csv_plot_and_summary(study):
    out, outputs = study
    with open(outputs["csv"], encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["labelled_cases"], r["initialisation"]) for r in rows] == [
        ("1", "pretrained"), ("1", "scratch"), ("3", "pretrained"), ("3", "scratch")]
    assert {"dice_esophagus", "dice_heart", "dice_trachea", "dice_aorta", "mean_dice"} <= set(rows[0])
    for row in rows:
        assert 0.0 <= float(row["mean_dice"]) <= 1.0
    picture = matplotlib.image.imread(outputs["plot"])
    assert picture.ndim == 3 and picture[..., :3].std() > 0.05
    summary = outputs["summary"].read_text()
    assert "labelled cases" in summary and "gain" in summary and "optimistic" in summary
    # each run trained on the budget's cases, from the right initialisation, recorded by the bundle itself
    one = json.loads((out / "runs" / "pretrained_n1_s0" / "result.json").read_text())
    assert len(one["training_cases"]) == 1 and one["pretrained_checkpoint_sha256"]
    assert (json.loads((out / "runs" / "scratch_n1_s0" / "result.json").read_text())["pretrained_checkpoint_sha256"]
            == "")
    # nested subsets: the 1-case budget's case is among the 3
    three = json.loads((out / "runs" / "pretrained_n3_s0" / "result.json").read_text())
    assert set(one["training_cases"]) <= set(three["training_cases"])


def test_a_stopped_study_continues_where_it_stopped(study, inputs, capsys):
    root, datalist, pretrained = inputs
    out, outputs = study
    before = outputs["csv"].read_text()
    (out / "runs" / "scratch_n3_s0" / "result.json").unlink()  # as if killed before its evaluation finished
    le.run_study("thorax", datalist, pretrained, ["1", "all"], 1, out, datalist.parent / "data", TINY)
    printed = capsys.readouterr().out
    assert printed.count("done earlier, kept") == 3
    assert "nothing to do" in (out / "runs" / "scratch_n3_s0" / "train.log").read_text()  # resumed, not retrained
    assert outputs["csv"].read_text() == before


@pytest.mark.parametrize("budgets,change,words", [
    (["5"], {}, "asks for 5 cases but the training list has 3"),
    (["1"], {"validation": []}, "empty 'validation' list"),
    (["0"], {}, "label_budget must be"),
])
def test_bad_arguments_fail_before_any_training(inputs, tmp_path, budgets, change, words):
    root, datalist, pretrained = inputs
    content = json.loads(datalist.read_text())
    content.update(change)
    changed = datalist.parent / f"changed_{tmp_path.name}.json"
    changed.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=words):
        le.run_study("thorax", changed, pretrained, budgets, 1, tmp_path / "out", datalist.parent / "data", TINY)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_another_network_fails_before_any_training(inputs, tmp_path):
    root, datalist, _ = inputs
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3)).state_dict(), other)
    with pytest.raises(ValueError, match="does not fit"):
        le.run_study("thorax", datalist, other, ["1"], 1, tmp_path / "out", datalist.parent / "data", TINY)
    assert not (tmp_path / "out").exists()


def test_command_line_errors_are_argparse_errors(inputs, tmp_path, capsys):
    root, datalist, pretrained = inputs
    with pytest.raises(SystemExit) as exit_info:
        le.main(["--bundle", "thorax", "--datalist", str(datalist), "--dataset-dir", str(datalist.parent / "data"),
                 "--budgets", "9", "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2 and "asks for 9 cases" in capsys.readouterr().err
