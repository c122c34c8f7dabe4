"""Weights into a bundle's network: pretrained initialisation and the trained ``model.pt``, with clear errors."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from monai.handlers import CheckpointLoader

from misfm_nets import load_pretrained

__all__ = [
    "PretrainedWeights",
    "load_pretrained_weights",
    "CheckedCheckpointLoader",
    "describe_load_error",
    "check_finite_weights",
    "file_sha256",
    "recorded_sha256",
    "verify_sha256",
]

LARGE_FILES = ("large_files.yml", "large_files.yaml", "large_files.json")  # MONAI's names, in its order

logger = logging.getLogger("misfm.bundle")


def describe_load_error(err: BaseException, limit: int = 3) -> str:
    """A few lines instead of PyTorch's list of every mismatching entry (thousands of lines for PCT-Net)."""
    text = str(err)
    missing = re.findall(r'Missing key\(s\) in state_dict: (.*?)\.\s*(?:\n|$)', text)
    unexpected = re.findall(r'Unexpected key\(s\) in state_dict: (.*?)\.\s*(?:\n|$)', text)
    shapes = re.findall(r"size mismatch for ([^:]+): copying a param with shape (torch\.Size\(\[[^\]]*\]\)) from "
                        r"checkpoint, the shape in current model is (torch\.Size\(\[[^\]]*\]\))", text)
    if not (missing or unexpected or shapes):
        return text if len(text) < 600 else text[:600] + " ..."
    parts = []
    for label, found in (("missing", missing), ("unexpected", unexpected)):
        names = [n.strip().strip('"') for group in found for n in group.split(",")]
        if names:
            parts.append(f"{len(names)} {label} entries (e.g. {', '.join(names[:limit])})")
    if shapes:
        first = "; ".join(f"{n}: checkpoint {a[11:-1]} vs network {b[11:-1]}" for n, a, b in shapes[:limit])
        parts.append(f"{len(shapes)} entries of another shape (e.g. {first})")
    return ", ".join(parts)


def check_finite_weights(state: Mapping[str, Any], source: str) -> None:
    """``ValueError`` naming the entries of ``state`` that hold NaN or Inf (a diverged run's weights)."""
    bad = [name for name, value in state.items()
           if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise ValueError(
            f"{source} holds NaN/Inf weights in {len(bad)} entries (e.g. {', '.join(bad[:3])}): it comes from a run "
            "that diverged. Use an earlier checkpoint, or retrain with a lower learning rate."
        )


def file_sha256(path: str) -> str:
    """SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def recorded_sha256(path: str, bundle_root: str | None) -> str | None:
    """The SHA-256 that the bundle's ``large_files.yml`` records for ``path`` (None: the file is not listed)."""
    if not bundle_root:
        return None
    from monai.bundle import ConfigParser

    for name in LARGE_FILES:
        listing = os.path.join(bundle_root, name)
        if not os.path.isfile(listing):
            continue
        for entry in ConfigParser.load_config_file(listing).get("large_files", []):
            same = os.path.realpath(os.path.join(bundle_root, entry.get("path", ""))) == os.path.realpath(path)
            if same and entry.get("hash_val") and entry.get("hash_type", "sha256").lower() == "sha256":
                return str(entry["hash_val"]).lower()
    return None


def verify_sha256(path: str, expected: str | None, what: str, digest: str | None = None) -> str:
    """The file's SHA-256; ``ValueError`` before anything is loaded when it is not the ``expected`` one."""
    digest = digest or file_sha256(path)
    if expected and digest != expected.strip().lower():
        raise ValueError(
            f"{what} {path!r} is not the file that was recorded: SHA-256 {digest}, "
            f"expected {expected.strip().lower()}. "
            "It is corrupt, truncated or another file: download it again (python -m monai.bundle download_large_files "
            "--bundle_path <bundle>) or fix the recorded digest."
        )
    return digest


@dataclass
class PretrainedWeights:
    """What ``pretrained_checkpoint`` put into the network: the file, its SHA-256 and the load report."""

    path: str
    sha256: str
    report: Any


def load_pretrained_weights(network: torch.nn.Module, checkpoint: str | None, mode: str = "encoder",
                            sha256: str | None = None, bundle_root: str | None = None) -> PretrainedWeights | None:
    """Fine-tuning entry point of the bundles: load ``checkpoint`` into ``network`` and log the LoadReport.

    ``checkpoint`` empty/None: train from scratch (logged). Otherwise its SHA-256 is checked first against ``sha256``
    (``pretrained_checkpoint_sha256``) and against the bundle's ``large_files.yml``, when either records one; then
    it is loaded with ``misfm_nets.load_pretrained`` (``mode="encoder"`` loads everything but the class-count-dependent
    heads, ``"all"`` everything that matches). A missing, altered, foreign or non-finite checkpoint raises before
    training starts.
    """
    if not checkpoint:
        logger.info("pretrained_checkpoint is empty: training from scratch.")
        return None
    if not os.path.isfile(checkpoint):
        raise ValueError(
            f"pretrained_checkpoint {checkpoint!r} does not exist; pass the path of a PCT-Net checkpoint "
            "(the pretraining bundle's models/model.pt or pctnet_ct10k_volf.pt) or '' to train from scratch."
        )
    digest = verify_sha256(checkpoint, sha256, "pretrained_checkpoint")
    verify_sha256(checkpoint, recorded_sha256(checkpoint, bundle_root), "pretrained_checkpoint", digest)
    try:
        report = load_pretrained(network, checkpoint, mode=mode)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"pretrained_checkpoint {checkpoint!r} cannot initialise this bundle's network: {err} "
            "Pass a PCT-Net checkpoint of the same widths (feature_channels / num_heads), or '' to train from scratch."
        ) from err
    check_finite_weights(network.state_dict(), f"pretrained_checkpoint {checkpoint!r}")
    logger.info("LoadReport for pretrained_checkpoint %s (mode=%s, SHA-256 %s): %s", checkpoint, mode, digest,
                report.summary())
    return PretrainedWeights(checkpoint, digest, report)


class CheckedCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` for ``model.pt`` that says what is wrong instead of dumping PyTorch's list of
    every mismatching entry: a missing file, a file whose SHA-256 differs from the one the bundle's
    ``large_files.yml`` records for it (``bundle_root`` given), a checkpoint of another bundle or of other widths,
    NaN weights."""

    def __init__(self, load_path: str, load_dict: Mapping[str, Any], bundle_root: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(load_path, load_dict, **kwargs)
        self.bundle_root = bundle_root

    def __call__(self, engine: Any) -> None:
        if not os.path.isfile(self.load_path):
            raise ValueError(
                f"no trained model at {self.load_path!r}: train the bundle first (models/model.pt), or pass --ckpt_dir "
                "with the folder that holds model.pt."
            )
        verify_sha256(self.load_path, recorded_sha256(self.load_path, self.bundle_root), "model")
        try:
            super().__call__(engine)
        except RuntimeError as err:
            raise ValueError(
                f"model {self.load_path!r} does not fit this bundle's network: {describe_load_error(err)}. Is it the "
                "model of another bundle, or trained with other widths (feature_channels, num_heads)? Pass the same "
                "values as in training."
            ) from None  # PyTorch's own message lists every entry: thousands of lines
        for name, obj in self.load_dict.items():
            if isinstance(obj, torch.nn.Module):
                check_finite_weights(obj.state_dict(), f"model {self.load_path!r}")
