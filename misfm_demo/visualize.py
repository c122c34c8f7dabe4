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

__all__ = ["montage_layout", "save_segmentation_montage", "save_volume_fusion_samples"]

HU_WINDOW = (-160.0, 240.0)  # abdominal soft-tissue window


def _label_colours(num: int) -> np.ndarray:
    """RGBA per label id; 0 transparent."""
    colours = plt.get_cmap("tab20", 20)(np.arange(20))
    table = np.zeros((num, 4))
    for i in range(1, num):
        table[i] = colours[(i - 1) % 20]
        table[i, 3] = 0.55
    return table


View = tuple[str, np.ndarray, float, float]  # name, display array, width and height in mm

_TITLE_IN = 0.3  # inches above each panel for its title
_GAP_IN = 0.15  # inches between panels
_BODY_HU = -500.0  # voxels above this are the body (and table): the views are cropped to them


def _views(volume: np.ndarray, centre: Sequence[int], spacing: Sequence[float],
           box: Sequence[slice]) -> list[View]:
    """Axial, coronal and sagittal slices through ``centre`` of an RAS ``(x, y, z)`` volume, cropped to ``box``
    and display-oriented, with their physical width and height in mm.

    Each 2-D slice ``(u, v)`` is shown with rows = v descending (anterior / superior on top) and columns =
    u descending (patient right on the image left for axial and coronal, anterior on the left for sagittal).
    """
    x, y, z = centre
    sx, sy, sz = box
    planes = (("axial", volume[sx, sy, z], 0, 1), ("coronal", volume[sx, y, sz], 0, 2),
              ("sagittal", volume[x, sy, sz], 1, 2))
    return [(name, plane[::-1, ::-1].T, plane.shape[0] * spacing[u], plane.shape[1] * spacing[v])
            for name, plane, u, v in planes]


def _body_box(image: np.ndarray, margin: int = 4) -> tuple[slice, slice, slice]:
    """The voxel ranges holding the body (air around it is left out of the pictures)."""
    inside = np.argwhere(image > _BODY_HU)
    if inside.size == 0:
        return tuple(slice(0, n) for n in image.shape)  # type: ignore[return-value]
    lo, hi = inside.min(axis=0), inside.max(axis=0) + 1
    return tuple(slice(max(int(a) - margin, 0), min(int(b) + margin, n))  # type: ignore[return-value]
                 for a, b, n in zip(lo, hi, image.shape))


def montage_layout(views: Sequence[View], width_in: float = 12.0) -> tuple[list[tuple[float, ...]], float]:
    """Where the three views of one row go: ``(left, bottom, width, height)`` in inches from the row's bottom-left
    corner, and the row's height in inches. Every panel has its physical aspect ratio and one common scale (mm
    per inch), so a thin volume is drawn as thin as it is, never stretched or squeezed; when the coronal and sagittal
    views are flat (a few slices) they are stacked beside the axial view instead of shrinking to a strip."""
    (_, _, aw, ah), (_, _, cw, ch), (_, _, sw, sh) = views
    flat = max(ch, sh) < 0.5 * ah
    if flat:  # axial | (coronal over sagittal)
        scale = (width_in - _GAP_IN) / (aw + max(cw, sw))  # inches per mm
        column = (ch + sh) * scale + 2 * _TITLE_IN + _GAP_IN
        height = max(ah * scale + _TITLE_IN, column)
        right = aw * scale + _GAP_IN
        boxes = [(0.0, height - _TITLE_IN - ah * scale, aw * scale, ah * scale),
                 (right, height - _TITLE_IN - ch * scale, cw * scale, ch * scale),
                 (right, height - 2 * _TITLE_IN - _GAP_IN - (ch + sh) * scale, sw * scale, sh * scale)]
    else:  # axial | coronal | sagittal
        scale = (width_in - 2 * _GAP_IN) / (aw + cw + sw)
        height = max(ah, ch, sh) * scale + _TITLE_IN
        boxes, left = [], 0.0
        for w, h in ((aw, ah), (cw, ch), (sw, sh)):
            boxes.append((left, height - _TITLE_IN - h * scale, w * scale, h * scale))
            left += w * scale + _GAP_IN
    return boxes, height


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
    """One row per segmentation (e.g. "reference", "pretrained", "scratch"): axial, coronal and sagittal views,
    cropped to the body, at one physical scale (see :func:`montage_layout`).

    Args:
        image: CT in HU, ``(x, y, z)`` RAS.
        segmentations: row title -> label map ``(x, y, z)`` on the image grid.
        label_names: id -> organ name, for the legend (ids present in any map are listed).
        spacing: voxel size (x, y, z) in mm.
    """
    path = Path(path)
    image = np.asarray(image, dtype=np.float32)
    first = next(iter(segmentations.values()), None)
    centre = _centre(first, image.shape)
    box = _body_box(image)
    num_labels = max([max(label_names, default=0)] + [int(s.max()) for s in segmentations.values()]) + 1
    cmap = ListedColormap(_label_colours(num_labels))
    image_views = _views(image, centre, spacing, box)
    boxes, row_height = montage_layout(image_views)
    rows = list(segmentations.items()) or [("image", None)]
    top, bottom, width = (0.5 if title else 0.1), 0.5, 12.0
    height = top + bottom + len(rows) * (row_height + _GAP_IN)
    fig = plt.figure(figsize=(width, height), facecolor="black")
    for row, (name, seg) in enumerate(rows):
        origin = height - top - (row + 1) * (row_height + _GAP_IN)  # this row's bottom edge, inches
        seg_views = _views(seg, centre, spacing, box) if seg is not None else [None] * 3
        for (view, img, _, _), seg_view, (left, low, w, h) in zip(image_views, seg_views, boxes):
            ax = fig.add_axes((left / width, (origin + low) / height, w / width, h / height))
            ax.imshow(img, cmap="gray", vmin=window[0], vmax=window[1], aspect="auto", interpolation="nearest")
            if seg_view is not None:
                ax.imshow(np.ma.masked_equal(seg_view[1], 0), cmap=cmap, vmin=0, vmax=num_labels - 1, aspect="auto",
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
