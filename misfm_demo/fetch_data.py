"""Fetch real CT volumes from package registries and write MONAI datalists.

Usage::

    python -m misfm_demo.fetch_data [--data-dir data] [--skip-optional] [--force] [--sdist-dir DIR]

or, from Python, :func:`fetch_all` (returns ``{"pretraining": Path, "abdomen": Path, "thorax": Path}``).

No data set hub is reachable from the project's machines, but PyPI and Debian are, and a few packages ship real
CT (sources, sizes and sha256 below):

1. TotalSegmentator 2.18.0 sdist (PyPI, Apache-2.0, **required**): abdomen CT + TotalSegmentator label map,
   a thorax CT angiography + heart/aorta labels, a 20-slice JPEG2000 DICOM series + its label map.
2. pyradiomics 3.0.1 sdist (PyPI, BSD-3, optional): two chest CTs (NRRD).
3. Debian ``invesalius-examples`` (GPL-2, optional): one head CT (raw int16 in an InVesalius project).

Every download is sha256-checked before anything is extracted; only the needed members are extracted (with
path-traversal / link checks); every output is written to a temporary name and ``os.replace``-d; a manifest
with the sha256 of every output makes a second run a no-op ("up to date").

Layout under ``--data-dir`` (git-ignored; never commit it, the head CT is GPL-2)::

    downloads/   the verified archives (a cache; delete it to force a re-download)
    raw/         members extracted verbatim (raw/totalsegmentator/tests/reference_files/..., raw/pyradiomics/...,
                 raw/invesalius/...)
    nifti/       converted volumes (DICOM series, NRRD, InVesalius raw -> NIfTI)
    labels/      label maps remapped to BTCV (abdomen) / SegTHOR (thorax) ids, on their image's grid
    licenses/    upstream license / copyright texts
    datalists/   pretraining.json, abdomen.json, thorax.json
    manifest.json

Datalist paths are **relative to the datalist's own folder** (``../nifti/x.nii.gz``), which is what
``monai.data.load_decathlon_datalist`` resolves by default (``base_dir`` = the datalist's folder), so the data
folder can be moved or mounted elsewhere.

The labels are TotalSegmentator *model outputs* (its regression-test references), not manual ground truth: fine
for "fine-tuning learns, Dice rises" checks and demos, never to be reported as clinical accuracy.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from misfm_demo.data_archive import (
    ChecksumError,
    atomic_path,
    atomic_write_text,
    safe_extract,
    sha256_file,
    verify_sha256,
)

__all__ = [
    "fetch_all",
    "main",
    "FetchError",
    "ChecksumError",
    "TOTALSEG_TO_BTCV",
    "BTCV_LABELS",
    "SEGTHOR_LABELS",
    "map_labels",
    "map_totalseg_to_btcv",
    "resample_nearest",
    "default_data_dir",
]

RECIPE_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[1]


def default_data_dir() -> Path:
    """Where the CT goes when no ``--data-dir`` is given: ``$MISFM_DATA_DIR`` if set; ``<checkout>/data`` when
    running from a source checkout; else the user's data folder (``$XDG_DATA_HOME/misfm``, by default
    ``~/.local/share/misfm``), never the installed package's folder (site-packages)."""
    env = os.environ.get("MISFM_DATA_DIR")
    if env:
        return Path(env)
    if (REPO_ROOT / "setup.cfg").is_file() and (REPO_ROOT / "misfm_demo").is_dir():
        return REPO_ROOT / "data"
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "misfm"


class FetchError(RuntimeError):
    """A source could not be fetched (network, tool missing, member missing...)."""


# ----------------------------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------------------------
TS = {
    "key": "totalsegmentator",
    "package": "totalsegmentator",
    "version": "2.18.0",
    "file": "totalsegmentator-2.18.0.tar.gz",
    "sha256": "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
    "size": 38_049_988,
    "url": "https://pypi.org/project/totalsegmentator/2.18.0/#files",
    "prefix": "totalsegmentator-2.18.0/",
}
PYRAD = {
    "key": "pyradiomics",
    "package": "pyradiomics",
    "version": "3.0.1",
    "file": "pyradiomics-3.0.1.tar.gz",
    "sha256": "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5",
    "url": "https://pypi.org/project/pyradiomics/3.0.1/#files",
    "prefix": "pyradiomics-3.0.1/",
}
INVES = {
    "key": "invesalius",
    "package": "invesalius-examples",
    "version": "3.1.99998-4",
    "file": "invesalius-examples_3.1.99998-4_all.deb",
    "sha256": "f2f14bdfef6dc3812eafc5013d133c6c18370aaab5666b78d54af2e7db432f97",
    "url": "https://packages.debian.org/bookworm/all/invesalius-examples/download",
}

TS_REF = "raw/totalsegmentator/tests/reference_files"
TS_MEMBERS = {  # member (after the sdist's top folder) -> destination relative to the data dir
    "LICENSE": "licenses/totalsegmentator_LICENSE",
    "totalsegmentator/map_to_binary.py": "raw/totalsegmentator/totalsegmentator/map_to_binary.py",
    "tests/reference_files/example_ct.nii.gz": f"{TS_REF}/example_ct.nii.gz",
    "tests/reference_files/example_seg_fast_force_split.nii.gz": f"{TS_REF}/example_seg_fast_force_split.nii.gz",
    "tests/reference_files/example_seg_dicom.nii.gz": f"{TS_REF}/example_seg_dicom.nii.gz",
    "tests/reference_files/aorta_report/example_ct.nii.gz": f"{TS_REF}/aorta_report/example_ct.nii.gz",
    "tests/reference_files/aorta_report/test_result/models/aorta.nii.gz": (
        f"{TS_REF}/aorta_report/test_result/models/aorta.nii.gz"
    ),
    "tests/reference_files/pulmonary_report/models/heart.nii.gz": f"{TS_REF}/pulmonary_report/models/heart.nii.gz",
}
TS_DICOM_DIR = "tests/reference_files/example_ct_dicom/"
TS_DICOM_FILES = 20

PYRAD_MEMBERS = {
    "LICENSE.txt": "licenses/pyradiomics_LICENSE.txt",
    "data/lung1_image.nrrd": "raw/pyradiomics/data/lung1_image.nrrd",
    "data/lung2_image.nrrd": "raw/pyradiomics/data/lung2_image.nrrd",
}
INVES_MEMBERS = {
    "usr/share/doc/invesalius-examples/examples/Cranium.inv3": "raw/invesalius/Cranium.inv3",
    "usr/share/doc/invesalius-examples/copyright": "licenses/invesalius-examples_copyright",
}

# ----------------------------------------------------------------------------------------------------------------
# label maps
# ----------------------------------------------------------------------------------------------------------------
# TotalSegmentator v2 "total" task ids (verified at run time against the sdist's totalsegmentator/map_to_binary.py)
TOTALSEG_IDS = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "gallbladder": 4,
    "liver": 5,
    "stomach": 6,
    "pancreas": 7,
    "adrenal_gland_right": 8,
    "adrenal_gland_left": 9,
    "esophagus": 15,
    "trachea": 16,
    "heart": 51,
    "aorta": 52,
    "inferior_vena_cava": 63,
    "portal_vein_and_splenic_vein": 64,
}
BTCV_LABELS = {
    0: "background",
    1: "spleen",
    2: "right kidney",
    3: "left kidney",
    4: "gallbladder",
    5: "esophagus",
    6: "liver",
    7: "stomach",
    8: "aorta",
    9: "inferior vena cava",
    10: "portal and splenic veins",
    11: "pancreas",
    12: "right adrenal gland",
    13: "left adrenal gland",
}
# TotalSegmentator id -> BTCV id; every other TotalSegmentator class -> 0
TOTALSEG_TO_BTCV = {
    TOTALSEG_IDS["spleen"]: 1,
    TOTALSEG_IDS["kidney_right"]: 2,
    TOTALSEG_IDS["kidney_left"]: 3,
    TOTALSEG_IDS["gallbladder"]: 4,
    TOTALSEG_IDS["esophagus"]: 5,
    TOTALSEG_IDS["liver"]: 6,
    TOTALSEG_IDS["stomach"]: 7,
    TOTALSEG_IDS["aorta"]: 8,
    TOTALSEG_IDS["inferior_vena_cava"]: 9,
    TOTALSEG_IDS["portal_vein_and_splenic_vein"]: 10,
    TOTALSEG_IDS["pancreas"]: 11,
    TOTALSEG_IDS["adrenal_gland_right"]: 12,
    TOTALSEG_IDS["adrenal_gland_left"]: 13,
}
SEGTHOR_LABELS = {0: "background", 1: "esophagus", 2: "heart", 3: "trachea", 4: "aorta"}

LABEL_NOTE = (
    "Labels are TotalSegmentator 2.18.0 model outputs (its regression-test reference files), not manual ground "
    "truth: use them for pipeline checks and demos ('fine-tuning learns, Dice rises'), never as clinical accuracy."
)


def map_labels(arr: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Map integer label ``arr`` through ``mapping`` (ids not in it -> 0); returns uint8."""
    a = np.asarray(arr)
    if a.size and (np.issubdtype(a.dtype, np.floating)):
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise ValueError("label array holds non-integer values")
    a = a.astype(np.int64, copy=False)
    if a.size and a.min() < 0:
        raise ValueError(f"negative label id {int(a.min())}")
    top = max([int(a.max()) if a.size else 0, *mapping.keys()]) + 1
    lut = np.zeros(top, dtype=np.uint8)
    for src, dst in mapping.items():
        if not 0 <= dst <= 255:
            raise ValueError(f"target id {dst} does not fit uint8")
        lut[src] = dst
    return lut[a]


def map_totalseg_to_btcv(arr: np.ndarray) -> np.ndarray:
    """TotalSegmentator ``total`` ids -> BTCV 13-organ ids (other classes -> 0)."""
    return map_labels(arr, TOTALSEG_TO_BTCV)


def resample_nearest(
    src: np.ndarray, src_affine: np.ndarray, dst_shape: tuple[int, ...], dst_affine: np.ndarray, fill: int = 0
) -> np.ndarray:
    """Nearest-neighbour resampling of ``src`` onto the grid (``dst_shape``, ``dst_affine``) by physical position.

    Voxel (i, j, k) of the destination takes the value of the source voxel nearest to the same world point;
    points outside the source get ``fill``. Never matches by raw array index, so flipped / cropped / permuted
    grids are handled.
    """
    m = np.linalg.inv(np.asarray(src_affine, float)) @ np.asarray(dst_affine, float)
    rot, off = m[:3, :3], m[:3, 3]
    nx, ny, nz = (int(s) for s in dst_shape)
    out = np.full((nx, ny, nz), fill, dtype=src.dtype)
    ii, jj = np.meshgrid(np.arange(nx, dtype=float), np.arange(ny, dtype=float), indexing="ij")
    base = rot[:, 0, None, None] * ii + rot[:, 1, None, None] * jj + off[:, None, None]
    shape = np.array(src.shape[:3])[:, None, None]
    for k in range(nz):
        idx = np.floor(base + rot[:, 2, None, None] * k + 0.5 + 1e-6).astype(np.int64)
        ok = np.all((idx >= 0) & (idx < shape), axis=0)
        out[:, :, k][ok] = src[idx[0][ok], idx[1][ok], idx[2][ok]]
    return out


# ----------------------------------------------------------------------------------------------------------------
# small utilities
# ----------------------------------------------------------------------------------------------------------------
def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class _Log:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[fetch_data {time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)


def _save_nifti(arr: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(arr), np.asarray(affine, float))
    img.set_sform(np.asarray(affine, float), code=1)
    img.set_qform(np.asarray(affine, float), code=1)
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path


def _load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine


def _as_int16_hu(arr: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(arr)
    if not np.array_equal(a, np.round(a)):
        raise FetchError(f"{what}: voxel values are not integers, unexpected for CT in HU")
    if a.min() < -32768 or a.max() > 32767:
        raise FetchError(f"{what}: values {a.min()}..{a.max()} do not fit int16")
    return a.astype(np.int16)


def _itk_load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load a DICOM folder / NRRD with MONAI's ITKReader: array in (x, y, z), affine in RAS (NIfTI world)."""
    from monai.transforms import LoadImage

    img = LoadImage(reader="ITKReader", image_only=True)(str(path))
    return np.asarray(img), np.asarray(img.affine, dtype=float)


def _describe(arr: np.ndarray, affine: np.ndarray) -> str:
    import nibabel as nib

    sp = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    return (
        f"shape {tuple(arr.shape)}, spacing {'x'.join(f'{s:.3g}' for s in sp)} mm, "
        f"{''.join(nib.aff2axcodes(affine))}, HU {arr.min()}..{arr.max()}"
    )


# ----------------------------------------------------------------------------------------------------------------
# obtaining the archives
# ----------------------------------------------------------------------------------------------------------------
def _hand_advice(src: dict, how: str) -> str:
    return (
        f"  To provide it by hand: on a machine with network, {how}\n"
        f"  (or download {src['file']} from {src['url']}), check its sha256 is {src['sha256']},\n"
        f"  copy it into a folder DIR here and run: python -m misfm_demo.fetch_data --sdist-dir DIR"
    )


def _pip_download(src: dict, dest_dir: Path, log: _Log, extra: list[str]) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", src["package"], *extra,
        "--retries", "2", "--timeout", "30", f"{src['package']}=={src['version']}", "-d", str(dest_dir),
    ]  # fmt: skip
    log("running: " + " ".join(cmd[2:]))
    try:
        proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"could not run pip download for {src['package']}: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
        how = f"run `pip download --no-deps --no-binary {src['package']} {src['package']}=={src['version']} -d DIR`"
        raise FetchError(
            f"pip download of {src['package']}=={src['version']} failed (exit {proc.returncode}). "
            f"Is PyPI reachable (offline? proxy?)\n--- pip output (tail) ---\n{tail}\n---\n" + _hand_advice(src, how)
        )
    found = dest_dir / src["file"]
    if not found.is_file():
        raise FetchError(f"pip download reported success but {found} is missing (got {os.listdir(dest_dir)})")
    return found


def _apt_download(src: dict, dest_dir: Path, log: _Log) -> Path:
    apt = shutil.which("apt-get")
    if apt is None:
        raise FetchError("apt-get not found (not a Debian/Ubuntu system)")
    cmd = [apt, "download", f"{src['package']}={src['version']}"]
    log("running: apt-get download " + f"{src['package']}={src['version']}")
    try:
        proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", cwd=dest_dir, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"could not run apt-get download: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
        raise FetchError(
            f"apt-get download {src['package']}={src['version']} failed (exit {proc.returncode}); "
            f"try `apt-get update` first, or the version left the archive.\n{tail}"
        )
    found = dest_dir / src["file"]
    if not found.is_file():
        debs = sorted(p.name for p in dest_dir.glob("*.deb"))
        raise FetchError(f"apt-get download succeeded but {src['file']} is missing (got {debs})")
    return found


def _obtain(src: dict, data_dir: Path, sdist_dir: Path | None, log: _Log, download) -> Path:
    """Return a verified copy of ``src`` in ``data_dir/downloads`` (cache -> ``sdist_dir`` -> download)."""
    cache = data_dir / "downloads" / src["file"]
    advice_bad_cache = f"  Delete {cache} and run again to re-download it."
    if cache.is_file():
        try:
            verify_sha256(cache, src["sha256"], f"cached {src['package']} archive", advice_bad_cache)
            log(f"{src['key']}: using cached {cache.name} ({_mb(cache.stat().st_size)}, sha256 ok)")
            return cache
        except ChecksumError as exc:
            log(f"{src['key']}: cached archive is corrupt, fetching it again\n{exc}")
            cache.unlink()
    if sdist_dir is not None and (Path(sdist_dir) / src["file"]).is_file():
        given = Path(sdist_dir) / src["file"]
        verify_sha256(
            given, src["sha256"], f"{src['package']} archive given with --sdist-dir",
            f"  {given} is not the expected {src['package']} {src['version']} file; replace it with the right "
            f"one (see {src['url']}). Nothing was extracted from it.",
        )  # fmt: skip
        with atomic_path(cache) as tmp:
            shutil.copyfile(given, tmp)
        log(f"{src['key']}: took {given} ({_mb(cache.stat().st_size)}, sha256 ok)")
        return cache
    t = time.perf_counter()
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache.parent) as tmpdir:
        got = download(src, Path(tmpdir), log)
        verify_sha256(
            got, src["sha256"], f"downloaded {src['package']} archive",
            f"  The registry served a different file than the one this project pinned; nothing was extracted. "
            f"Check for a proxy/mirror rewriting packages, or update the pin in {__name__} after review.",
        )  # fmt: skip
        os.replace(got, cache)
    log(f"{src['key']}: downloaded {cache.name} ({_mb(cache.stat().st_size)}) in {time.perf_counter() - t:.1f}s, "
        "sha256 ok")  # fmt: skip
    return cache


def _prefix_selector(prefix: str, members: dict[str, str], extra=None):
    def select(name: str) -> str | None:
        if not name.startswith(prefix):
            return None
        rel = name[len(prefix) :]
        if rel in members:
            return members[rel]
        return extra(rel) if extra else None

    return select


# ----------------------------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------------------------
def _stage_totalsegmentator(data_dir: Path, sdist_dir: Path | None, log: _Log) -> dict:
    archive = _obtain(TS, data_dir, sdist_dir, log, lambda s, d, lg: _pip_download(s, d, lg, []))

    def dicom(rel: str) -> str | None:
        if rel.startswith(TS_DICOM_DIR) and rel != TS_DICOM_DIR:
            return f"{TS_REF}/example_ct_dicom/{rel[len(TS_DICOM_DIR):]}"
        return None

    t = time.perf_counter()
    files = safe_extract(
        archive, data_dir, _prefix_selector(TS["prefix"], TS_MEMBERS, dicom), label=archive.name
    )
    names = {p.relative_to(data_dir).as_posix() for p in files}
    missing = sorted(set(TS_MEMBERS.values()) - names)
    n_dicom = sum(1 for n in names if "/example_ct_dicom/" in n)
    if missing or n_dicom != TS_DICOM_FILES:
        raise FetchError(f"{archive}: missing members {missing}, {n_dicom}/{TS_DICOM_FILES} DICOM files")
    log(f"totalsegmentator: extracted {len(files)} members ({_mb(sum(p.stat().st_size for p in files))}) "
        f"in {time.perf_counter() - t:.1f}s")  # fmt: skip

    _verify_totalseg_ids(data_dir / TS_MEMBERS["totalsegmentator/map_to_binary.py"], log)
    ref = data_dir / TS_REF
    info: dict = {}

    # DICOM series -> NIfTI (ITK decodes the JPEG 2000 lossless pixels; MONAI gives the RAS affine)
    t = time.perf_counter()
    arr, aff = _itk_load(ref / "example_ct_dicom")
    arr = _as_int16_hu(arr, "example_ct_dicom")
    dicom_nii = _save_nifti(arr, aff, data_dir / "nifti/ts_example_ct_dicom.nii.gz")
    log(f"dicom series -> {dicom_nii.relative_to(data_dir)}: {_describe(arr, aff)} ({time.perf_counter() - t:.1f}s)")

    # abdomen: example_ct + force_split labels (same grid; resampled by affine anyway as a guard)
    ct, ct_aff = _load_nifti(ref / "example_ct.nii.gz")
    seg, seg_aff = _load_nifti(ref / "example_seg_fast_force_split.nii.gz")
    lab = map_totalseg_to_btcv(resample_nearest(np.asarray(seg), seg_aff, ct.shape, ct_aff))
    _save_nifti(lab, ct_aff, data_dir / "labels/abdomen_example_ct_btcv.nii.gz")
    info["abdomen_example_ct"] = _organ_stats(lab, np.asarray(ct), BTCV_LABELS)
    log(f"abdomen example_ct: {_describe(np.asarray(ct), ct_aff)}; "
        f"BTCV voxels {_fmt_counts(info['abdomen_example_ct'])}")

    # abdomen: DICOM series + example_seg_dicom (y flipped against the DICOM: matched in physical space)
    dseg, dseg_aff = _load_nifti(ref / "example_seg_dicom.nii.gz")
    dlab = map_totalseg_to_btcv(resample_nearest(np.asarray(dseg), dseg_aff, arr.shape, aff))
    _save_nifti(dlab, aff, data_dir / "labels/abdomen_example_ct_dicom_btcv.nii.gz")
    stats = _organ_stats(dlab, arr, BTCV_LABELS)
    # registration check: liver / spleen voxels must lie in soft-tissue HU; the raw-index pairing (no y flip)
    # is computed only to show that it would be wrong
    naive = map_totalseg_to_btcv(np.asarray(dseg))
    info["abdomen_example_ct_dicom"] = stats
    for organ, oid in (("liver", 6), ("spleen", 1)):
        good, bad = _soft_tissue_fraction(arr, dlab == oid), _soft_tissue_fraction(arr, naive == oid)
        stats[organ]["soft_tissue_fraction"] = round(good, 3)
        log(f"abdomen dicom: {organ} voxels in soft-tissue HU [-50, 250]: {good:.1%} matched by affine "
            f"(raw-index pairing would give {bad:.1%})")  # fmt: skip
        if good < 0.9:
            raise FetchError(f"DICOM {organ} label: only {good:.1%} of its voxels in soft-tissue HU: misregistered")
    log(f"abdomen dicom: BTCV voxels {_fmt_counts(stats)}")

    # thorax: aorta-report CT, heart (full grid) + aorta (cropped grid -> full grid by affine)
    tct, tct_aff = _load_nifti(ref / "aorta_report/example_ct.nii.gz")
    heart, heart_aff = _load_nifti(ref / "pulmonary_report/models/heart.nii.gz")
    aorta, aorta_aff = _load_nifti(ref / "aorta_report/test_result/models/aorta.nii.gz")
    heart_full = resample_nearest(np.asarray(heart) > 0, heart_aff, tct.shape, tct_aff)
    aorta_full = resample_nearest(np.asarray(aorta) > 0, aorta_aff, tct.shape, tct_aff)
    if aorta_full.sum() != (np.asarray(aorta) > 0).sum():
        raise FetchError(
            f"aorta label lost voxels when placed on the full grid ({(np.asarray(aorta) > 0).sum()} -> "
            f"{aorta_full.sum()}): the cropped grid is not inside the CT"
        )
    tlab = np.zeros(tct.shape, np.uint8)
    tlab[heart_full] = 2
    tlab[aorta_full] = 4  # the aortic root overlaps the heart label a little; the aorta wins
    _save_nifti(tlab, tct_aff, data_dir / "labels/thorax_aorta_case_segthor.nii.gz")
    info["thorax_aorta_case"] = _organ_stats(tlab, np.asarray(tct), SEGTHOR_LABELS)
    info["thorax_heart_aorta_overlap_voxels"] = int((heart_full & aorta_full).sum())
    log(f"thorax aorta case: {_describe(np.asarray(tct), tct_aff)}; SegTHOR voxels "
        f"{_fmt_counts(info['thorax_aorta_case'])}; heart/aorta overlap "
        f"{info['thorax_heart_aorta_overlap_voxels']} voxels (-> aorta)")  # fmt: skip
    return info


def _verify_totalseg_ids(map_py: Path, log: _Log) -> None:
    """Check :data:`TOTALSEG_IDS` against ``class_map["total"]`` in the sdist (parsed with ast, never executed)."""
    tree = ast.parse(map_py.read_text(encoding="utf-8"))
    class_map = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "class_map" for t in node.targets):
            class_map = ast.literal_eval(node.value)
            break
    if class_map is None or "total" not in class_map:
        raise FetchError(f"{map_py}: no class_map['total'] found")
    total = class_map["total"]
    wrong = {name: (i, total.get(i)) for name, i in TOTALSEG_IDS.items() if total.get(i) != name}
    if wrong:
        raise FetchError(f"TotalSegmentator class ids differ from this script's table: {wrong}")
    log(f"totalsegmentator: class ids of {len(TOTALSEG_IDS)} organs verified against map_to_binary.py")


def _organ_stats(lab: np.ndarray, img: np.ndarray, names: dict[int, str]) -> dict:
    out = {}
    for i, name in names.items():
        if i == 0:
            continue
        m = lab == i
        n = int(m.sum())
        out[name] = {"voxels": n, "median_hu": (float(np.median(img[m])) if n else None)}
    return out


def _soft_tissue_fraction(img: np.ndarray, mask: np.ndarray) -> float:
    v = img[mask]
    return float(((v >= -50) & (v <= 250)).mean()) if v.size else 0.0


def _fmt_counts(stats: dict) -> str:
    return ", ".join(f"{k} {v['voxels']}" for k, v in stats.items() if isinstance(v, dict))


def _stage_pyradiomics(data_dir: Path, sdist_dir: Path | None, log: _Log) -> dict:
    # --no-build-isolation: pip prepares the metadata with this environment's numpy + setuptools (recent
    # setuptools no longer needs the separate `wheel` package)
    missing = [m for m in ("numpy", "setuptools") if not _importable(m)]
    if missing:
        raise FetchError(
            "pyradiomics' sdist needs a build environment: `pip install numpy setuptools wheel` first "
            "(it is downloaded with --no-build-isolation)"
        )
    archive = _obtain(
        PYRAD, data_dir, sdist_dir, log, lambda s, d, lg: _pip_download(s, d, lg, ["--no-build-isolation"])
    )
    files = safe_extract(archive, data_dir, _prefix_selector(PYRAD["prefix"], PYRAD_MEMBERS), label=archive.name)
    names = {p.relative_to(data_dir).as_posix() for p in files}
    if set(PYRAD_MEMBERS.values()) - names:
        raise FetchError(f"{archive}: missing members {sorted(set(PYRAD_MEMBERS.values()) - names)}")
    info = {}
    for case in ("lung1", "lung2"):
        t = time.perf_counter()
        arr, aff = _itk_load(data_dir / f"raw/pyradiomics/data/{case}_image.nrrd")
        arr = _as_int16_hu(arr, f"{case}_image.nrrd")
        out = _save_nifti(arr, aff, data_dir / f"nifti/pyradiomics_{case}.nii.gz")
        info[case] = _describe(arr, aff)
        log(f"pyradiomics {case} -> {out.relative_to(data_dir)}: {info[case]} ({time.perf_counter() - t:.1f}s)")
    return info


def _stage_invesalius(data_dir: Path, sdist_dir: Path | None, log: _Log) -> dict:
    import plistlib

    dpkg = shutil.which("dpkg-deb")
    if dpkg is None:
        raise FetchError("dpkg-deb not found (not a Debian/Ubuntu system)")
    archive = _obtain(INVES, data_dir, sdist_dir, log, _apt_download)
    # the .deb's file system tar, streamed through the same member checks (equivalent to `dpkg-deb -x`, but only
    # the two needed members are written)
    proc = subprocess.Popen([dpkg, "--fsys-tarfile", str(archive)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        files = safe_extract(
            proc.stdout, data_dir, lambda n: INVES_MEMBERS.get(n[2:] if n.startswith("./") else n),
            label=archive.name,
        )  # fmt: skip
    finally:
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace")
        rc = proc.wait()
    if rc != 0:
        raise FetchError(f"dpkg-deb --fsys-tarfile {archive} failed (exit {rc}): {err.strip()}")
    names = {p.relative_to(data_dir).as_posix() for p in files}
    if set(INVES_MEMBERS.values()) - names:
        raise FetchError(f"{archive}: missing members {sorted(set(INVES_MEMBERS.values()) - names)}")

    # Cranium.inv3 is itself a gzip tar holding <tmpdir>/main.plist + matrix.dat
    inner = {"main.plist": "raw/invesalius/Cranium/main.plist", "matrix.dat": "raw/invesalius/Cranium/matrix.dat"}
    safe_extract(
        data_dir / INVES_MEMBERS["usr/share/doc/invesalius-examples/examples/Cranium.inv3"], data_dir,
        lambda n: inner.get(n.rsplit("/", 1)[-1]), required=2, label="Cranium.inv3",
    )  # fmt: skip
    meta = plistlib.loads((data_dir / inner["main.plist"]).read_bytes())
    shape = tuple(int(s) for s in meta["matrix"]["shape"])  # (z, y, x)
    spacing = [float(s) for s in meta["spacing"]]  # (x, y, z) in mm
    dtype = np.dtype(meta["matrix"]["dtype"]).newbyteorder("<")
    if shape != (108, 256, 256) or dtype != np.dtype("<i2"):
        raise FetchError(f"Cranium.inv3: unexpected matrix {shape} {dtype}")
    raw = np.fromfile(data_dir / inner["matrix.dat"], dtype=dtype)
    if raw.size != int(np.prod(shape)):
        raise FetchError(f"Cranium.inv3 matrix.dat holds {raw.size} values, expected {np.prod(shape)}")
    arr = raw.reshape(shape).transpose(2, 1, 0).astype(np.int16)  # -> (x, y, z)
    # Orientation is not stored in the project. InVesalius keeps slices as DICOM rows/columns (column index ->
    # patient left, row index -> posterior), and slice index 0 is inferior: the teeth (> 1800 HU) lie in the
    # first slices and the head's cross-section shrinks towards the last one (the vertex). So we write an
    # LPS-ordered grid (like the aorta case): RAS affine diag(-sx, -sy, +sz), origin at 0. Left/right cannot be
    # checked from the data; treat the laterality as assumed.
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    out = _save_nifti(arr, aff, data_dir / "nifti/invesalius_cranium_head.nii.gz")
    desc = _describe(arr, aff)
    log(f"invesalius head -> {out.relative_to(data_dir)}: {desc} (orientation assumed, see source comment)")
    return {"head": desc}


def _importable(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


# ----------------------------------------------------------------------------------------------------------------
# datalists
# ----------------------------------------------------------------------------------------------------------------
def _rel(data_dir: Path, rel_to_data: str) -> str:
    """Path of ``data_dir/rel_to_data`` relative to ``data_dir/datalists``."""
    return "../" + rel_to_data


def _write_datalists(data_dir: Path, done: set[str], info: dict, skipped: dict, log: _Log) -> dict[str, Path]:
    dl_dir = data_dir / "datalists"
    common = {
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "paths": "relative to the folder of this file (monai.data.load_decathlon_datalist resolves them so)",
        "generated_by": "python -m misfm_demo.fetch_data",
    }
    vols = [
        ("ts_abdomen_example_ct", f"{TS_REF}/example_ct.nii.gz", "totalsegmentator"),
        ("ts_thorax_aorta_case", f"{TS_REF}/aorta_report/example_ct.nii.gz", "totalsegmentator"),
        ("ts_abdomen_dicom_series", "nifti/ts_example_ct_dicom.nii.gz", "totalsegmentator"),
        ("pyradiomics_lung1", "nifti/pyradiomics_lung1.nii.gz", "pyradiomics"),
        ("pyradiomics_lung2", "nifti/pyradiomics_lung2.nii.gz", "pyradiomics"),
        ("invesalius_head", "nifti/invesalius_cranium_head.nii.gz", "invesalius"),
    ]
    val_name = "ts_abdomen_dicom_series"
    entries = [{"image": _rel(data_dir, p), "name": n} for n, p, src in vols if src in done]
    pre = {
        "name": "misfm_pretraining",
        "description": (
            "Unlabelled CT volumes for Volume Fusion pretraining, from package registries: TotalSegmentator 2.18.0 "
            "sdist (abdomen CT, thorax CT angiography, abdomen DICOM series), pyradiomics 3.0.1 sdist (two chest "
            "CTs), Debian invesalius-examples (head CT, orientation assumed). 'validation' holds the 20-slice "
            "DICOM series (always available: it comes from the required source)."
            + (f" Skipped optional sources: {skipped}." if skipped else "")
        ),
        "licence": "TotalSegmentator: Apache-2.0; pyradiomics: BSD-3-Clause; invesalius-examples: GPL-2 "
        "(see ../licenses; do not commit the data)",
        **common,
        "training": [e for e in entries if e["name"] != val_name],
        "validation": [e for e in entries if e["name"] == val_name],
    }
    pre["numTraining"], pre["numValidation"] = len(pre["training"]), len(pre["validation"])

    ab_ct = info["totalsegmentator"]["abdomen_example_ct"]
    ab_dc = info["totalsegmentator"]["abdomen_example_ct_dicom"]
    absent_ct = [k for k, v in ab_ct.items() if v["voxels"] == 0]
    absent_dc = [k for k, v in ab_dc.items() if v["voxels"] == 0]
    abdomen = {
        "name": "misfm_abdomen_btcv13",
        "description": (
            "Abdomen CT with BTCV 13-organ ids, mapped from TotalSegmentator 'total' ids (spleen 1->1, kidney_right "
            "2->2, kidney_left 3->3, gallbladder 4->4, esophagus 15->5, liver 5->6, stomach 6->7, aorta 52->8, "
            "inferior_vena_cava 63->9, portal_vein_and_splenic_vein 64->10, pancreas 7->11, adrenal_gland_right "
            "8->12, adrenal_gland_left 9->13; all other classes -> 0). training: example_ct (3 mm) with "
            "example_seg_fast_force_split; validation: the DICOM series with example_seg_dicom, resampled onto the "
            "DICOM grid in physical space (its y axis is flipped against the DICOM). "
            f"Organs absent (no voxels): example_ct {absent_ct}; DICOM series {absent_dc}. " + LABEL_NOTE
        ),
        "labels": {str(k): v for k, v in BTCV_LABELS.items()},
        "absent_labels": {"ts_abdomen_example_ct": absent_ct, "ts_abdomen_dicom_series": absent_dc},
        "label_source": LABEL_NOTE,
        "licence": "Apache-2.0 (TotalSegmentator, see ../licenses/totalsegmentator_LICENSE)",
        **common,
        "training": [
            {
                "image": _rel(data_dir, f"{TS_REF}/example_ct.nii.gz"),
                "label": _rel(data_dir, "labels/abdomen_example_ct_btcv.nii.gz"),
                "name": "ts_abdomen_example_ct",
            }
        ],
        "validation": [
            {
                "image": _rel(data_dir, "nifti/ts_example_ct_dicom.nii.gz"),
                "label": _rel(data_dir, "labels/abdomen_example_ct_dicom_btcv.nii.gz"),
                "name": "ts_abdomen_dicom_series",
            }
        ],
        "voxel_counts": {"ts_abdomen_example_ct": ab_ct, "ts_abdomen_dicom_series": ab_dc},
    }
    abdomen["numTraining"], abdomen["numValidation"] = 1, 1

    th = info["totalsegmentator"]["thorax_aorta_case"]
    absent_th = [k for k, v in th.items() if v["voxels"] == 0]
    thorax = {
        "name": "misfm_thorax_segthor",
        "description": (
            "Thorax CT angiography (TotalSegmentator aorta_report example, 1.5 mm) with SegTHOR ids: heart from "
            "pulmonary_report/models/heart.nii.gz (full grid), aorta from aorta_report/test_result/models/aorta.nii.gz "
            "(cropped grid, placed into the full grid by affine, nearest neighbour; aorta wins where it overlaps the "
            f"heart). Absent (no such label in the sdist for this case): {absent_th}. Only one labelled case: "
            "'validation' is empty. " + LABEL_NOTE
        ),
        "labels": {str(k): v for k, v in SEGTHOR_LABELS.items()},
        "absent_labels": {"ts_thorax_aorta_case": absent_th},
        "label_source": LABEL_NOTE,
        "licence": "Apache-2.0 (TotalSegmentator, see ../licenses/totalsegmentator_LICENSE)",
        **common,
        "training": [
            {
                "image": _rel(data_dir, f"{TS_REF}/aorta_report/example_ct.nii.gz"),
                "label": _rel(data_dir, "labels/thorax_aorta_case_segthor.nii.gz"),
                "name": "ts_thorax_aorta_case",
            }
        ],
        "validation": [],
        "voxel_counts": {"ts_thorax_aorta_case": th},
    }
    thorax["numTraining"], thorax["numValidation"] = 1, 0

    out = {}
    for key, obj in (("pretraining", pre), ("abdomen", abdomen), ("thorax", thorax)):
        out[key] = atomic_write_text(dl_dir / f"{key}.json", json.dumps(obj, indent=2) + "\n")
    log(f"datalists: {', '.join(p.name for p in out.values())} in {dl_dir} "
        f"(pretraining {pre['numTraining']} train / {pre['numValidation']} val)")  # fmt: skip
    if absent_ct:
        log(f"note: absent in abdomen example_ct labels: {absent_ct}; in DICOM series labels: {absent_dc}")
    if absent_th:
        log(f"note: absent in thorax labels: {absent_th}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# manifest / driver
# ----------------------------------------------------------------------------------------------------------------
OUTPUT_DIRS = ("raw", "nifti", "labels", "licenses", "datalists")
DATALIST_NAMES = ("pretraining", "abdomen", "thorax")


def _collect_outputs(data_dir: Path) -> dict[str, dict]:
    files = {}
    for sub in OUTPUT_DIRS:
        for p in sorted((data_dir / sub).rglob("*")):
            if p.is_file() and not p.name.startswith((".tmp-", ".staging-")) and ".staging-" not in p.as_posix():
                files[p.relative_to(data_dir).as_posix()] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return files


def _up_to_date(data_dir: Path, wanted: list[str], log: _Log) -> dict | None:
    mf = data_dir / "manifest.json"
    if not mf.is_file():
        return None
    try:
        man = json.loads(mf.read_text())
    except (OSError, ValueError):
        log("manifest unreadable, redoing")
        return None
    if man.get("recipe_version") != RECIPE_VERSION:
        log("manifest from another recipe version, redoing")
        return None
    stages = man.get("stages", {})
    if any(s not in stages for s in wanted):
        return None
    for rel, meta in man.get("files", {}).items():
        p = data_dir / rel
        if not p.is_file() or p.stat().st_size != meta["size"] or sha256_file(p) != meta["sha256"]:
            log(f"output {rel} missing or changed since the last run, redoing")
            return None
    if any(f"datalists/{n}.json" not in man.get("files", {}) for n in DATALIST_NAMES):
        return None
    return man


def fetch_all(
    data_dir: str | os.PathLike | None = None,
    include_optional: bool = True,
    force: bool = False,
    sdist_dir: str | os.PathLike | None = None,
    quiet: bool = False,
) -> dict[str, Path]:
    """Fetch the sources, convert, write the datalists; return ``{"pretraining"|"abdomen"|"thorax": Path}``.

    Args:
        data_dir: output folder (default :func:`default_data_dir`: ``$MISFM_DATA_DIR`` or ``<repo>/data``).
        include_optional: also fetch pyradiomics (chest CT) and invesalius-examples (head CT); a failing optional
            source is skipped with a message (and recorded; ``force=True`` retries it).
        force: redo extraction, conversion and datalists even if the manifest says all is up to date (downloads in
            ``data_dir/downloads`` are reused after their sha256 is re-checked).
        sdist_dir: folder holding already-downloaded archives (``totalsegmentator-2.18.0.tar.gz``,
            ``pyradiomics-3.0.1.tar.gz``, ``invesalius-examples_3.1.99998-4_all.deb``) for offline machines.
        quiet: no progress output.

    Raises:
        ChecksumError: an archive's sha256 differs from the pinned one (nothing is extracted from it).
        FetchError: the required source cannot be had (pip failing/offline, missing member, ...).
    """
    log = _Log(quiet)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    data_dir = data_dir.resolve()
    sdist_dir = Path(sdist_dir).resolve() if sdist_dir is not None else None
    wanted = ["totalsegmentator"] + (["pyradiomics", "invesalius"] if include_optional else [])
    result = {n: data_dir / "datalists" / f"{n}.json" for n in DATALIST_NAMES}

    if not force:
        t = time.perf_counter()
        man = _up_to_date(data_dir, wanted, log)
        if man is not None:
            skipped = {k: v["reason"] for k, v in man["stages"].items() if v.get("status") == "skipped"}
            log(f"up to date: {data_dir} ({len(man['files'])} files verified in {time.perf_counter() - t:.1f}s)"
                + (f"; optional sources skipped earlier (use --force to retry): {skipped}"
                   if skipped else ""))  # fmt: skip
            return result

    t_all = time.perf_counter()
    data_dir.mkdir(parents=True, exist_ok=True)
    stages: dict[str, dict] = {}
    info: dict = {}
    steps = [("totalsegmentator", _stage_totalsegmentator, True)]
    if include_optional:
        steps += [("pyradiomics", _stage_pyradiomics, False), ("invesalius", _stage_invesalius, False)]
    for i, (name, fn, required) in enumerate(steps, 1):
        t = time.perf_counter()
        log(f"[{i}/{len(steps) + 1}] {name}{'' if required else ' (optional)'}")
        try:
            info[name] = fn(data_dir, sdist_dir, log)
        except (FetchError, ChecksumError, OSError, subprocess.SubprocessError) as exc:
            if required:
                raise
            log(f"SKIPPING optional source {name}: {exc}")
            stages[name] = {"status": "skipped", "reason": str(exc).splitlines()[0]}
            continue
        stages[name] = {"status": "done", "seconds": round(time.perf_counter() - t, 1)}
        log(f"{name}: done in {time.perf_counter() - t:.1f}s")

    log(f"[{len(steps) + 1}/{len(steps) + 1}] datalists")
    done = {k for k, v in stages.items() if v["status"] == "done"}
    skipped = {k: v["reason"] for k, v in stages.items() if v["status"] == "skipped"}
    result = _write_datalists(data_dir, done, info, skipped, log)

    manifest = {
        "recipe_version": RECIPE_VERSION,
        "note": "written by misfm_demo.fetch_data; outputs are checked against these sha256 on every run",
        "stages": stages,
        "sources": {s["key"]: {k: s[k] for k in ("file", "sha256", "version")} for s in (TS, PYRAD, INVES)},
        "datalists": {k: v.relative_to(data_dir).as_posix() for k, v in result.items()},
        "files": _collect_outputs(data_dir),
    }
    atomic_write_text(data_dir / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    log(f"all done in {time.perf_counter() - t_all:.1f}s: {len(manifest['files'])} files under {data_dir}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m misfm_demo.fetch_data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="output folder (default: $MISFM_DATA_DIR; else <checkout>/data in a source checkout; "
                         "else $XDG_DATA_HOME/misfm, i.e. ~/.local/share/misfm)")
    ap.add_argument("--skip-optional", action="store_true", help="only the required TotalSegmentator source")
    ap.add_argument("--force", action="store_true", help="redo everything even if up to date")
    ap.add_argument("--sdist-dir", type=Path, default=None, help="folder with already-downloaded archives (offline)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    try:
        paths = fetch_all(args.data_dir, not args.skip_optional, args.force, args.sdist_dir, args.quiet)
    except (ChecksumError, FetchError) as exc:
        print(f"fetch_data: ERROR: {exc}", file=sys.stderr)
        return 1
    for k, p in paths.items():
        print(f"{k}: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
