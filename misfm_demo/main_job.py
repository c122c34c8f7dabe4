"""The MIS-FM story on real CT, end to end, through this project's bundles.

1. fetch real CT (:mod:`misfm_demo.fetch_data`);
2. pretrain PCT-Net by Volume Fusion on all volumes (bundle ``misfm_ct_pretraining``);
3. fine-tune the abdomen bundle from that checkpoint and from scratch, with the same steps, and evaluate both on a
   volume neither trained on (the DICOM series): the label-efficiency study of
   :mod:`misfm_demo.label_efficiency`, at the one labelled case this data has;
4. fine-tune the thorax bundle from the same checkpoint and segment the thorax case;
5. write NIfTI segmentations, PNG montages, a PNG of VF samples, the study's CSV, plot and summary, a short text
   summary and TensorBoard logs under one output folder.

``--preset cpu`` (default) is sized for ~15 minutes on 2 CPU cores (a small network, short schedules);
``--preset paper`` is the paper's network and patch (64x128x128, default widths) and longer schedules, for a
GPU; ``--preset smoke`` is the integration test's few-step version. The Dice values compare against
TotalSegmentator model outputs, not manual ground truth.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from .bundle_runner import BUNDLES_DIR, run_bundle
from .fetch_data import default_data_dir, fetch_all
from .label_efficiency import run_study

__all__ = ["Preset", "PRESETS", "main", "run_main_job"]


@dataclass(frozen=True)
class Preset:
    """Network size and schedule of one main-job run. Sizes are MONAI ``(x, y, z)``."""

    feature_channels: Sequence[int]
    num_heads: Sequence[int]
    roi_size: Sequence[int]
    pixdim: Sequence[float]
    pretrain_epochs: int
    finetune_epochs: int
    epoch_length: int
    batch_size: int
    num_workers: int
    study_seeds: int = 1
    amp: bool = False


PRESETS: Dict[str, Preset] = {
    # CPU presets load nothing in worker processes: volumes are cached once and worker threads would only
    # oversubscribe the cores the training step uses.
    "cpu": Preset((8, 16, 32, 64, 128), (2, 4, 8), (64, 64, 32), (3.0, 3.0, 3.0), 10, 6, 20, 2, 0),
    "paper": Preset((24, 48, 128, 256, 512), (4, 8, 16), (128, 128, 64), (1.5, 1.5, 2.5), 100, 100, 200, 2, 8,
                    study_seeds=3, amp=True),
    "smoke": Preset((4, 8, 16, 32, 64), (2, 4, 8), (32, 32, 16), (4.0, 4.0, 4.0), 2, 2, 2, 2, 0),
}


def _common_overrides(preset: Preset, work: Path) -> dict:
    return {
        "feature_channels": list(preset.feature_channels),
        "num_heads": list(preset.num_heads),
        "roi_size": list(preset.roi_size),
        "pixdim": list(preset.pixdim),
        "batch_size": preset.batch_size,
        "num_workers": preset.num_workers,
        "epoch_length": preset.epoch_length,
        "cache_rate": 1.0,
        "val_interval": 1,
        "ckpt_dir": str(work / "models"),
        "output_dir": str(work / "tensorboard"),
        "amp": preset.amp,
    }


def _write_testing_datalist(path: Path, images: List[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"testing": [{"image": str(Path(i).resolve())} for i in images]}, indent=2))
    return path


def _with_training_as_validation(datalist: Path, path: Path) -> Path:
    """The thorax source has one labelled case: validate on it too (a sanity check, said in the summary)."""
    content = json.loads(datalist.read_text(encoding="utf-8"))
    for split in ("training", "validation"):
        content[split] = [{k: str((datalist.parent / v).resolve()) if k in ("image", "label") else v
                           for k, v in entry.items()} for entry in content["training"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2))
    return path


def _labels(datalist: Path) -> Dict[int, str]:
    return {int(k): v for k, v in json.loads(datalist.read_text(encoding="utf-8"))["labels"].items()}


def _entries(datalist: Path, split: str) -> List[dict]:
    from monai.data import load_decathlon_datalist

    return load_decathlon_datalist(str(datalist), True, split)


def _load_ras(path: str | Path):
    """Volume as ``(x, y, z)`` numpy in RAS orientation, and its spacing."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation

    volume = Compose([LoadImage(image_only=True), EnsureChannelFirst(), Orientation(axcodes="RAS")])(str(path))
    return volume[0].numpy(), [float(s) for s in volume.pixdim]


def save_vf_figure(pretraining_datalist: Path, path: Path, preset: Preset, seed: int = 0) -> Path:
    """Three VF-v1 samples from real volumes, preprocessed as the pretraining bundle does (HU window, RAS)."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        RandSpatialCropd,
        ScaleIntensityRanged,
        Spacingd,
        SpatialPadd,
    )

    from misfm_transforms import RandVolumeFusiond

    from .visualize import save_volume_fusion_samples

    volumes = [e["image"] for e in _entries(pretraining_datalist, "training")]
    keys = ["image", "foreground"]  # not "image_*": MONAI treats such keys as meta data of "image"
    roi = [2 * r for r in preset.roi_size]
    prep = Compose([
        LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS"),
        Spacingd(keys, pixdim=[max(p, 1.5) for p in preset.pixdim]),
        ScaleIntensityRanged(keys, a_min=-1000, a_max=1000, b_min=-1, b_max=1, clip=True),
        SpatialPadd(keys, spatial_size=roi, value=-1),
        *(RandSpatialCropd(key, roi_size=roi, random_size=False) for key in keys),  # own crop per volume
    ])
    fusion = RandVolumeFusiond(background_key="image", foreground_key="foreground", label_key="label",
                               box_size_max=(80, 80, 40))
    prep.set_random_state(seed)
    fusion.set_random_state(seed)
    rows = {"fg": [], "bg": [], "fused": [], "label": []}
    for i in range(3):
        sample = prep({"image": volumes[i % len(volumes)], "foreground": volumes[(i + 1) % len(volumes)]})
        rows["bg"].append(sample["image"][0].numpy())
        rows["fg"].append(sample["foreground"][0].numpy())
        fused = fusion(sample)
        rows["fused"].append(fused["image"][0].numpy())
        rows["label"].append(np.asarray(fused["label"][0]))
    return save_volume_fusion_samples(path, rows["fg"], rows["bg"], rows["fused"], rows["label"])


def organ_dice(prediction: np.ndarray, reference: np.ndarray, labels: Dict[int, str]) -> Dict[str, float]:
    """Dice per organ present in ``reference`` (organs absent from it are left out, not scored 0 or 1)."""
    scores = {}
    for idx, name in labels.items():
        if idx == 0:
            continue
        ref = reference == idx
        if not ref.any():
            continue
        pred = prediction == idx
        scores[name] = float(2.0 * np.logical_and(pred, ref).sum() / (pred.sum() + ref.sum()))
    return scores


def _segmentation_file(folder: Path, image: str) -> Path:
    stem = Path(image).name.split(".")[0]
    found = sorted(folder.glob(f"{stem}*seg*.nii*"))
    if not found:
        raise FileNotFoundError(f"no segmentation of {image} in {folder}: the inference step wrote nothing")
    return found[0]


def run_main_job(preset_name: str, output_dir: Path, data_dir: Path | None = None) -> Dict[str, Path]:
    """Run every step; returns the paths of the main outputs."""
    preset = PRESETS[preset_name]
    out = output_dir.resolve()
    logs = out / "logs"
    started = time.time()
    print(f"[1/6] fetching real CT into {data_dir or default_data_dir()}")
    datalists = fetch_all(data_dir)

    print("[2/6] Volume Fusion samples from real volumes")
    vf_png = save_vf_figure(datalists["pretraining"], out / "figures" / "volume_fusion_samples.png", preset)

    pre_dir = out / "pretraining"
    run_bundle("misfm_ct_pretraining", "training", ["train.json"], {
        **_common_overrides(preset, pre_dir),
        "dataset_dir": str(datalists["pretraining"].parent), "data_list_file_path": str(datalists["pretraining"]),
        "max_epochs": preset.pretrain_epochs,
    }, logs / "pretraining.log", "[3/6] VF pretraining")
    pretrained = pre_dir / "models" / "model.pt"

    # pretrained vs scratch on the abdomen bundle: the label-efficiency study users run on their own data
    print("[4/6] abdomen fine-tuning, pretrained vs scratch (label-efficiency study)")
    abdomen = datalists["abdomen"]
    study_dir = out / "label_efficiency"
    tuning = {k: v for k, v in _common_overrides(preset, study_dir).items() if k not in ("ckpt_dir", "output_dir")}
    study = run_study("abdomen", abdomen, pretrained, ["all"], preset.study_seeds, study_dir,
                      overrides={**tuning, "max_epochs": preset.finetune_epochs})
    runs = {init: study_dir / "runs" / f"{init}_n{_count(abdomen)}_s0" for init in ("pretrained", "scratch")}

    thorax = _with_training_as_validation(datalists["thorax"], out / "inference" / "thorax_train.json")
    thorax_work = out / "thorax_pretrained"
    run_bundle("misfm_thorax_ct_segmentation", "training", ["train.json"], {
        **_common_overrides(preset, thorax_work), "dataset_dir": str(thorax.parent),
        "data_list_file_path": str(thorax), "max_epochs": max(preset.finetune_epochs // 2, 1),
        "pretrained_checkpoint": str(pretrained),
    }, logs / "thorax_pretrained.log", "[5/6] thorax fine-tuning (pretrained)")

    thorax_case = _entries(thorax, "training")[0]
    seg_dir = out / "segmentations"
    listing = _write_testing_datalist(out / "inference" / "thorax.json", [thorax_case["image"]])
    run_bundle("misfm_thorax_ct_segmentation", "run", ["inference.json"], {
        **_common_overrides(preset, thorax_work), "dataset_dir": str(listing.parent),
        "data_list_file_path": str(listing), "output_dir": str(seg_dir / "thorax_pretrained"),
    }, logs / "inference_thorax.log", "[5/6] thorax inference")

    print("[6/6] pictures and summary")
    from .visualize import save_segmentation_montage

    abdomen_labels, thorax_labels = _labels(abdomen), _labels(thorax)
    unseen = _entries(abdomen, "validation")[0]
    image, spacing = _load_ras(unseen["image"])
    reference, _ = _load_ras(unseen["label"])
    segs = {"reference (TotalSegmentator)": reference.astype(np.int16)}
    for init, run in runs.items():  # the study's evaluation wrote its predictions on the input grid
        found = _segmentation_file(run / "eval" / "pred", unseen["image"])
        (seg_dir / f"abdomen_{init}").mkdir(parents=True, exist_ok=True)
        kept = shutil.copy(found, seg_dir / f"abdomen_{init}" / found.name)
        seg, _ = _load_ras(kept)
        segs["fine-tuned from VF pretraining" if init == "pretrained" else "fine-tuned from scratch"] = seg
    montage = save_segmentation_montage(out / "figures" / "montage_unseen_dicom_series.png", image, segs,
                                        abdomen_labels, spacing, "Unseen DICOM series (abdomen bundle)")
    t_image, t_spacing = _load_ras(thorax_case["image"])
    t_ref, _ = _load_ras(thorax_case["label"])
    t_seg, _ = _load_ras(_segmentation_file(seg_dir / "thorax_pretrained", thorax_case["image"]))
    thorax_montage = save_segmentation_montage(
        out / "figures" / "montage_thorax_case.png", t_image,
        {"reference (TotalSegmentator)": t_ref.astype(np.int16), "thorax bundle (pretrained)": t_seg},
        thorax_labels, t_spacing, "Thorax case (thorax bundle, trained on this case)", window=(-400.0, 600.0))
    thorax_dice = organ_dice(t_seg, t_ref, thorax_labels)

    summary = out / "summary.txt"
    lines = [
        f"misfm main job, preset '{preset_name}', {time.time() - started:.0f} s",
        f"network widths {tuple(preset.feature_channels)}, patch {tuple(preset.roi_size)} (x, y, z) at "
        f"{tuple(preset.pixdim)} mm; pretraining {preset.pretrain_epochs}x{preset.epoch_length} iterations, "
        f"fine-tuning {preset.finetune_epochs}x{preset.epoch_length} (thorax "
        f"{max(preset.finetune_epochs // 2, 1)}x{preset.epoch_length})",
        "Abdomen bundle, Dice against TotalSegmentator model outputs (not manual ground truth) on the unseen DICOM",
        "series, organs present in it (label_efficiency/label_efficiency.csv has every organ):",
        study["summary"].read_text(encoding="utf-8").rstrip(),
        "Thorax case (trained on it; a sanity check, not a generalisation figure): "
        + ", ".join(f"{o} {d:.3f}" for o, d in thorax_dice.items()),
    ]
    summary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    outputs = {
        "summary": summary, "study_csv": study["csv"], "study_plot": study["plot"], "vf_samples_png": vf_png,
        "montage_png": montage, "thorax_montage_png": thorax_montage, "segmentations": seg_dir,
        "pretrained_checkpoint": pretrained, "tensorboard": out, "logs": logs,
    }
    print("\n".join(lines))
    print("\noutputs:")
    for name, path in outputs.items():
        print(f"  {name:<22} {path}")
    return outputs


def _count(datalist: Path) -> int:
    """How many labelled training cases the datalist has (the study's "all" budget)."""
    return len(_entries(datalist, "training"))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m misfm_demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"))
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where real CT is cached (default $MISFM_DATA_DIR or <repo>/data)")
    args = parser.parse_args(argv)
    if not BUNDLES_DIR.is_dir():
        parser.error(f"bundles not found at {BUNDLES_DIR}: run from a checkout of the misfm repository")
    run_main_job(args.preset, args.output_dir, args.data_dir)
