"""Crash safety and determinism of the bundles' training, with REAL processes killed by SIGKILL.

* ``checkpoint.pt`` (full training state, every ``checkpoint_interval`` iterations) and ``model.pt`` are written
  atomically (temp file + fsync + ``os.replace``): whatever moment the process dies, the file on disk loads with
  ``torch.load(weights_only=True)`` and is complete.
* Re-running the same command resumes from ``checkpoint.pt`` and, on CPU with the bundle's fixed seed, ends with
  exactly the weights (and optimizer state, and per-iteration losses) of an uninterrupted run.
* Same seed + same data -> the same Volume Fusion samples and the same training losses, bit for bit.

Tiny PCT-Net, ``num_workers=0``, ``OMP_NUM_THREADS=1`` (see tests/bundle_utils.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from misfm_bundle_glue import resume

import bundle_utils as bu

pytestmark = pytest.mark.slow  # runs real bundles / processes: minutes

THORAX = "misfm_thorax_ct_segmentation"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CKPT_KEYS = {"network", "optimizer", "lr_scheduler", "trainer", "rng", "iterator_rng", "batches_drawn", "evaluator",
             "metric_savers", "format"}


def _dataset(root: Path, bundle: str) -> Path:
    if bundle == bu.PRETRAINING:
        dl = bu.make_dataset(root, 5, n_train=3, n_val=1, n_test=0, labels=False)
        # one training volume smaller than the roi (32, 32, 16): padded by the preprocessing
        bu.make_case(root / "data" / "small.nii.gz", None, (24, 24, 12), 5, seed=7)
        d = json.loads(dl.read_text())
        d["training"].append({"image": "small.nii.gz"})
        dl.write_text(json.dumps(d))
        return dl
    return bu.make_dataset(root, bu.num_classes(bundle), n_train=2, n_val=1, n_test=0)


def _overrides(root: Path, datalist: Path, bundle: str) -> dict:
    tiny = bu.TINY_PRETRAIN if bundle == bu.PRETRAINING else bu.TINY_TRAIN
    # pretraining: 4 volumes / batch 2 = 2 batches per pass, epoch_length 3 -> epochs straddle loader passes
    ov = dict(tiny, max_epochs=2, epoch_length=3 if bundle == bu.PRETRAINING else None, checkpoint_interval=1,
              val_interval=1, batch_size=2 if bundle == bu.PRETRAINING else 1)
    ov.update(data_list_file_path=str(datalist), dataset_dir=str(datalist.parent / "data"),
              output_dir=str(root / "eval"), ckpt_dir=str(root / "models"))
    return ov


def _popen(bundle: str, overrides: dict, workdir: Path, env: dict | None = None) -> subprocess.Popen:
    """The same command line as ``bu.run_bundle``, as a Popen (stdout and stderr merged, line by line)."""
    bundle_dir = bu.BUNDLES_DIR / bundle
    args = {"meta_file": str(bundle_dir / "configs" / "metadata.json"),
            "config_file": [str(bundle_dir / "configs" / "train.json")],
            "logging_file": str(bundle_dir / "configs" / "logging.conf"), "bundle_root": str(bundle_dir)}
    args.update(overrides)
    workdir.mkdir(parents=True, exist_ok=True)
    args_file = workdir / "args_training.json"
    args_file.write_text(json.dumps(args))
    full_env = dict(os.environ, PYTHONUNBUFFERED="1",
                    PYTHONPATH=os.pathsep.join([str(bu.REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    full_env.update(ENV)
    full_env.update(env or {})
    return subprocess.Popen([bu.PYTHON, "-m", "monai.bundle", "run", "training", "--args_file", str(args_file)],
                            cwd=str(workdir), env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            encoding="utf-8", errors="replace")


def _run(bundle, overrides, workdir, env=None) -> str:
    p = _popen(bundle, overrides, workdir, env)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-4000:]
    return out


def kill_on_marker(p: subprocess.Popen, marker: str, kill, timeout: float) -> str:
    """Read ``p``'s output until a line contains ``marker``, then ``kill(p)`` (a SIGKILL); return what it printed."""
    lines, deadline = [], time.time() + timeout
    try:
        for line in p.stdout:
            lines.append(line)
            if marker in line:
                kill(p)
                break
            assert time.time() < deadline, "timed out waiting for " + marker
        else:
            pytest.fail(f"the run ended before {marker!r}:\n{''.join(lines)[-4000:]}")
    finally:
        if p.poll() is None:
            kill(p)
        p.wait(timeout=60)
        p.stdout.close()
    assert p.returncode == -signal.SIGKILL
    return "".join(lines)


def _run_and_kill(bundle, overrides, workdir, marker: str, env=None, timeout=120) -> str:
    """Start training, SIGKILL it as soon as a stdout line contains ``marker``; return what it printed."""
    return kill_on_marker(_popen(bundle, overrides, workdir, env), marker, lambda p: p.kill(), timeout)


def _load_ckpt(path: Path) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # must always succeed
    assert CKPT_KEYS <= set(ckpt), set(ckpt)
    return ckpt


def _losses_by_step(log_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for ev in sorted(Path(log_dir).rglob("events.out.tfevents.*"), key=os.path.getmtime):
        acc = EventAccumulator(str(ev))
        acc.Reload()
        if "train_loss" in acc.Tags().get("scalars", []):
            out.update({e.step: e.value for e in acc.Scalars("train_loss")})
    return out


def _assert_same_state(a: dict, b: dict) -> None:
    for key in ("network",):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for pid, sa in a["optimizer"]["state"].items():
        for k, v in sa.items():
            assert torch.equal(torch.as_tensor(v),
                               torch.as_tensor(b["optimizer"]["state"][pid][k])), f"optimizer {pid}.{k}"
    assert a["lr_scheduler"] == b["lr_scheduler"]
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, one per bundle: (datalist, final checkpoint, losses by step, stdout)."""
    out = {}

    def get(bundle):
        if bundle not in out:
            root = tmp_path_factory.mktemp(f"ref_{bundle}")
            dl = _dataset(root / "ds", bundle)
            stdout = _run(bundle, _overrides(root, dl, bundle), root / "w")
            out[bundle] = (dl, _load_ckpt(root / "models" / "checkpoint.pt"), _losses_by_step(root / "eval"), stdout)
        return out[bundle]

    return get


# ------------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("bundle,kill_at", [(bu.PRETRAINING, 4), (THORAX, 3)])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(reference, bundle, kill_at, tmp_path):
    dl, ref_ckpt, ref_losses, ref_out = reference(bundle)
    ov = _overrides(tmp_path, dl, bundle)
    assert "no training checkpoint at" in ref_out
    _run_and_kill(bundle, ov, tmp_path / "w", f"(iteration {kill_at}, epoch 2)")
    ckpt = _load_ckpt(tmp_path / "models" / "checkpoint.pt")
    it = ckpt["trainer"]["iteration"]
    assert it >= kill_at and it % ckpt["trainer"]["epoch_length"] != 0, "not a mid-epoch checkpoint"
    out = _run(bundle, ov, tmp_path / "w")
    assert f"resuming from iteration {it}" in out
    assert "Epoch: 1/2" not in out, "the resumed run trained epoch 1 again"
    final = _load_ckpt(tmp_path / "models" / "checkpoint.pt")
    _assert_same_state(final, ref_ckpt)
    assert _losses_by_step(tmp_path / "eval") == ref_losses  # every iteration's loss, bit for bit (float32)
    assert (tmp_path / "models" / "model.pt").is_file()


def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(reference, tmp_path):
    bundle = bu.PRETRAINING
    dl, ref_ckpt, ref_losses, _ = reference(bundle)
    ov = _overrides(tmp_path, dl, bundle)
    # the write of iteration 5 stalls between the complete temporary file and the rename; kill it there
    printed = _run_and_kill(bundle, ov, tmp_path / "w", "temporary file of checkpoint.pt complete (iteration 5)",
                            env={resume.SLOW_WRITE_ENV: "120@5"})
    assert "training checkpoint saved" in printed and "(iteration 4, epoch 2)" in printed
    models = tmp_path / "models"
    temps = [p for p in models.iterdir() if p.name.startswith(".tmp-checkpoint.pt.")]
    assert len(temps) == 1, list(models.iterdir())
    ckpt = _load_ckpt(models / "checkpoint.pt")
    assert ckpt["trainer"]["iteration"] == 4  # the previous, complete checkpoint
    torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    out = _run(bundle, ov, tmp_path / "w")
    assert "temporary file of an interrupted checkpoint write" in out and "resuming from iteration 4" in out
    assert not [p for p in models.iterdir() if p.name.startswith(".tmp-")]
    _assert_same_state(_load_ckpt(models / "checkpoint.pt"), ref_ckpt)
    assert _losses_by_step(tmp_path / "eval") == ref_losses


def test_rerun_after_completion_and_resume_false(reference, tmp_path):
    """A finished run re-run does nothing; resume=false starts over (and, being deterministic, ends the same)."""
    bundle = bu.PRETRAINING
    dl, ref_ckpt, _, _ = reference(bundle)
    ov = _overrides(tmp_path, dl, bundle)
    ov["max_epochs"] = 1
    _run(bundle, ov, tmp_path / "w")
    out = _run(bundle, ov, tmp_path / "w")
    assert "training is complete" in out and "Epoch: 1/1" not in out
    ov["max_epochs"] = 2  # extend: continues from iteration 3
    out = _run(bundle, ov, tmp_path / "w")
    assert "resuming from iteration 3" in out and "Epoch: 2/2, Iter: 1/3" in out and "Epoch: 1/2" not in out
    _assert_same_state(_load_ckpt(tmp_path / "models" / "checkpoint.pt"), ref_ckpt)


# ------------------------------------------------------------------------------------------------ atomic writes


class _Explodes:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_atomic_torch_save_failure_keeps_old_file(tmp_path):
    target = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3)}, target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        resume.atomic_torch_save({"w": torch.zeros(1000), "x": _Explodes()}, str(target))
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary left behind


def test_model_pt_saver_is_atomic_and_never_deletes_the_best_model(tmp_path):
    """MONAI's CheckpointSaver uses ignite DiskSaver(atomic=False) and, for the fixed ``model.pt``, removes the old
    file before writing the new one; the bundles use AtomicCheckpointSaver instead."""
    from monai.handlers import CheckpointSaver

    net = torch.nn.Linear(2, 2)
    stock = CheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True, key_metric_filename="model.pt")
    assert stock._key_metric_checkpoint.save_handler._atomic is False  # the reason for the wrapper
    saver = resume.AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True,
                                         key_metric_filename="model.pt")
    handler = saver._key_metric_checkpoint.save_handler
    handler({"w": torch.ones(2)}, "model_key_metric=0.5.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    handler.remove("model_key_metric=0.5.pt")  # ignite calls this before saving a better model
    assert (tmp_path / "model.pt").is_file()
    before = (tmp_path / "model.pt").read_bytes()
    with pytest.raises(RuntimeError):
        handler({"w": _Explodes()}, "model_key_metric=0.9.pt")
    assert (tmp_path / "model.pt").read_bytes() == before


# ------------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_losses_bit_for_bit(reference, tmp_path):
    """Two processes, same seed and data: identical per-iteration losses (float32, exact) and final weights."""
    bundle = bu.PRETRAINING
    dl, ref_ckpt, ref_losses, _ = reference(bundle)
    ov = _overrides(tmp_path, dl, bundle)
    ov["checkpoint_interval"] = 100  # only the final checkpoint
    _run(bundle, ov, tmp_path / "w")
    losses = _losses_by_step(tmp_path / "eval")
    assert len(losses) == 6 and losses == ref_losses
    _assert_same_state(_load_ckpt(tmp_path / "models" / "checkpoint.pt"), ref_ckpt)


@pytest.mark.parametrize("fusion_version", ["v1", "v2"])
def test_same_seed_same_volume_fusion_samples(reference, fusion_version):
    """The bundle's training dataloader (crops + Volume Fusion) yields identical batches when built twice."""
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    dl = reference(bu.PRETRAINING)[0]

    def batches():
        parser = ConfigParser()
        parser.read_config(str(bu.BUNDLES_DIR / bu.PRETRAINING / "configs" / "train.json"))
        ov = _overrides(dl.parent, dl, bu.PRETRAINING)
        parser.update({"bundle_root": str(bu.BUNDLES_DIR / bu.PRETRAINING), **ov, "fusion_version": fusion_version})
        set_determinism(seed=0)
        loader = parser.get_parsed_content("train#dataloader")
        it = iter(loader)
        return [next(it) for _ in range(2)]

    a, b = batches(), batches()
    for x, y in zip(a, b):
        assert torch.equal(torch.as_tensor(x["image"]), torch.as_tensor(y["image"]))
        assert torch.equal(torch.as_tensor(x["label"]), torch.as_tensor(y["label"]))
        assert int(torch.as_tensor(x["label"]).max()) > 0  # something was fused
    set_determinism(seed=None)
