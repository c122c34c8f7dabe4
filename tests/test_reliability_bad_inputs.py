"""Bad-input corpus (tests/bad_inputs.py) against the bundles' input checks, the transforms used alone, and a
representative handful through the real ``python -m monai.bundle run training`` subprocess.

A bad input must either stop the run BEFORE training with a message naming the file and the problem (no
traceback from a worker process, nothing written, an existing ``model.pt`` untouched) or be handled as documented
in the bundles' docs/README.md ("Bad input": warn + count, dedupe, pad). Zip-slip (archive members escaping their
folder) is covered by tests/test_fetch_data.py.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

import misfm_bundle_glue as glue

import bad_inputs as bi
import bundle_utils as bu

pytestmark = pytest.mark.slow  # runs real bundles / processes: minutes

THORAX = "misfm_thorax_ct_segmentation"
# the bundle's own steps before its first training step (the "run" list of train.json, minus the trainer)
CHECK_STEPS = ("check_settings", "check_fusion", "check_training_list", "check_validation_list", "pretrained_report")


def _params():
    out = []
    for name in bi.CASES:
        if name.startswith("transform_"):
            continue
        kinds = ("segmentation",) if name.startswith(("label_", "datalist_entry_without_label")) else (
            ("pretraining",) if name == "unknown_fusion_version" else ("segmentation", "pretraining"))
        out += [pytest.param(name, k, id=f"{name}-{k}") for k in kinds]
    return out


def _root_cause(err: BaseException) -> BaseException:
    """MONAI wraps what a ``_target_`` raises ("Failed to instantiate component ..."); users read the cause."""
    while err.__cause__ is not None and not isinstance(err, ValueError):
        err = err.__cause__
    return err


def run_checks(case: bi.Case, kind: str, tmp_path: Path, monkeypatch) -> int:
    """In process, what the bundle does before its first training step: its checks, parsed from its own train.json
    with tiny settings, then every listed volume through its own loading transform (where voxels are checked)."""
    from monai.bundle import ConfigParser

    bundle = bu.BUNDLES_DIR / (THORAX if kind == "segmentation" else bu.PRETRAINING)
    monkeypatch.syspath_prepend(str(bundle))  # what `python -m monai.bundle run` does for the bundle's code
    datalist = case.datalist_file
    if datalist is None:
        datalist = tmp_path / "case_datalist.json"
        datalist.write_text(json.dumps(case.datalist))
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    tiny = bu.TINY_PRETRAIN if kind == "pretraining" else bu.TINY_TRAIN
    parser.update({**tiny, "bundle_root": str(bundle), "data_list_file_path": str(datalist),
                   "dataset_dir": str(datalist.parent), "ckpt_dir": str(tmp_path / "models"),
                   "output_dir": str(tmp_path / "eval"), **case.overrides})
    try:
        for step in CHECK_STEPS:
            if step in parser:
                parser.get_parsed_content(step)
        load = parser.get_parsed_content("preprocessing_transforms")[0]
        entries = parser.get_parsed_content("train_datalist") + parser.get_parsed_content("val_datalist")
        for entry in entries:
            load(entry)
    except Exception as err:
        raise _root_cause(err) from None
    return len(parser.get_parsed_content("train_datalist"))


def test_corpus_size():
    assert len(bi.CASES) >= 30
    assert sum(n.startswith("transform_") for n in bi.CASES) >= 5


@pytest.mark.parametrize("name,kind", _params())
def test_bad_input_checks(name, kind, tmp_path, caplog, monkeypatch):
    case = bi.build_case(name, tmp_path)
    caplog.set_level(logging.WARNING)
    if case.expect == "error":
        with pytest.raises(ValueError) as err:
            run_checks(case, kind, tmp_path, monkeypatch)
        msg = str(err.value)
        for w in case.words:
            assert w in msg, f"{w!r} not in: {msg}"
    else:
        n = run_checks(case, kind, tmp_path, monkeypatch)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        if case.expect == "warning":
            text = "\n".join(warnings)
            for w in case.words:
                assert w in text, f"{w!r} not in warnings: {text}"
        else:
            assert not [w for w in warnings if "misfm" in w or ".nii" in w], warnings
        if name == "datalist_duplicates":
            assert n == 1  # three identical entries -> one


@pytest.mark.parametrize("name", [n for n in bi.CASES if n.startswith("transform_")])
def test_bad_input_transforms(name, tmp_path):
    case = bi.build_case(name, tmp_path)
    if case.expect == "error":
        with pytest.raises(ValueError) as err:
            case.call()
        for w in case.words:
            assert w in str(err.value)
    else:
        case.call()


def test_small_image_is_padded_through_the_preprocessing(tmp_path):
    """An image smaller than the roi goes through the bundle's real preprocessing and comes out roi-sized."""
    from monai.bundle import ConfigParser

    img, lab = bi._good(tmp_path, "small", shape=(24, 24, 12))
    parser = ConfigParser()
    parser.read_config(str(bu.BUNDLES_DIR / THORAX / "configs" / "train.json"))
    parser.update({"bundle_root": str(bu.BUNDLES_DIR / THORAX), **bu.TINY_NET})
    t = parser.get_parsed_content("train#preprocessing")
    out = t({"image": str(img), "label": str(lab)})
    out = out[0] if isinstance(out, list) else out
    assert tuple(out["image"].shape) == (1, 32, 32, 16) and tuple(out["label"].shape) == (1, 32, 32, 16)


def test_dataset_workers_get_different_transform_streams():
    """VolumePairDataset.set_random_state seeds its transforms too (MONAI's set_rnd stops at the dataset)."""
    import numpy as np
    from monai.data.utils import set_rnd
    from monai.transforms import Compose, RandSpatialCropd

    t = Compose([RandSpatialCropd("image", [2, 2, 2], random_size=False)])
    ds = glue.VolumePairDataset([{"image": np.zeros((1, 4, 4, 4))}] * 3, transform=t)
    streams = []
    for worker_seed in (11, 12):
        set_rnd(ds, worker_seed)
        streams.append(t.transforms[0].R.randint(1 << 30, size=4).tolist())
    assert streams[0] != streams[1]


# ------------------------------------------------------------------------------------------------ real subprocesses

SUBPROCESS_CASES = [
    ("image_nan", THORAX),
    ("image_crc_corrupt", bu.PRETRAINING),
    ("label_nrrd_30mm_off", THORAX),
    ("truncated_nii_gz", bu.PRETRAINING),
    ("label_affine_differs", THORAX),
    ("roi_not_divisible", bu.PRETRAINING),
    ("foreign_pretrained_checkpoint", THORAX),
    ("datalist_malformed_json", bu.PRETRAINING),
]


@pytest.mark.parametrize("name,bundle", SUBPROCESS_CASES)
def test_bad_input_real_run(name, bundle, tmp_path):
    case = bi.build_case(name, tmp_path / "case")
    if case.datalist_file is not None:
        dl_path = case.datalist_file
    else:
        dl_path = tmp_path / "datalist.json"
        dl_path.write_text(json.dumps(case.datalist))
    ckpt, out = tmp_path / "models", tmp_path / "eval"
    ckpt.mkdir()
    existing = os.urandom(4096)
    (ckpt / "model.pt").write_bytes(existing)
    tiny = bu.TINY_PRETRAIN if bundle == bu.PRETRAINING else bu.TINY_TRAIN
    # resume False: the model.pt of an "earlier run" may be replaced, but only by a run that trains
    ov = dict(tiny, data_list_file_path=str(dl_path), dataset_dir=str(dl_path.parent), output_dir=str(out),
              ckpt_dir=str(ckpt), checkpoint_interval=1, resume=False)
    ov.update(case.overrides)
    r = bu.run_bundle(bu.BUNDLES_DIR / bundle, "training", ["train.json"], ov, tmp_path / "w",
                      env={"OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    tail = r.stderr[-6000:]
    for w in case.words:
        assert w in tail, f"{w!r} not in stderr tail:\n{tail}"
    assert "Epoch:" not in r.stdout, "a training step ran"
    assert "DataLoader worker" not in r.stderr and "_worker_loop" not in r.stderr
    assert (ckpt / "model.pt").read_bytes() == existing, "an existing model.pt was changed"
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.pt"], "a checkpoint was written"
    assert not out.exists(), "outputs were written"
