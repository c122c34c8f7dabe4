"""Corpus of bad (and borderline) inputs for the MIS-FM bundles, generated into a temporary folder.

Each case is a builder ``f(root: Path) -> Case``. ``Case.expect`` says what the bundle must do:

* ``"error"``: stop before training with a ``ValueError`` whose message contains every word of ``Case.words``
  (the offending file's name is one of them when a file is at fault);
* ``"warning"``: log a warning containing ``Case.words`` and go on (the handling is documented in the bundles'
  docs/README.md "Bad input" section);
* ``"ok"``: work silently (e.g. an image smaller than the roi is padded).

``Case.target`` is ``"segmentation"`` (the thorax bundle: 5 classes), ``"pretraining"`` or ``"both"`` (datalist
cases), or ``"transform"`` (``misfm_transforms`` used alone; ``Case.call`` runs it). Archive members escaping
their folder (zip-slip) are covered by tests/test_fetch_data.py and not repeated here.
"""

from __future__ import annotations

import gzip
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np

import bundle_utils as bu

N_CLASSES = 5  # thorax bundle


@dataclass
class Case:
    name: str
    target: str
    expect: str
    words: tuple = ()
    datalist: dict | None = None  # {"training": [...], "validation": [...]} with absolute paths
    datalist_file: Path | None = None  # a datalist JSON written as is (file-level cases)
    overrides: dict = field(default_factory=dict)  # config values for check_config / pretrained_checkpoint
    call: Callable | None = None  # transform cases


def _good(root: Path, name: str = "good", shape=(40, 40, 20), labels=True, seed=0):
    root.mkdir(parents=True, exist_ok=True)
    img, lab = root / f"{name}.nii.gz", root / f"{name}_lab.nii.gz"
    bu.make_case(img, lab if labels else None, shape, N_CLASSES, seed)
    return img, lab


def _datalist(root: Path, image: Path, label: Path | None = None, target: str = "segmentation") -> dict:
    """A datalist with one good training case plus the given (bad) entry in training; one good validation case."""
    gi, gl = _good(root, "good")
    vi, vl = _good(root, "val", seed=1)
    seg = target != "pretraining"
    entry = {"image": str(image)} if label is None or not seg else {"image": str(image), "label": str(label)}
    good = {"image": str(gi), "label": str(gl)} if seg else {"image": str(gi)}
    val = {"image": str(vi), "label": str(vl)} if seg else {"image": str(vi)}
    return {"training": [good, entry], "validation": [val]}


def _save(path: Path, arr, affine=None) -> Path:
    nib.save(nib.Nifti1Image(arr, bu.affine_for() if affine is None else affine), str(path))
    return path


def _image_case(name, target, expect, words, make):
    """Builder for a case whose training IMAGE is made by ``make(root) -> Path``; the label (segmentation) is good."""
    def build(root: Path) -> Case:
        root.mkdir(parents=True, exist_ok=True)
        made = make(root)
        img, lab = made if isinstance(made, tuple) else (made, _good(root, "lab_src")[1])
        w = tuple(img.name if x == "{file}" else x for x in words)
        return Case(name, target, expect, w, datalist=_datalist(root, img, lab, target))
    return build


def _label_case(name, expect, words, make):
    """Builder for a segmentation case whose LABEL is made by ``make(root, image_path) -> Path``."""
    def build(root: Path) -> Case:
        root.mkdir(parents=True, exist_ok=True)
        img, _ = _good(root, "img", seed=3)
        lab = make(root, img)
        w = tuple(lab.name if x == "{file}" else x for x in words)
        return Case(name, "segmentation", expect, w, datalist=_datalist(root, img, lab))
    return build


# ------------------------------------------------------------------------------------------------ image makers


def _truncated(root):
    img, _ = _good(root, "trunc_src", shape=(64, 64, 32), labels=False)
    data = img.read_bytes()
    out = root / "truncated.nii.gz"
    out.write_bytes(data[: len(data) // 2])
    return out


def _corrupt_gzip(root):
    img, _ = _good(root, "corrupt_src", shape=(64, 64, 32), labels=False)
    data = bytearray(img.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):  # garble the middle of the deflate stream
        data[i] ^= 0x5A
    out = root / "corrupt.nii.gz"
    out.write_bytes(bytes(data))
    return out


def _not_an_image(root):
    out = root / "notes.nii.gz"
    out.write_bytes(gzip.compress(b"patient notes, not an image\n" * 20))
    return out


def _plain_text(root):
    out = root / "readme.nii.gz"
    out.write_text("this is a text file with a NIfTI extension")
    return out


def _image_2d(root):
    return _save(root / "slice2d.nii.gz", np.zeros((40, 40), np.int16))


def _image_4d(root):
    return _save(root / "timeseries4d.nii.gz",
                 np.random.RandomState(0).normal(-500, 300, (40, 40, 20, 3)).astype(np.int16))


def _two_channel(root):
    return _save(root / "twochannel.nii.gz",
                 np.random.RandomState(0).normal(-500, 300, (40, 40, 20, 1, 2)).astype(np.float32))


def _with_value(value, name):
    def make(root):
        arr = np.random.RandomState(0).normal(-500, 300, (40, 40, 20)).astype(np.float32)
        arr[3:5, 3:5, 3] = value
        return _save(root / name, arr)
    return make


def _constant(root):
    return _save(root / "constant.nii.gz", np.full((40, 40, 20), -1000, np.int16))


def _small(root):
    return _good(root, "small", shape=(24, 24, 12))


def _mr_range(root):
    rng = np.random.RandomState(0)
    arr = np.clip(rng.normal(400, 200, (40, 40, 20)), 0, 4000).astype(np.int16)
    return _save(root / "mr_t1.nii.gz", arr)


def _missing(root):
    return root / "does_not_exist.nii.gz"


def _crc_corrupt(root):
    """A .nii.gz whose deflate stream decodes but whose stored CRC32 no longer matches (a changed byte)."""
    img, _ = _good(root, "crc_src", shape=(40, 40, 20), labels=False)
    data = bytearray(img.read_bytes())
    data[-8] ^= 0xFF  # the CRC32 field of the gzip trailer
    out = root / "crc_corrupt.nii.gz"
    out.write_bytes(bytes(data))
    return out


def _write_itk(path: Path, arr: np.ndarray, spacing=bu.SPACING, origin=(-40.0, 12.5, 100.0)) -> Path:
    """An (x, y, z) array as any ITK format (by the suffix: .nrrd, .mha, ...), with the given geometry."""
    import itk

    image = itk.image_from_array(np.ascontiguousarray(arr.transpose(2, 1, 0)))  # ITK arrays are (z, y, x)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    itk.imwrite(image, str(path))
    return path


def _nrrd_pair(root, label_origin=(-40.0, 12.5, 100.0)):
    """An NRRD image and its NRRD label (the label's origin is given: 30 mm off along z is a different grid)."""
    gi, gl = _good(root, "nrrd_src")
    img = nib.load(str(gi))
    image = _write_itk(root / "ct.nrrd", np.asanyarray(img.dataobj).astype(np.int16))
    label = _write_itk(root / "ct_label.nrrd", np.asanyarray(nib.load(str(gl)).dataobj).astype(np.uint8),
                       origin=label_origin)
    return image, label


def _dicom_folder_mixed(root):
    """A folder holding two DICOM series (different SeriesInstanceUID), written with SimpleITK."""
    import pytest

    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is needed to write a DICOM series (pydicom is absent)")
    folder = root / "dicom_mixed"
    folder.mkdir(parents=True, exist_ok=True)
    for series in (1, 2):
        uid = f"1.2.826.0.1.3680043.2.1125.{series}"
        for z in range(4):
            sl = sitk.GetImageFromArray(np.full((16, 16), series * 100 + z, np.int16))
            for tag, value in (("0020|000e", uid), ("0020|0013", str(z + 1)), ("0008|0060", "CT"),
                               ("0020|0032", f"0\\0\\{z * 2.5}"), ("0020|0037", "1\\0\\0\\0\\1\\0")):
                sl.SetMetaData(tag, value)
            writer = sitk.ImageFileWriter()
            writer.KeepOriginalImageUIDOn()
            writer.SetFileName(str(folder / f"s{series}_{z:03d}.dcm"))
            writer.Execute(sl)
    return folder


# ------------------------------------------------------------------------------------------------ label makers


def _label_from(img_path, fn, dtype=np.uint8, affine=None):
    ref = nib.load(str(img_path))
    arr = fn(np.zeros(ref.shape, dtype))
    return arr, (ref.affine if affine is None else affine)


def _lab_shape(root, img):
    return _save(root / "lab_shape.nii.gz", np.zeros((40, 40, 19), np.uint8))


def _lab_all_zero(root, img):
    arr, aff = _label_from(img, lambda a: a)
    return _save(root / "lab_empty.nii.gz", arr, aff)


def _lab_affine(root, img):
    aff = bu.affine_for(origin=(-40.0, 12.5, 130.0))
    arr, _ = _label_from(img, lambda a: a)
    return _save(root / "lab_affine.nii.gz", arr, aff)


def _lab_values(values, name, dtype=np.uint8):
    def make(root, img):
        def fill(a):
            a = a.astype(dtype)
            for i, v in enumerate(values):
                a[i, 0, 0] = v
            return a
        arr, aff = _label_from(img, fill)
        return _save(root / name, arr, aff)
    return make


# ------------------------------------------------------------------------------------------------ datalist-level


def _dl_file(name, text, expect="error", words=(), target="both"):
    def build(root: Path) -> Case:
        root.mkdir(parents=True, exist_ok=True)
        _good(root, "good")
        path = root / "datalist.json"
        path.write_text(text(root) if callable(text) else text)
        return Case(name, target, expect, tuple(path.name if w == "{file}" else w for w in words), datalist_file=path)
    return build


def _duplicates(root):
    gi, gl = _good(root, "good")
    entry = {"image": str(gi), "label": str(gl)}
    return json.dumps({"training": [entry, entry, dict(entry)], "validation": [entry]})


def _config_case(name, overrides, words, target="both"):
    def build(root: Path) -> Case:
        root.mkdir(parents=True, exist_ok=True)
        gi, gl = _good(root, "good")
        dl = {"training": [{"image": str(gi), "label": str(gl)}], "validation": [{"image": str(gi), "label": str(gl)}]}
        return Case(name, target, "error", words, datalist=dl, overrides=overrides)
    return build


def _foreign_checkpoint(root: Path) -> Case:
    import torch

    root.mkdir(parents=True, exist_ok=True)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv3d(8, 2, 1))
    path = root / "resnet_like.pt"
    torch.save(net.state_dict(), path)
    gi, gl = _good(root, "good")
    dl = {"training": [{"image": str(gi), "label": str(gl)}], "validation": [{"image": str(gi), "label": str(gl)}]}
    return Case("foreign_checkpoint", "both", "error", ("resnet_like.pt", "does not fit"), datalist=dl,
                overrides={"pretrained_checkpoint": str(path)})


def _nan_checkpoint(root: Path) -> Case:
    """A checkpoint of the right network whose weights diverged (NaN)."""
    import torch

    from misfm_nets import PCTNet

    root.mkdir(parents=True, exist_ok=True)
    net = PCTNet(1, N_CLASSES, (32, 32, 16), feature_channels=(4, 8, 16, 32, 64), num_heads=(2, 4, 8), axis_order="xyz")
    state = net.state_dict()
    state["pyramid_ct.convtrans_e2.conv.conv_conv.2.weight"].fill_(float("nan"))
    path = root / "diverged.pt"
    torch.save(state, path)
    gi, gl = _good(root, "good")
    dl = {"training": [{"image": str(gi), "label": str(gl)}], "validation": [{"image": str(gi), "label": str(gl)}]}
    return Case("nan_pretrained_checkpoint", "both", "error", ("diverged.pt", "NaN/Inf weights"), datalist=dl,
                overrides={"pretrained_checkpoint": str(path)})


def _pickle_checkpoint(root: Path) -> Case:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "not_weights.pt"
    path.write_bytes(b"\x80\x04garbage that is no torch file")
    gi, gl = _good(root, "good")
    dl = {"training": [{"image": str(gi), "label": str(gl)}], "validation": [{"image": str(gi), "label": str(gl)}]}
    return Case("unreadable_checkpoint", "both", "error", ("not_weights.pt", "cannot read checkpoint"), datalist=dl,
                overrides={"pretrained_checkpoint": str(path)})


# ------------------------------------------------------------------------------------------------ transforms alone


def _transform_case(name, expect, words, fn):
    return lambda root: Case(name, "transform", expect, words, call=fn)


def _vf():
    from misfm_transforms import RandVolumeFusiond

    return RandVolumeFusiond(background_key="image", foreground_key="foreground", label_key="label",
                             num_boxes=(2, 4), box_size_min=(4, 4, 4), box_size_max=(8, 8, 8))


def _arr(*shape, value=None):
    a = np.random.RandomState(0).rand(*shape).astype(np.float32)
    if value is not None:
        a[..., 0] = value
    return a


def _t_shape_mismatch():
    return _vf()({"image": _arr(1, 32, 32, 16), "foreground": _arr(1, 30, 32, 16)})


def _t_2d():
    return _vf()({"image": _arr(1, 32, 32), "foreground": _arr(1, 32, 32)})


def _t_nan():
    return _vf()({"image": _arr(1, 32, 32, 16, value=np.nan), "foreground": _arr(1, 32, 32, 16)})


def _t_grid_mismatch():
    from misfm_transforms import RandVolumeFusionGridd

    t = RandVolumeFusionGridd(background_key="image", foreground_key="foreground", label_key="label",
                              block_size_min=(4, 4, 2), block_size_max=(8, 8, 4))
    return t({"image": _arr(1, 32, 32, 16), "foreground": _arr(1, 32, 30, 16)})


def _t_pair_crop_small():
    from misfm_transforms import RandPairCropForVolumeFusiond

    out = RandPairCropForVolumeFusiond(keys="image", foreground_key="foreground", spatial_size=(32, 32, 16))(
        {"image": _arr(1, 20, 20, 8)})
    assert tuple(out["image"].shape) == (1, 32, 32, 16) and tuple(out["foreground"].shape) == (1, 32, 32, 16)
    return out


def _t_pair_crop_constant():
    from misfm_transforms import RandPairCropForVolumeFusiond

    out = RandPairCropForVolumeFusiond(keys="image", foreground_key="foreground", spatial_size=(32, 32, 16))(
        {"image": np.zeros((1, 40, 40, 20), np.float32)})
    assert np.isfinite(np.asarray(out["image"])).all()
    return out


def _t_batch_not_5d():
    import torch

    from misfm_transforms import volume_fusion_batch

    return volume_fusion_batch(torch.rand(2, 32, 32, 16))


# ------------------------------------------------------------------------------------------------ the corpus

CASES: dict[str, Callable[[Path], Case]] = {
    # images (both bundles)
    "truncated_nii_gz": _image_case("truncated_nii_gz", "both", "error", ("{file}", "cannot read"), _truncated),
    "corrupt_gzip": _image_case("corrupt_gzip", "both", "error", ("{file}", "cannot read"), _corrupt_gzip),
    "gzip_not_an_image": _image_case("gzip_not_an_image", "both", "error", ("{file}", "cannot read"), _not_an_image),
    "text_with_nii_gz_ext": _image_case("text_with_nii_gz_ext", "both", "error", ("{file}", "cannot read"),
                                        _plain_text),
    "image_2d": _image_case("image_2d", "both", "error", ("{file}", "not 3-D"), _image_2d),
    "image_4d": _image_case("image_4d", "both", "error", ("{file}", "4-D", "3 channels"), _image_4d),
    "image_two_channels": _image_case("image_two_channels", "both", "error", ("{file}", "2 channels"), _two_channel),
    "image_nan": _image_case("image_nan", "both", "error", ("{file}", "4 NaN"), _with_value(np.nan, "nan.nii.gz")),
    "image_inf": _image_case("image_inf", "both", "error", ("{file}", "4 Inf"), _with_value(np.inf, "inf.nii.gz")),
    "image_constant": _image_case("image_constant", "both", "warning", ("{file}", "constant"), _constant),
    "image_smaller_than_roi": _image_case("image_smaller_than_roi", "both", "ok", (), _small),
    "image_mr_range": _image_case("image_mr_range", "both", "warning", ("{file}", "not CT"), _mr_range),
    "image_missing": _image_case("image_missing", "both", "error", ("{file}", "does not exist"), _missing),
    "image_crc_corrupt": _image_case("image_crc_corrupt", "both", "error", ("{file}", "corrupt", "checksum"),
                                     _crc_corrupt),
    "image_and_label_nrrd": _image_case("image_and_label_nrrd", "both", "ok", (), _nrrd_pair),
    "label_nrrd_30mm_off": _image_case("label_nrrd_30mm_off", "segmentation", "error",
                                       ("ct_label.nrrd", "different affines"),
                                       lambda root: _nrrd_pair(root, label_origin=(-40.0, 12.5, 130.0))),
    "dicom_folder_mixed_series": _image_case("dicom_folder_mixed_series", "both", "error", ("{file}", "is a folder"),
                                             _dicom_folder_mixed),
    # labels (segmentation)
    "label_shape_differs": _label_case("label_shape_differs", "error", ("{file}", "shape"), _lab_shape),
    "label_affine_differs": _label_case("label_affine_differs", "error", ("{file}", "different affines"), _lab_affine),
    "label_value_too_large": _label_case("label_value_too_large", "error", ("{file}", "[7]", "0..4"),
                                         _lab_values([1, 7], "lab_big.nii.gz")),
    "label_negative": _label_case("label_negative", "error", ("{file}", "[-1]"),
                                  _lab_values([-1, 2], "lab_neg.nii.gz", np.int16)),
    "label_float_non_integer": _label_case("label_float_non_integer", "error", ("{file}", "non-integer", "0.5"),
                                           _lab_values([0.5, 2.0], "lab_soft.nii.gz", np.float32)),
    "label_float_integer_values": _label_case("label_float_integer_values", "ok", (),
                                              _lab_values([1.0, 4.0], "lab_float.nii.gz", np.float32)),
    "label_all_zero": _label_case("label_all_zero", "warning", ("{file}", "no foreground"), _lab_all_zero),
    "label_missing": _label_case("label_missing", "error", ("{file}", "does not exist"),
                                 lambda root, img: root / "no_label.nii.gz"),
    # datalists
    "datalist_file_missing": lambda root: Case("datalist_file_missing", "both", "error",
                                               ("nowhere.json", "does not exist"), datalist_file=root / "nowhere.json"),
    "datalist_malformed_json": _dl_file("datalist_malformed_json", '{"training": [{"image": "a.nii.gz"},',
                                        words=("{file}", "not valid JSON")),
    "datalist_no_training_key": _dl_file("datalist_no_training_key", '{"train": [{"image": "good.nii.gz"}]}',
                                         words=("{file}", "no 'training' list")),
    "datalist_training_not_list": _dl_file("datalist_training_not_list", '{"training": {"image": "good.nii.gz"}}',
                                           words=("{file}", "must be a list")),
    "datalist_entry_not_dict": _dl_file("datalist_entry_not_dict", '{"training": [3], "validation": []}',
                                        words=("{file}", "entry 0", "must be a file name or a dict")),
    "datalist_empty_training": _dl_file("datalist_empty_training", '{"training": [], "validation": []}',
                                        words=("'training' datalist is empty",)),
    "datalist_entry_without_label": _dl_file(
        "datalist_entry_without_label", lambda root: json.dumps({"training": [{"image": str(root / "good.nii.gz")}],
                                                                 "validation": []}),
        words=("has no 'label' field",), target="segmentation"),
    "datalist_duplicates": _dl_file("datalist_duplicates", _duplicates, expect="warning",
                                    words=("{file}", "2 duplicate 'training' entries removed")),
    # configs
    "roi_not_divisible": _config_case("roi_not_divisible", {"roi_size": [32, 32, 12]}, ("roi_size", "size_divisor")),
    "negative_learning_rate": _config_case("negative_learning_rate", {"learning_rate": -0.001},
                                           ("learning_rate", "> 0")),
    "zero_batch_size": _config_case("zero_batch_size", {"batch_size": 0}, ("batch_size",)),
    "cache_rate_above_1": _config_case("cache_rate_above_1", {"cache_rate": 2.0}, ("cache_rate", "[0, 1]")),
    "negative_pixdim": _config_case("negative_pixdim", {"pixdim": [1.0, -1.0, 2.5]}, ("pixdim",)),
    "inverted_intensity_range": _config_case("inverted_intensity_range", {"intensity_range": [1000, -1000]},
                                             ("intensity_range",)),
    "negative_checkpoint_interval": _config_case("negative_checkpoint_interval", {"checkpoint_interval": -1},
                                                 ("checkpoint_interval",)),
    "unknown_fusion_version": _config_case("unknown_fusion_version", {"fusion_version": "v3"}, ("fusion_version",),
                                           target="pretraining"),
    "foreign_pretrained_checkpoint": _foreign_checkpoint,
    "unreadable_pretrained_checkpoint": _pickle_checkpoint,
    "nan_pretrained_checkpoint": _nan_checkpoint,
    "missing_pretrained_checkpoint": _config_case("missing_pretrained_checkpoint",
                                                  {"pretrained_checkpoint": "/nonexistent/model.pt"},
                                                  ("/nonexistent/model.pt", "does not exist")),
    # transforms alone
    "transform_vf_shape_mismatch": _transform_case("transform_vf_shape_mismatch", "error", ("shapes differ",),
                                                   _t_shape_mismatch),
    "transform_vf_2d": _transform_case("transform_vf_2d", "error", ("3-D",), _t_2d),
    "transform_vf_nan": _transform_case("transform_vf_nan", "error", ("non-finite",), _t_nan),
    "transform_grid_shape_mismatch": _transform_case("transform_grid_shape_mismatch", "error", ("shapes differ",),
                                                     _t_grid_mismatch),
    "transform_pair_crop_small_image": _transform_case("transform_pair_crop_small_image", "ok", (),
                                                       _t_pair_crop_small),
    "transform_pair_crop_constant": _transform_case("transform_pair_crop_constant", "ok", (), _t_pair_crop_constant),
    "transform_batch_not_5d": _transform_case("transform_batch_not_5d", "error", ("(N, C, X, Y, Z)",),
                                              _t_batch_not_5d),
}


def build_case(name: str, root: Path) -> Case:
    return CASES[name](Path(root))


if __name__ == "__main__":  # write the corpus somewhere to look at it
    import tempfile

    out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="misfm_bad_inputs_"))
    for n in CASES:
        try:
            c = build_case(n, out / n)
        except BaseException as err:  # e.g. pytest.skip when SimpleITK is absent
            print(f"{n}: skipped ({err})")
            continue
        print(f"{n}: {c.target} -> {c.expect} {c.words}")
    print(out)
