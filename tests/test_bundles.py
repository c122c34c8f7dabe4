"""MIS-FM bundles: metadata, network I/O, TorchScript export, train/evaluate/inference as subprocesses, DDP (gloo),
fine-tuning from the pretraining checkpoint, bad inputs, and the self-contained zip distribution.

Everything runs on CPU with a tiny PCT-Net (see tests/bundle_utils.py).
"""

from __future__ import annotations

import csv
import functools
import http.server
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bundle_utils as bu  # noqa: E402

sys.path.insert(0, str(bu.BUNDLES_DIR))
import build  # noqa: E402

# ../shared beside the checkout (as for the golden files): the zoo schema, read offline
SCHEMA = Path(__file__).resolve().parents[1].parent / "shared" / "schema" / "meta_schema_20240725.json"


def _ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"command failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def _paths(root: Path, datalist: Path) -> dict:
    return {"data_list_file_path": str(datalist), "dataset_dir": str(datalist.parent / "data"),
            "output_dir": str(root / "eval"), "ckpt_dir": str(root / "models")}


def _infer_overrides(train_overrides: dict) -> dict:
    keep = ("feature_channels", "num_heads", "roi_size", "num_workers", "amp", "data_list_file_path", "dataset_dir",
            "ckpt_dir")
    return {k: v for k, v in train_overrides.items() if k in keep}


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Tiny VF-v1 pretraining run (CPU fusion); returns (output root, stdout)."""
    root = tmp_path_factory.mktemp("pretraining")
    datalist = bu.make_dataset(root / "ds", 5, n_train=3, n_val=2, n_test=1, labels=False)
    overrides = dict(bu.TINY_PRETRAIN, **_paths(root, datalist))
    out = _ok(bu.run_bundle(bu.BUNDLES_DIR / bu.PRETRAINING, "run", ["train.json"], overrides, root / "work"))
    return root, datalist, overrides, out


@pytest.fixture(scope="module")
def abdomen(tmp_path_factory, pretrained):
    """Abdomen bundle fine-tuned from the pretraining checkpoint for a few iterations on a learnable toy task."""
    root = tmp_path_factory.mktemp("abdomen")
    n = bu.num_classes("misfm_abdomen_ct_segmentation")
    datalist = bu.make_dataset(root / "ds", n, n_train=2, n_val=1, n_test=1)
    # one training and one test case SMALLER than the roi (32, 32, 16): they must be padded and work
    bu.make_case(root / "ds" / "data" / "small.nii.gz", root / "ds" / "data" / "small_lab.nii.gz", (24, 24, 12), n, 9)
    dl = json.loads(datalist.read_text())
    dl["training"].append({"image": "small.nii.gz", "label": "small_lab.nii.gz"})
    dl["testing"].append({"image": "small.nii.gz"})
    datalist.write_text(json.dumps(dl))
    overrides = dict(bu.TINY_TRAIN, **_paths(root, datalist), max_epochs=4, val_interval=4, batch_size=3,
                     pretrained_checkpoint=str(pretrained[0] / "models" / "model.pt"))
    out = _ok(bu.run_bundle(bu.BUNDLES_DIR / "misfm_abdomen_ct_segmentation", "run", ["train.json"], overrides,
                            root / "work"))
    return root, datalist, overrides, out


# ---------------------------------------------------------------------------------------------------- static checks


def test_generated_configs_in_sync():
    assert build.stale_files() == [], "run `python bundles/build.py --sync`"


@pytest.mark.parametrize("bundle", bu.ALL_BUNDLES)
def test_bundle_layout(bundle):
    root = bu.BUNDLES_DIR / bundle
    for rel in ("configs/metadata.json", "configs/train.json", "configs/evaluate.json", "configs/inference.json",
                "configs/multi_gpu_train.json", "configs/multi_gpu_evaluate.json", "configs/logging.conf",
                "docs/README.md", "docs/data_license.txt", "LICENSE"):
        assert (root / rel).is_file(), rel
    assert "Apache License" in (root / "LICENSE").read_text()
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert meta["version"] == "0.1.2" and list(meta["changelog"]) == ["0.1.2", "0.1.1", "0.1.0"]  # newest first
    names = json.loads((root / "params.json").read_text())["config"]["label_names"]
    assert list(meta["network_data_format"]["outputs"]["pred"]["channel_def"].values()) == names


@pytest.mark.parametrize("bundle", bu.ALL_BUNDLES)
def test_verify_metadata_offline(bundle, tmp_path):
    from monai.bundle import verify_metadata

    assert SCHEMA.is_file(), f"{SCHEMA} missing: the repo expects ../shared beside the checkout"
    meta_file = bu.BUNDLES_DIR / bundle / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta_file), filepath=str(SCHEMA))
    broken = json.loads(meta_file.read_text())
    del broken["network_data_format"]  # required by the schema: the check must catch it
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(Exception, match="network_data_format"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA))


@pytest.mark.parametrize("bundle", bu.ALL_BUNDLES)
def test_verify_net_in_out(bundle):
    from monai.bundle import verify_net_in_out

    root = bu.BUNDLES_DIR / bundle
    verify_net_in_out(net_id="network_def", meta_file=str(root / "configs" / "metadata.json"),
                      config_file=str(root / "configs" / "inference.json"), device="cpu", n=1, any=1,
                      bundle_root=str(root), **{k: bu.TINY_NET[k] for k in ("feature_channels", "num_heads")},
                      roi_size=[32, 32, 16])


@pytest.mark.parametrize("bundle", bu.ALL_BUNDLES)
def test_ckpt_export_torchscript(bundle, tmp_path):
    from monai.bundle import ConfigParser, ckpt_export

    root = bu.BUNDLES_DIR / bundle
    cfg = ConfigParser()
    cfg.read_config(str(root / "configs" / "inference.json"))
    tiny = {"bundle_root": str(root), "feature_channels": bu.TINY_NET["feature_channels"],
            "num_heads": bu.TINY_NET["num_heads"], "roi_size": [32, 32, 16]}
    for k, v in tiny.items():
        cfg[k] = v
    net = cfg.get_parsed_content("network_def").eval()
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(ckpt),
                meta_file=str(root / "configs" / "metadata.json"), config_file=str(root / "configs" / "inference.json"),
                use_trace=True, input_shape=[1, 1, 32, 32, 16], **tiny)
    loaded = torch.jit.load(str(ts))
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- pretraining


def test_pretraining_v1_cpu_fusion(pretrained):
    root, _, _, out = pretrained
    assert (root / "models" / "model.pt").is_file()
    losses = bu.read_scalars(root / "eval", "train_loss")
    assert len(losses) >= 2 and all(math.isfinite(v) for v in losses)
    dice = bu.read_scalars(root / "eval", "val_mean_dice")
    assert dice and 0.0 <= dice[-1] <= 1.0
    assert "training from scratch" in out


@pytest.mark.parametrize("variant", [{"fusion_version": "v2"}, {"fuse_on_device": True}])
def test_pretraining_variants(pretrained, variant, tmp_path):
    _, datalist, overrides, _ = pretrained
    ov = dict(overrides, **_paths(tmp_path, datalist), **variant, max_epochs=1)
    _ok(bu.run_bundle(bu.BUNDLES_DIR / bu.PRETRAINING, "run", ["train.json"], ov, tmp_path / "work"))
    assert (tmp_path / "models" / "model.pt").is_file()
    assert all(math.isfinite(v) for v in bu.read_scalars(tmp_path / "eval", "train_loss"))


def test_pretraining_evaluate_fixed_set_is_reproducible(pretrained, tmp_path):
    root, _, overrides, _ = pretrained
    scores = []
    for i in range(2):
        ov = dict(overrides, output_dir=str(tmp_path / f"eval{i}"))
        _ok(bu.run_bundle(bu.BUNDLES_DIR / bu.PRETRAINING, "run", ["train.json", "evaluate.json"], ov, tmp_path / "w"))
        rows = list(csv.reader(open(tmp_path / f"eval{i}" / "per_class_metrics.csv")))
        assert rows[0][1].startswith("val_mean_dice_level0")
        scores.append(rows[-1])
    assert scores[0] == scores[1]


def test_pretraining_rejects_device_fusion_with_batch_1(pretrained, tmp_path):
    _, datalist, overrides, _ = pretrained
    ov = dict(overrides, **_paths(tmp_path, datalist), fuse_on_device=True, batch_size=1)
    r = bu.run_bundle(bu.BUNDLES_DIR / bu.PRETRAINING, "run", ["train.json"], ov, tmp_path / "w")
    assert r.returncode != 0 and "batch_size >= 2" in r.stdout + r.stderr
    assert not (tmp_path / "models").exists() and not (tmp_path / "eval").exists()


# ---------------------------------------------------------------------------------------------------- downstream


def test_finetune_from_pretraining_logs_load_report_and_loss_falls(abdomen):
    root, _, _, out = abdomen
    assert "LoadReport for pretrained_checkpoint" in out and "loaded " in out
    assert "skipped" in out  # the 5-class pretext heads do not fit the 14-class task
    assert (root / "models" / "model.pt").is_file()
    losses = bu.read_scalars(root / "eval", "train_loss")
    assert len(losses) >= 4 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses


def test_abdomen_evaluate_writes_per_organ_dice_hd95(abdomen, tmp_path):
    root, _, overrides, _ = abdomen
    ov = dict(overrides, output_dir=str(tmp_path / "eval"))
    _ok(bu.run_bundle(bu.BUNDLES_DIR / "misfm_abdomen_ct_segmentation", "run", ["train.json", "evaluate.json"], ov,
                      tmp_path / "w"))
    rows = list(csv.reader(open(tmp_path / "eval" / "per_class_metrics.csv")))
    assert "val_mean_dice_spleen" in rows[0] and "val_hd95_left_adrenal_gland" in rows[0]
    assert rows[-1][0] == "mean" and len(rows) == 3
    assert (tmp_path / "eval" / "val_mean_dice_raw.csv").is_file()
    assert (tmp_path / "eval" / "val_hd95_raw.csv").is_file()
    preds = list((tmp_path / "eval" / "pred").glob("*_seg.nii.gz"))
    assert len(preds) == 1


def test_abdomen_inference_nifti_with_input_affine(abdomen, tmp_path):
    root, datalist, overrides, _ = abdomen
    ov = dict(_infer_overrides(overrides), output_dir=str(tmp_path / "pred"))
    _ok(bu.run_bundle(bu.BUNDLES_DIR / "misfm_abdomen_ct_segmentation", "run", ["inference.json"], ov, tmp_path / "w"))
    for item in json.loads(datalist.read_text())["testing"]:
        src = datalist.parent / "data" / item["image"]
        pred = tmp_path / "pred" / item["image"].replace(".nii.gz", "_seg.nii.gz")
        assert pred.is_file(), pred
        a, b = nib.load(str(src)), nib.load(str(pred))
        assert a.shape == b.shape[:3]
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
        assert int(np.asanyarray(b.dataobj).max()) < bu.num_classes("misfm_abdomen_ct_segmentation")


@pytest.mark.parametrize("bundle", ["misfm_headneck_ct_segmentation", "misfm_thorax_ct_segmentation"])
def test_other_segmentation_bundles_train_evaluate_infer(bundle, tmp_path):
    n = bu.num_classes(bundle)
    datalist = bu.make_dataset(tmp_path / "ds", n, n_train=2, n_val=1, n_test=1)
    ov = dict(bu.TINY_TRAIN, **_paths(tmp_path, datalist), max_epochs=1)
    out = _ok(bu.run_bundle(bu.BUNDLES_DIR / bundle, "run", ["train.json"], ov, tmp_path / "w"))
    assert "training from scratch" in out and (tmp_path / "models" / "model.pt").is_file()
    _ok(bu.run_bundle(bu.BUNDLES_DIR / bundle, "run", ["train.json", "evaluate.json"], ov, tmp_path / "w"))
    header = next(csv.reader(open(tmp_path / "eval" / "per_class_metrics.csv")))
    names = json.loads((bu.BUNDLES_DIR / bundle / "params.json").read_text())["config"]["label_names"]
    assert header[1:] == [f"val_mean_dice_{c}" for c in names[1:]] + [f"val_hd95_{c}" for c in names[1:]]
    iv = dict(_infer_overrides(ov), output_dir=str(tmp_path / "pred"))
    _ok(bu.run_bundle(bu.BUNDLES_DIR / bundle, "run", ["inference.json"], iv, tmp_path / "w"))
    assert len(list((tmp_path / "pred").glob("*_seg.nii.gz"))) == 1


def test_multi_gpu_train_torchrun_gloo(abdomen, tmp_path):
    _, datalist, overrides, _ = abdomen
    dl = json.loads(datalist.read_text())
    dl["validation"] = dl["validation"] * 2  # MONAI's DistributedSampler needs >= 1 validation case per rank
    dl = {k: [{f: str(datalist.parent / "data" / p) for f, p in item.items()} for item in v] for k, v in dl.items()}
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(dl))
    ov = dict(overrides, data_list_file_path=str(datalist), output_dir=str(tmp_path / "eval"),
              ckpt_dir=str(tmp_path / "models"), max_epochs=1, val_interval=1, batch_size=1, pretrained_checkpoint="")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    # "training" (the documented id) must reach multi_gpu_train.json's "run" through the merged config
    r = bu.run_bundle(bu.BUNDLES_DIR / "misfm_abdomen_ct_segmentation", "training",
                      ["train.json", "multi_gpu_train.json"], ov, tmp_path / "w",
                      launcher=[torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m"],
                      env={"OMP_NUM_THREADS": "1"})
    _ok(r)
    assert (tmp_path / "models" / "model.pt").is_file()
    # only rank 0 logs: one process's progress lines, and TensorBoard files from one process (the pid in the name)
    assert r.stdout.count("Epoch: 1/1, Iter: 1/") == 1, r.stdout[-3000:]
    events = list((tmp_path / "eval").rglob("events.out.tfevents.*"))
    assert events and len({e.name.rsplit(".", 2)[1] for e in events}) == 1, [e.name for e in events]


# ---------------------------------------------------------------------------------------------------- bad inputs


def _bad_run(abdomen, tmp_path, mutate) -> str:
    _, datalist, overrides, _ = abdomen
    dl = json.loads(datalist.read_text())
    mutate(dl, tmp_path)
    bad = tmp_path / "datalist.json"
    bad.write_text(json.dumps(dl))
    ov = dict(overrides, data_list_file_path=str(bad), output_dir=str(tmp_path / "eval"),
              ckpt_dir=str(tmp_path / "models"), pretrained_checkpoint="")
    r = bu.run_bundle(bu.BUNDLES_DIR / "misfm_abdomen_ct_segmentation", "run", ["train.json"], ov, tmp_path / "w")
    assert r.returncode != 0
    assert not (tmp_path / "eval").exists() and not (tmp_path / "models").exists(), "half-written outputs"
    assert "Epoch:" not in r.stdout, "a training step ran"
    return r.stdout + r.stderr


def test_bad_input_missing_file(abdomen, tmp_path):
    out = _bad_run(abdomen, tmp_path, lambda dl, _: dl["training"].append({"image": "nope.nii.gz", "label": "x.nii.gz"}))
    assert "nope.nii.gz" in out and "does not exist" in out


def test_bad_input_unreadable_image(abdomen, tmp_path):
    def mutate(dl, tmp):
        (tmp / "broken.nii.gz").write_bytes(b"this is not a nifti file")
        dl["training"].append({"image": str(tmp / "broken.nii.gz"), "label": str(tmp / "broken.nii.gz")})

    out = _bad_run(abdomen, tmp_path, mutate)
    assert "broken.nii.gz" in out and "cannot read" in out


def test_bad_input_label_out_of_range(abdomen, tmp_path):
    def mutate(dl, tmp):
        bu.make_case(tmp / "img.nii.gz", tmp / "lab.nii.gz", (24, 24, 12), 3, 1)
        lab = nib.load(str(tmp / "lab.nii.gz"))
        arr = np.asanyarray(lab.dataobj).copy()
        arr[0, 0, 0] = 20
        nib.save(nib.Nifti1Image(arr, lab.affine), str(tmp / "lab.nii.gz"))
        dl["validation"].append({"image": str(tmp / "img.nii.gz"), "label": str(tmp / "lab.nii.gz")})

    out = _bad_run(abdomen, tmp_path, mutate)
    assert "lab.nii.gz" in out and "[20]" in out and "0..13" in out


def test_bad_input_empty_datalist(abdomen, tmp_path):
    out = _bad_run(abdomen, tmp_path, lambda dl, _: dl.update(training=[]))
    assert "'training' datalist is empty" in out


# ---------------------------------------------------------------------------------------------------- distribution


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _venv_without_misfm(path: Path) -> Path:
    """A fresh virtual environment that sees this venv's third-party packages (torch, MONAI, ...) but not misfm.

    Its ``.pth`` lists our site-packages as a plain path entry: the ``.pth`` files inside it, among them the
    editable-install finder of misfm, are not processed, so misfm_* are not importable there.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, encoding="utf-8", errors="replace").stdout.strip()
    ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (Path(site) / "third_party.pth").write_text("\n".join(ours) + "\n")
    return python


def test_zip_distribution_runs_without_repo(abdomen, tmp_path):
    dist = tmp_path / "dist"
    zips = build.build(dist)
    assert sorted(z.name for z in zips) == sorted(f"{b}_v0.1.2.zip" for b in bu.ALL_BUNDLES)
    for z in zips:
        names = zipfile.ZipFile(z).namelist()
        bundle = z.name.split("_v")[0]
        assert f"{bundle}/configs/metadata.json" in names and f"{bundle}/{bundle}_lib/misfm_nets/pctnet.py" in names
        text = zipfile.ZipFile(z).read(f"{bundle}/{bundle}_lib/engines.py").decode()
        assert "from misfm_transforms" not in text and f"from {bundle}_lib.misfm_transforms" in text

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(dist))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        python = _venv_without_misfm(tmp_path / "venv")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        env.update(PYTHONNOUSERSITE="1", OMP_NUM_THREADS="2")
        work = tmp_path / "outside"
        work.mkdir()
        probe = subprocess.run([str(python), "-c", "import monai, torch, misfm_nets"], cwd=work, env=env,
                               capture_output=True, encoding="utf-8", errors="replace")
        assert probe.returncode != 0 and "No module named 'misfm_nets'" in probe.stderr, probe.stderr
        name = "misfm_abdomen_ct_segmentation"
        url = f"http://127.0.0.1:{server.server_address[1]}/{name}_v0.1.2.zip"
        r = subprocess.run([str(python), "-m", "monai.bundle", "download", "--name", name, "--version", "0.1.2",
                            "--url", url, "--bundle_dir", str(work / "bundles")], cwd=work, env=env,
                           capture_output=True, encoding="utf-8", errors="replace", timeout=120)
        _ok(r)
    finally:
        server.shutdown()
        server.server_close()
    bundle_dir = work / "bundles" / name
    assert (bundle_dir / f"{name}_lib" / "__init__.py").is_file()
    (bundle_dir / "models").mkdir()
    shutil.copy(abdomen[0] / "models" / "model.pt", bundle_dir / "models" / "model.pt")
    root, datalist, overrides, _ = abdomen
    args = dict(_infer_overrides(overrides), ckpt_dir=str(bundle_dir / "models"), output_dir=str(work / "pred"),
                bundle_root=str(bundle_dir), config_file=str(bundle_dir / "configs" / "inference.json"),
                meta_file=str(bundle_dir / "configs" / "metadata.json"),
                logging_file=str(bundle_dir / "configs" / "logging.conf"))
    (work / "args.json").write_text(json.dumps(args))
    r = subprocess.run([str(python), "-m", "monai.bundle", "run", "--args_file", str(work / "args.json")], cwd=work,
                       env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    _ok(r)
    assert len(list((work / "pred").glob("*_seg.nii.gz"))) == 2
