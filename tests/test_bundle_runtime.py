"""How the bundles run where users run them: several nodes and ranks, command-line switches, resume refusals,
output folders and names, devices, determinism. Real ``torchrun`` processes (gloo, loopback "nodes") and real
``python -m monai.bundle run`` subprocesses; tiny PCT-Net on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import misfm_bundle_glue as glue
from misfm_bundle_glue import resume

import bundle_utils as bu

pytestmark = pytest.mark.slow  # runs real bundles / processes: minutes

THORAX = "misfm_thorax_ct_segmentation"
TORCHRUN = str(Path(sys.executable).parent / "torchrun")



def _output(r: subprocess.CompletedProcess) -> str:
    return r.stdout + r.stderr




# ------------------------------------------------------------------------------------------------ flags


@pytest.mark.parametrize("value,expected", [(True, True), (False, False), (0, False), (1, True), ("false", False),
                                            ("False", False), ("FALSE", False), ("0", False), ("no", False),
                                            ("true", True), ("True", True), ("1", True), ("yes", True)])
def test_flag_accepts_what_the_docs_write(value, expected):
    assert glue.flag(value, "resume") is expected


@pytest.mark.parametrize("value", ["maybe", "", 2, 0.5, None, "f"])
def test_flag_rejects_anything_else_naming_the_key(value):
    with pytest.raises(ValueError, match="amp must be true or false"):
        glue.flag(value, "amp")


@pytest.fixture(scope="module")
def thorax_run(tmp_path_factory):
    """One finished tiny thorax training run (checkpoint every iteration) and its datalist."""
    root = tmp_path_factory.mktemp("thorax")
    datalist = bu.make_dataset(root / "ds", bu.num_classes(THORAX), n_train=2, n_val=1, n_test=1)
    ov = dict(bu.TINY_TRAIN, **bu.run_paths(root, datalist), max_epochs=1, checkpoint_interval=1)
    bu.ok(bu.run_bundle(bu.BUNDLES_DIR / THORAX, "training", ["train.json"], ov, root / "w"))
    return root, datalist, ov


def _rerun(thorax_run, tmp_path, extra_args=None, **changes) -> subprocess.CompletedProcess:
    """The thorax run again, into a copy of its ckpt_dir (so the fixture stays intact)."""
    root, _, ov = thorax_run
    ckpt = tmp_path / "models"
    shutil.copytree(root / "models", ckpt)
    args = dict(ov, ckpt_dir=str(ckpt), output_dir=str(tmp_path / "eval"))
    args.update(changes)
    return bu.run_bundle(bu.BUNDLES_DIR / THORAX, "training", ["train.json"], args, tmp_path / "w",
                         extra_args=extra_args)


def test_resume_false_on_the_command_line_starts_over(thorax_run, tmp_path):
    # typed on the command line, `--resume false --amp false` reach the config as the strings 'false'
    r = _rerun(thorax_run, tmp_path, extra_args=["--resume", "false", "--amp", "false", "--max_epochs", "2"])
    out = bu.ok(r)
    assert "resume=false: training from the start" in out and "resuming from iteration 1 (" not in out
    assert "Epoch: 1/2, Iter: 1/" in out  # epoch 1 trained again


def test_a_typo_in_a_switch_is_an_error_not_true(thorax_run, tmp_path):
    r = _rerun(thorax_run, tmp_path, extra_args=["--resume", "flase"])
    assert r.returncode != 0 and "resume must be true or false" in _output(r)


def test_resume_refuses_a_changed_datalist(thorax_run, tmp_path):
    root, datalist, _ = thorax_run
    content = json.loads(datalist.read_text())
    content["training"] = content["training"][:1]
    changed = tmp_path / "datalist.json"
    changed.write_text(json.dumps({k: [{f: str(datalist.parent / "data" / p) for f, p in e.items()} for e in v]
                                   for k, v in content.items()}))
    r = _rerun(thorax_run, tmp_path, data_list_file_path=str(changed), max_epochs=2)
    out = _output(r)
    assert r.returncode != 0 and "another datalist" in out and "--resume False" in out, out[-3000:]
    assert "Epoch:" not in r.stdout


def test_resume_refuses_another_bundles_checkpoint(thorax_run, tmp_path):
    root, datalist, ov = thorax_run
    ckpt = tmp_path / "models"
    shutil.copytree(root / "models", ckpt)
    n = bu.num_classes("misfm_abdomen_ct_segmentation")
    other = bu.make_dataset(tmp_path / "ds", n, n_train=2, n_val=1, n_test=0)
    args = dict(ov, **dict(bu.run_paths(tmp_path, other), ckpt_dir=str(ckpt)), max_epochs=2)
    r = bu.run_bundle(bu.BUNDLES_DIR / "misfm_abdomen_ct_segmentation", "training", ["train.json"], args,
                      tmp_path / "w")
    out = _output(r)
    assert r.returncode != 0 and "another bundle" in out, out[-3000:]
    assert len(out) < 40000  # a message, not PyTorch's list of every mismatching entry


def test_resume_with_other_widths_is_a_short_clear_error(thorax_run, tmp_path):
    r = _rerun(thorax_run, tmp_path, feature_channels=[8, 8, 16, 32, 64], max_epochs=2)
    out = _output(r)
    assert r.returncode != 0 and "does not fit this run's network" in out and "feature_channels" in out, out[-3000:]
    assert "entries of another shape" in out
    assert out.count("size mismatch") == 0  # PyTorch's dump (hundreds of lines) is summarised


def test_model_pt_without_checkpoint_is_not_replaced_silently(thorax_run, tmp_path):
    root, datalist, ov = thorax_run
    ckpt = tmp_path / "models"
    ckpt.mkdir()
    shutil.copy(root / "models" / "model.pt", ckpt / "model.pt")
    before = (ckpt / "model.pt").read_bytes()
    r = bu.run_bundle(bu.BUNDLES_DIR / THORAX, "training", ["train.json"], dict(ov, ckpt_dir=str(ckpt)), tmp_path / "w")
    out = _output(r)
    assert r.returncode != 0 and "holds a model.pt of an earlier run" in out and "--resume False" in out
    assert (ckpt / "model.pt").read_bytes() == before and "Epoch:" not in r.stdout


def test_check_output_folders(tmp_path):
    glue.check_output_folders(str(tmp_path / "new" / "models"), str(tmp_path / "new" / "eval"))
    assert not (tmp_path / "new").exists()  # nothing is created by the check
    with pytest.raises(ValueError, match="is not writable"):  # a read-only file system, even for root
        glue.check_output_folders("/proc/misfm_test_models", str(tmp_path / "eval"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        glue.check_output_folders(str(tmp_path / "file" / "models"), str(tmp_path / "eval"))
    if os.geteuid() != 0:  # permissions do not stop root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(ValueError, match="ckpt_dir .* is not writable"):
            glue.check_output_folders(str(locked), str(tmp_path / "eval"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_cuda_device_on_a_cpu_machine_is_a_clear_error(thorax_run, tmp_path):
    r = _rerun(thorax_run, tmp_path, extra_args=["--device", "cuda"], resume=False)
    out = _output(r)
    assert r.returncode != 0 and "no usable CUDA GPU; pass --device cpu" in out, out[-3000:]
    assert "Epoch:" not in r.stdout


# ------------------------------------------------------------------------------------------------ outputs


def test_inputs_of_the_same_name_get_outputs_of_their_own(thorax_run, tmp_path):
    root, datalist, ov = thorax_run
    src = datalist.parent / "data" / json.loads(datalist.read_text())["testing"][0]["image"]
    for patient in ("p1", "p2"):
        (tmp_path / "in" / patient).mkdir(parents=True)
        shutil.copy(src, tmp_path / "in" / patient / "ct.nii.gz")
    listing = tmp_path / "testing.json"
    listing.write_text(json.dumps({"testing": [{"image": "p1/ct.nii.gz"}, {"image": "p2/ct.nii.gz"}]}))
    keep = {k: ov[k] for k in ("feature_channels", "num_heads", "roi_size", "num_workers", "amp", "ckpt_dir")}
    args = dict(keep, data_list_file_path=str(listing), dataset_dir=str(tmp_path / "in"),
                output_dir=str(tmp_path / "pred"))
    bu.ok(bu.run_bundle(bu.BUNDLES_DIR / THORAX, "run", ["inference.json"], args, tmp_path / "w"))
    written = sorted(p.relative_to(tmp_path / "pred").as_posix() for p in (tmp_path / "pred").rglob("*.nii.gz"))
    assert written == ["p1/ct_seg.nii.gz", "p2/ct_seg.nii.gz"]


def test_output_root_refuses_outputs_that_would_collide(tmp_path):
    same = [{"image": str(tmp_path / "a" / "ct.nii.gz")}, {"image": str(tmp_path / "a" / "ct.nii")}]
    with pytest.raises(ValueError, match="would write the same output"):
        glue.output_root(same)
    apart = [{"image": str(tmp_path / "a" / "x" / "ct.nii.gz")}, {"image": str(tmp_path / "a" / "y" / "ct.nii.gz")}]
    assert glue.output_root(apart) == str(tmp_path / "a")


def test_inference_refuses_a_model_with_nan_weights(thorax_run, tmp_path):
    root, datalist, ov = thorax_run
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 5)
    state[name][0].fill_(float("nan"))
    (tmp_path / "models").mkdir()
    torch.save(state, tmp_path / "models" / "model.pt")
    keep = {k: ov[k] for k in ("feature_channels", "num_heads", "roi_size", "num_workers", "amp",
                               "data_list_file_path", "dataset_dir")}
    r = bu.run_bundle(bu.BUNDLES_DIR / THORAX, "run", ["inference.json"],
                      dict(keep, ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "pred")), tmp_path / "w")
    out = _output(r)
    assert r.returncode != 0 and "NaN/Inf weights" in out and name in out, out[-3000:]
    assert not list((tmp_path / "pred").rglob("*.nii.gz"))


def test_hd95_is_in_millimetres():
    """Two boxes 4 voxels apart along z at 2.5 mm spacing: HD95 = 10 mm (MONAI's handler alone says 4)."""
    from monai.data import MetaTensor

    pred = torch.zeros(2, 12, 12, 12)
    label = torch.zeros(2, 12, 12, 12)
    pred[1, 4:8, 4:8, 2:6] = 1
    label[1, 4:8, 4:8, 6:10] = 1
    pred[0], label[0] = 1 - pred[1], 1 - label[1]
    affine = torch.diag(torch.tensor([1.0, 1.0, 2.5, 1.0]))
    handler = glue.HausdorffDistanceMM(include_background=False, percentile=95, save_details=False)
    handler.reset()
    handler.update(([MetaTensor(pred, affine=affine)], [MetaTensor(label, affine=affine)]))
    assert handler.compute() == pytest.approx(10.0)


# ------------------------------------------------------------------------------------------------ ranks


def _same_volume_datalist(root: Path, n: int, labels: bool) -> Path:
    """n training entries that are copies of one volume: what differs between ranks is then only randomness."""
    dl_path = bu.make_dataset(root, 5, n_train=n, n_val=1, n_test=0, labels=labels)
    content = json.loads(dl_path.read_text())
    data, first = root / "data", content["training"][0]
    for item in content["training"][1:]:
        for key in item:
            shutil.copyfile(data / first[key], data / item[key])
    return dl_path


def _probe(bundle: str, configs: list, overrides: dict, out: Path) -> list[dict]:
    """The README's multi-node launch (c10d rendezvous), as two one-process "nodes" on loopback."""
    out.mkdir(parents=True)
    port = bu.free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("LOCAL_RANK", None)
    nodes = [subprocess.Popen([TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "misfm",
                               str(Path(__file__).parent / "ddp_probe.py"), str(bu.BUNDLES_DIR / bundle), str(out),
                               json.dumps(overrides), *configs], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, encoding="utf-8", errors="replace") for node in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    for p, log in zip(nodes, logs):
        assert p.returncode == 0, log[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def pretraining_probe(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    dl = _same_volume_datalist(root / "ds", 4, labels=False)
    ov = dict(bu.TINY_PRETRAIN, **bu.run_paths(root, dl), batch_size=2)
    configs = ["train.json", "multi_gpu_train.json"]
    return [_probe(bu.PRETRAINING, configs, ov, root / f"run{i}") for i in (0, 1)]


def test_multi_node_ranks_pick_the_gpu_of_their_local_rank(pretraining_probe):
    first, _ = pretraining_probe
    assert [(r["rank"], r["local_rank"]) for r in first] == [(0, 0), (1, 0)]  # RANK != LOCAL_RANK on node 2
    for r in first:
        assert r["device_with_cuda"] == "cuda:0"  # not cuda:<global rank>
        assert r["eval_device_with_cuda"] == r["eval_map_location_with_cuda"] == "cuda:0"


def test_each_rank_draws_its_own_random_stream_reproducibly(pretraining_probe):
    first, second = pretraining_probe
    for key in ("image", "label", "dropout"):  # crops, Volume Fusion labels, dropout masks
        assert first[0][key] != first[1][key], key
    assert first == second  # the same seed reruns the same draws on every rank


def test_evaluation_sampler_shards_or_replicates():
    shards = [list(glue.EvaluationSampler(range(5), num_replicas=2, rank_=r)) for r in (0, 1)]
    assert shards == [[0, 2, 4], [1, 3]]  # disjoint, no padding: no case counts twice
    assert [list(glue.EvaluationSampler(range(1), num_replicas=2, rank_=r)) for r in (0, 1)] == [[0], [0]]


# ------------------------------------------------------------------------------------------------ determinism


def test_setup_process_fast_by_default_exact_on_request(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", torch.backends.cudnn.deterministic)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        assert glue.setup_process(7, deterministic="false") == 7
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        assert not torch.are_deterministic_algorithms_enabled()
        a = torch.rand(3)
        glue.setup_process(7, deterministic=True)
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.equal(torch.rand(3), a)  # the same seed
    finally:
        torch.use_deterministic_algorithms(before)


# ------------------------------------------------------------------------------------------------ fusion batches


def test_device_fusion_with_fewer_volumes_than_the_batch_trains_nothing_is_an_error(tmp_path):
    dl = bu.make_dataset(tmp_path / "ds", 5, n_train=3, n_val=1, n_test=0, labels=False)
    ov = dict(bu.TINY_PRETRAIN, **bu.run_paths(tmp_path, dl), batch_size=4)
    r = bu.run_bundle(bu.BUNDLES_DIR / bu.PRETRAINING, "training", ["train.json", "fuse_on_device.json"], ov,
                      tmp_path / "w")
    out = _output(r)
    assert r.returncode != 0 and "yields no batch" in out and "3 volume(s)" in out, out[-3000:]
    assert not (tmp_path / "models").exists()


def test_capture_rng_keeps_only_this_ranks_cuda_state():
    states = resume.capture_rng()
    assert "cuda" not in states or states["cuda"].ndim == 1  # one generator state, not one per visible GPU


def test_startup_reads_no_image(tmp_path):
    """The checks before the first step stat the files; the voxels are read where the volumes are loaded."""
    dl = bu.make_dataset(tmp_path / "ds", 5, n_train=3, n_val=0, n_test=0, labels=False)
    entries = glue.load_datalist(str(dl), "training", str(dl.parent / "data"))
    for entry in entries:  # corrupt every image: the structural check must not notice, the loader must
        Path(entry["image"]).write_bytes(b"not an image")
    assert glue.check_datalist(entries, "training", keys=["image"]) == 3
    with pytest.raises(ValueError, match="cannot read image file"):
        glue.LoadCheckedImaged(["image"], label_key=None)(entries[0])


# ------------------------------------------------------------------------------------------------ tracking


def test_mlflow_tracking_beside_tensorboard(thorax_run, tmp_path):
    """MONAI's own experiment tracking (`--tracking mlflow`: its MLFlowHandler on the trainer and the validator),
    into a local store under output_dir; TensorBoard keeps logging."""
    mlflow = pytest.importorskip("mlflow", reason="the [mlflow] extra is not installed")
    root, datalist, ov = thorax_run
    args = dict(ov, ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "eval"))
    bu.ok(bu.run_bundle(bu.BUNDLES_DIR / THORAX, "training", ["train.json"], args, tmp_path / "w",
                      extra_args=["--tracking", "mlflow", "--experiment_name", "misfm_thorax"]))
    store = tmp_path / "eval" / "mlruns.db"
    assert store.is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("misfm_thorax")
    runs = client.search_runs([experiment.experiment_id])
    metrics = {k for run in runs for k in run.data.metrics}
    assert {"train_loss", "val_mean_dice"} <= metrics, metrics
    losses = [m.value for run in runs for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert losses and all(v == v for v in losses)  # one per iteration, finite
    assert bu.read_scalars(tmp_path / "eval", "train_loss")  # TensorBoard too
