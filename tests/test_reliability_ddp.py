"""Reliability under DDP (torchrun, gloo on CPU, 2 ranks): SIGKILL + exact resume, data sharding, 2-rank vs 1-rank.

* The whole torchrun process group is SIGKILLed mid-epoch after a checkpoint was written; the same command run again
  resumes on EVERY rank from rank 0's ``checkpoint.pt`` (which holds each rank's random states) and ends with exactly
  the weights, optimizer state and per-iteration losses of an uninterrupted 2-rank run. Rank 1 creates no file in
  ``ckpt_dir`` (audited by a ``sitecustomize`` hook on ``os.open``/``os.replace``) and logs no iteration lines.
* The ``DistributedSampler`` that multi_gpu_train.json builds gives each rank a disjoint shard of the datalist.
* 2 ranks x batch 1 == 1 rank x batch 2 for the first steps, where BatchNorm sees the same data on every rank.

Tiny PCT-Net, ``num_workers=0``, ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bundle_utils as bu
import test_reliability as tr  # checkpoint / TensorBoard helpers

pytestmark = pytest.mark.slow  # runs real bundles / processes: minutes

THORAX = "misfm_thorax_ct_segmentation"
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
AUDIT_ENV = "MISFM_TEST_WRITE_AUDIT"
SITECUSTOMIZE = f'''
import os
_dir = os.environ.get("{AUDIT_ENV}")
if _dir:
    _log = os.path.join(_dir, "rank%s.txt" % os.environ.get("RANK", "x"))
    _open, _replace = os.open, os.replace

    def _note(path):
        with open(_log, "a") as f:
            f.write(os.path.abspath(os.fspath(path)) + "\\n")

    def _audited_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and not isinstance(path, int):
            _note(path)
        return _open(path, flags, *args, **kwargs)

    def _audited_replace(src, dst, *args, **kwargs):
        _note(dst)
        return _replace(src, dst, *args, **kwargs)

    os.open, os.replace = _audited_open, _audited_replace
'''



def _datalist(root: Path, n_train: int = 4, same_case: bool = False) -> Path:
    dl_path = bu.make_dataset(root, bu.num_classes(THORAX), n_train=n_train, n_val=2, n_test=0)  # 1 val case/rank
    if same_case:  # every training case a copy of the first one (a datalist may not repeat a file)
        dl = json.loads(dl_path.read_text())
        data, first = root / "data", dl["training"][0]
        for item in dl["training"][1:]:
            for key in ("image", "label"):
                shutil.copyfile(data / first[key], data / item[key])
    return dl_path


def _overrides(root: Path, datalist: Path, **kw) -> dict:
    ov = dict(bu.TINY_TRAIN, max_epochs=2, val_interval=1, checkpoint_interval=1, batch_size=1,
              data_list_file_path=str(datalist), dataset_dir=str(datalist.parent / "data"),
              output_dir=str(root / "eval"), ckpt_dir=str(root / "models"))
    ov.update(kw)
    return ov


def _popen(overrides: dict, workdir: Path, nproc: int = 2, extra_env: dict | None = None
           ) -> tuple[subprocess.Popen, Path, Path]:
    """torchrun of train.json + multi_gpu_train.json in its own process group; per-rank logs and write audits."""
    bundle_dir = bu.BUNDLES_DIR / THORAX
    args = {"meta_file": str(bundle_dir / "configs" / "metadata.json"),
            "config_file": [str(bundle_dir / "configs" / c) for c in ("train.json", "multi_gpu_train.json")],
            "logging_file": str(bundle_dir / "configs" / "logging.conf"), "bundle_root": str(bundle_dir)}
    args.update(overrides)
    workdir.mkdir(parents=True, exist_ok=True)
    n = len(list(workdir.glob("args_*")))
    (workdir / f"args_{n}.json").write_text(json.dumps(args))
    logs, audit, hook = workdir / f"logs_{n}", workdir / f"audit_{n}", workdir / "hook"
    audit.mkdir()
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **{AUDIT_ENV: str(audit)},
               PYTHONPATH=os.pathsep.join([str(hook), str(bu.REPO),
                                           os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update(extra_env or {})
    cmd = [TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(bu.free_port()), "--log-dir", str(logs),
           "--tee", "3", "-m", "monai.bundle", "run", "training", "--args_file", str(workdir / f"args_{n}.json")]
    p = subprocess.Popen(cmd, cwd=str(workdir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         encoding="utf-8", errors="replace",
                         start_new_session=True)
    return p, logs, audit


def _rank_log(logs: Path, rank: int) -> str:
    files = sorted(logs.rglob(f"attempt_*/{rank}/stdout.log")) + sorted(logs.rglob(f"attempt_*/{rank}/stderr.log"))
    assert files, f"no log of rank {rank} under {logs}"
    return "".join(f.read_text() for f in files)


def _run(overrides, workdir, nproc=2) -> tuple[str, Path, Path]:
    p, logs, audit = _popen(overrides, workdir, nproc)
    try:
        out, _ = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 0, out[-5000:]
    return out, logs, audit


def _run_and_kill(overrides, workdir, marker: str, extra_env=None, timeout=180) -> str:
    """SIGKILL torchrun AND its workers (the whole process group) when a line contains ``marker``."""
    p, _, _ = _popen(overrides, workdir, extra_env=extra_env)
    return tr.kill_on_marker(p, marker, lambda q: os.killpg(q.pid, signal.SIGKILL), timeout)


def _assert_rank1_quiet(logs: Path, audit: Path, ckpt_dir: Path) -> str:
    log1 = _rank_log(logs, 1)
    assert "Epoch: " not in log1 and "Iter: " not in log1, log1[-3000:]
    assert "training checkpoint saved" not in log1
    written = (audit / "rank1.txt").read_text().split() if (audit / "rank1.txt").exists() else []
    assert not [w for w in written if w.startswith(str(ckpt_dir.resolve()))], written
    # ... while rank 0 did write there (the audit works)
    assert any(w.startswith(str(ckpt_dir.resolve())) for w in (audit / "rank0.txt").read_text().split())
    return log1


# ------------------------------------------------------------------------------------------------ resume


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _datalist(tmp_path_factory.mktemp("ddp_data"))


def test_ddp_sigkill_mid_epoch_then_resume_matches_uninterrupted(data, tmp_path):
    # 4 training cases / 2 ranks / batch 1 -> epoch_length 2; 2 epochs = 4 iterations; checkpoint every iteration
    ref_root, root = tmp_path / "ref", tmp_path / "run"
    _, ref_logs, ref_audit = _run(_overrides(ref_root, data), ref_root / "w")
    _assert_rank1_quiet(ref_logs, ref_audit, ref_root / "models")
    ref = tr._load_ckpt(ref_root / "models" / "checkpoint.pt")
    assert ref["world_size"] == 2 and len(ref["rank_rng"]) == 1
    assert ref["trainer"]["iteration"] == 4 and ref["trainer"]["epoch_length"] == 2
    ref_losses = tr._losses_by_step(ref_root / "eval")
    assert sorted(ref_losses) == [1, 2, 3, 4]

    ov = _overrides(root, data)
    # torchrun's --tee echoes the workers' lines late, so the workers are held at a known point: rank 0 stalls in
    # the write of iteration 4 (temporary file complete, before the rename), rank 1 waits for it; kill everything
    printed = _run_and_kill(ov, root / "w", "temporary file of checkpoint.pt complete (iteration 4)",
                            extra_env={tr.resume.SLOW_WRITE_ENV: "120@4"})
    assert "(iteration 3, epoch 2)" in printed
    ckpt = tr._load_ckpt(root / "models" / "checkpoint.pt")
    assert ckpt["trainer"]["iteration"] == 3  # mid-epoch 2 (epoch_length 2)
    assert [p.name for p in (root / "models").iterdir() if p.name.startswith(".tmp-checkpoint.pt.")]
    out, logs, audit = _run(ov, root / "w")
    log1 = _assert_rank1_quiet(logs, audit, root / "models")
    log0 = _rank_log(logs, 0)
    assert "[rank 0/2] resuming from iteration 3" in log0, log0[-3000:]
    # rank 1 logs warnings only (its resume is proven below: the final state equals the uninterrupted run's)
    assert "resuming from iteration" not in log1, log1[-3000:]
    assert "temporary file of an interrupted checkpoint write" in log0
    assert not [p for p in (root / "models").iterdir() if p.name.startswith(".tmp-")]
    assert "Epoch: 1/2" not in log0, "the resumed run trained epoch 1 again"
    assert "Epoch: 2/2, Iter: 2/2" in log0
    final = tr._load_ckpt(root / "models" / "checkpoint.pt")
    tr._assert_same_state(final, ref)  # bit for bit: fixed seeds, DistributedSampler.set_epoch, per-rank RNG
    assert tr._losses_by_step(root / "eval") == ref_losses
    assert (root / "models" / "model.pt").is_file()


# ------------------------------------------------------------------------------------------------ sharding


def _sampler_indices(datalist: Path, root: Path, rank: int, epoch: int) -> list[str]:
    from monai.bundle import ConfigParser
    from torch.utils.data import DistributedSampler

    cfg = bu.BUNDLES_DIR / THORAX / "configs"
    parser = ConfigParser()
    parser.read_config([str(cfg / "train.json"), str(cfg / "multi_gpu_train.json")])
    parser.update(dict(_overrides(root, datalist), bundle_root=str(bu.BUNDLES_DIR / THORAX),
                       **{"train#sampler#num_replicas": 2, "train#sampler#rank": rank}))
    loader = parser.get_parsed_content("train#dataloader")
    assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.num_replicas == 2
    loader.sampler.set_epoch(epoch)  # what MONAI's Workflow does at every EPOCH_STARTED
    return [os.path.basename(loader.dataset.data[i]["image"]) for i in loader.sampler]


@pytest.mark.parametrize("n_train", [4, 5])
def test_each_rank_gets_a_disjoint_shard(tmp_path, n_train, monkeypatch):
    monkeypatch.syspath_prepend(str(bu.BUNDLES_DIR / THORAX))  # as `python -m monai.bundle run` does: <bundle>_lib
    dl = _datalist(tmp_path / "ds", n_train=n_train)
    names = sorted(os.path.basename(d["image"]) for d in json.loads(dl.read_text())["training"])
    orders = []
    for epoch in (0, 1, 2, 3):
        shards = [_sampler_indices(dl, tmp_path, r, epoch) for r in (0, 1)]
        assert len(shards[0]) == len(shards[1]) == -(-n_train // 2)  # even_divisible: same length on every rank
        assert sorted(set(shards[0]) | set(shards[1])) == names  # together: the whole datalist
        if n_train % 2 == 0:
            assert not set(shards[0]) & set(shards[1]), shards
        else:  # padded with ONE case of the epoch's permutation so that both ranks step together
            assert len(set(shards[0]) & set(shards[1])) <= 1, shards
        orders.append(shards)
    assert any(o != orders[0] for o in orders[1:]), "the shards do not change with the epoch (set_epoch)"


# ------------------------------------------------------------------------------------------------ 2 vs 1 rank


def test_two_ranks_match_one_rank_with_the_same_global_batch(tmp_path):
    """BatchNorm normalises with the statistics of the batch it sees: per-rank (2 x 1 sample) differs from 1 x 2
    samples unless the samples are the same, and PyTorch's SyncBatchNorm does not run on CPU/gloo. So: every training
    case is the same volume, the crop is deterministic (centre), dropout/drop-path are off; then BN, the batch Dice and
    the cross-entropy see
    the same data in both runs and the only differences are float32 summation orders (gloo all-reduce, BN over
    2x the voxels)."""
    dl = _datalist(tmp_path / "ds", n_train=4, same_case=True)
    det = {"train#random_transforms": [
        {"_target_": "SpatialPadd", "keys": ["image", "label"], "spatial_size": "@roi_size", "mode": "constant"},
        {"_target_": "CenterSpatialCropd", "keys": ["image", "label"], "roi_size": "@roi_size"}],
        # dropout / drop-path masks are random per sample: the two runs draw them differently
        "network_def#dropout": [0.0] * 5, "network_def#drop_path": 0.0}
    results = {}
    for nproc, batch in ((2, 1), (1, 2)):
        root = tmp_path / f"n{nproc}"
        ov = _overrides(root, dl, max_epochs=1, batch_size=batch, checkpoint_interval=1, **det)
        _run(ov, root / "w", nproc=nproc)
        results[nproc] = (tr._load_ckpt(root / "models" / "checkpoint.pt"), tr._losses_by_step(root / "eval"))
    (c2, l2), (c1, l1) = results[2], results[1]
    assert c2["trainer"]["iteration"] == c1["trainer"]["iteration"] == 2
    assert sorted(l2) == sorted(l1) == [1, 2]
    for step in (1, 2):
        assert l2[step] == pytest.approx(l1[step], rel=1e-5, abs=1e-6), (step, l1, l2)
    # weights after 2 Adam steps (lr 0.003): an update is ~lr*sign(grad), a rounding-level gradient difference can
    # only change parameters whose gradient is ~0; bound the worst one below 2 steps and the mean at lr/30
    diffs = torch.cat([(c2["network"][k].float() - c1["network"][k].float()).abs().flatten()
                       for k in c1["network"] if c1["network"][k].is_floating_point() and "running_" not in k])
    # (BN running_var is updated with the UNBIASED variance, n/(n-1) over 1 vs 2 volumes of voxels: not compared)
    # measured: mean 3.2e-5
    assert diffs.max().item() < 2 * 0.003 and diffs.mean().item() < 1e-4, (diffs.max(), diffs.mean())
