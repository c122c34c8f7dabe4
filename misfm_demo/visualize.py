"""Pictures of the main job: segmentation montages and Volume Fusion samples (PNG, matplotlib Agg backend).

Volumes are arrays in MONAI order ``(x, y, z)`` (as ``LoadImage`` gives them after ``Orientation("RAS")``);
slices are shown the radiological way (patient left on the image right, head up).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

__all__ = ["save_segmentation_montage", "save_volume_fusion_samples"]

HU_WINDOW = (-160.0, 240.0)  # abdominal soft-tissue window


def _label_colours(num: int) -> np.ndarray:
    """RGBA per label id; 0 transparent."""
    colours = plt.get_cmap("tab20", 20)(np.arange(20))
    table = np.zeros((num, 4))
    for i in range(1, num):
        table[i] = colours[(i - 1) % 20]
        table[i, 3] = 0.55
    return table


def _views(volume: np.ndarray, centre: Sequence[int]) -> list[tuple[str, np.ndarray]]:
    """Axial, coronal, sagittal slices through ``centre`` of an RAS ``(x, y, z)`` volume, display-oriented.

    Each 2-D slice ``(u, v)`` is shown with rows = v descending (anterior / superior on top) and columns =
    u descending (patient right on the image left for axial and coronal, anterior on the left for sagittal).
    """
    x, y, z = centre
    return [(name, plane[::-1, ::-1].T) for name, plane in
            (("axial", volume[:, :, z]), ("coronal", volume[:, y, :]), ("sagittal", volume[x, :, :]))]


def _centre(seg: Optional[np.ndarray], shape: Sequence[int]) -> list[int]:
    if seg is not None and np.any(seg > 0):
        return [int(round(c)) for c in np.argwhere(seg > 0).mean(axis=0)]
    return [s // 2 for s in shape]


def save_segmentation_montage(
    path: str | Path,
    image: np.ndarray,
    segmentations: Mapping[str, np.ndarray],
    label_names: Mapping[int, str],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    title: str = "",
    window: tuple[float, float] = HU_WINDOW,
) -> Path:
    """One row per segmentation (e.g. "reference", "pretrained", "scratch"), columns axial/coronal/sagittal.

    Args:
        image: CT in HU, ``(x, y, z)`` RAS.
        segmentations: row title -> label map ``(x, y, z)`` on the image grid.
        label_names: id -> organ name, for the legend (ids present in any map are listed).
        spacing: voxel size (x, y, z) in mm, for the aspect ratio.
    """
    path = Path(path)
    image = np.asarray(image, dtype=np.float32)
    first = next(iter(segmentations.values()), None)
    centre = _centre(first, image.shape)
    num_labels = max([max(label_names, default=0)] + [int(s.max()) for s in segmentations.values()]) + 1
    cmap = ListedColormap(_label_colours(num_labels))
    aspects = [spacing[1] / spacing[0], spacing[2] / spacing[0], spacing[2] / spacing[1]]
    rows = max(len(segmentations), 1)
    fig, axes = plt.subplots(rows, 3, figsize=(12, 4 * rows), squeeze=False, facecolor="black")
    for row, (name, seg) in enumerate(segmentations.items() or [("image", None)]):
        image_views = _views(image, centre)
        seg_views = _views(seg, centre) if seg is not None else [(None, None)] * 3
        for col, ((view, img), (_, lab), aspect) in enumerate(zip(image_views, seg_views, aspects)):
            ax = axes[row][col]
            ax.imshow(img, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest")
            if lab is not None:
                ax.imshow(np.ma.masked_equal(lab, 0), cmap=cmap, vmin=0, vmax=num_labels - 1, aspect=aspect,
                          interpolation="nearest")
            ax.set_title(f"{name}: {view}", color="white", fontsize=10)
            ax.axis("off")
    present = sorted({int(v) for s in segmentations.values() for v in np.unique(s) if v > 0})
    handles = [Patch(color=cmap(i), label=label_names.get(i, str(i))) for i in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False,
                   labelcolor="white")
    if title:
        fig.suptitle(title, color="white")
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 0.96 if title else 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90, facecolor=fig.get_facecolor())
    plt.close(fig)
    tmp.replace(path)
    return path


def save_volume_fusion_samples(
    path: str | Path,
    foregrounds: Sequence[np.ndarray],
    backgrounds: Sequence[np.ndarray],
    fused: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    num_levels: int = 4,
    title: str = "Volume Fusion: fused = (k/K) * foreground + (1 - k/K) * background",
) -> Path:
    """One row per sample: foreground, background, fused image, label k (middle axial slice of ``(x, y, z)``)."""
    path = Path(path)
    rows = len(fused)
    fig, axes = plt.subplots(rows, 4, figsize=(13, 3.3 * rows), squeeze=False)
    for r in range(rows):
        z = fused[r].shape[-1] // 2
        panels = [(foregrounds[r], "foreground"), (backgrounds[r], "background"), (fused[r], "fused"),
                  (labels[r], f"label k (0..{num_levels})")]
        for c, (vol, name) in enumerate(panels):
            ax = axes[r][c]
            slice_ = np.rot90(np.asarray(vol)[..., z])
            if c == 3:
                im = ax.imshow(slice_, cmap="viridis", vmin=0, vmax=num_levels, interpolation="nearest")
                fig.colorbar(im, ax=ax, ticks=range(num_levels + 1), fraction=0.046)
            else:
                ax.imshow(slice_, cmap="gray", interpolation="nearest")
            ax.set_title(name, fontsize=10)
            ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(path)
    return path
