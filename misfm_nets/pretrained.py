"""Load MIS-FM / PyMIC / MONAI-bundle checkpoints into a network, and say exactly what was loaded."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

__all__ = ["LoadReport", "load_pretrained", "extract_state_dict", "is_prediction_head", "unwrap_model"]

logger = logging.getLogger(__name__)

# Keys under which known checkpoint formats keep the weights: PyMIC / MIS-FM, plain, ignite/MONAI training
# checkpoints (CheckpointSaver with save_dict={"model": net, ...}) and MONAI bundle trainers.
_WRAPPER_KEYS = ("model_state_dict", "state_dict", "model", "network", "net")
# Prefixes added by DistributedDataParallel / DataParallel and torch.compile.
_PREFIXES = ("module.", "_orig_mod.")
# Output convolutions (their shape depends on the class count): the deep-supervision and final heads.
_HEAD_MARKERS = (".out_conv",)
# Recomputed in __init__ from the window size; never needs to come from a checkpoint.
_DERIVED_BUFFERS = ("relative_position_index",)
# Below this fraction of the network's (non-head) entries matching, the checkpoint is for another network.
MIN_MATCH_FRACTION = 0.5

StateSource = Union[str, "os.PathLike[str]", Mapping[str, Any]]


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did. ``skipped`` holds ``(name, checkpoint shape, network shape, why)``."""

    loaded: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, Tuple[int, ...], Tuple[int, ...], str]] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"loaded {len(self.loaded)} entries, skipped {len(self.skipped)}, "
            f"missing {len(self.missing)} (left as initialised), unexpected {len(self.unexpected)} (ignored)"
        ]
        lines += [f"  skipped {name}: checkpoint {ck} vs network {net} ({why})" for name, ck, net, why in self.skipped]
        if self.missing:
            lines.append(f"  missing: {_abbreviate(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected: {_abbreviate(self.unexpected)}")
        return "\n".join(lines)


def _abbreviate(names: List[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def is_prediction_head(name: str) -> bool:
    """True for the class-count-dependent output convolutions of PCT-Net."""
    return any(marker in name for marker in _HEAD_MARKERS)


def extract_state_dict(source: StateSource, map_location: Union[str, torch.device] = "cpu") -> Dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint path or loaded object, with DDP/compile prefixes removed."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist; pass the path of a .pt/.pth file.")
        try:
            source = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # unpickling errors come in many types
            raise ValueError(
                f"cannot read checkpoint {path!r} as a PyTorch weights file ({type(err).__name__}: {err}). "
                "Only tensor checkpoints load (weights_only=True); re-save it with torch.save(net.state_dict())."
            ) from err
    if not isinstance(source, Mapping):
        raise TypeError(f"a checkpoint must be a dict of tensors, got {type(source).__name__}.")
    state = source
    for key in _WRAPPER_KEYS:
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"no tensors found in the checkpoint (top-level keys: {_abbreviate(list(source))}).")
    cleaned = {}
    for name, value in tensors.items():
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        cleaned[name] = value
    return cleaned


def unwrap_model(net: nn.Module) -> nn.Module:
    """The network inside ``DistributedDataParallel`` / ``DataParallel`` (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers, however nested; ``net`` itself when it is not wrapped."""
    while True:
        if isinstance(net, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            net = net.module
        elif isinstance(getattr(net, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            net = net._orig_mod
        else:
            return net


def load_pretrained(
    net: nn.Module,
    source: StateSource,
    mode: str = "all",
    map_location: Union[str, torch.device] = "cpu",
    log: Optional[logging.Logger] = None,
) -> LoadReport:
    """Copy matching weights from ``source`` into ``net`` and report what happened.

    Args:
        net: the network to initialise (e.g. :class:`misfm_nets.PCTNet`), also wrapped in
            ``DistributedDataParallel`` / ``DataParallel`` or compiled by ``torch.compile`` (see :func:`unwrap_model`;
            the weights are loaded into the wrapped network, which the wrapper shares).
        source: a checkpoint path, or an already loaded dict: MIS-FM/PyMIC ``{"model_state_dict": ...}``,
            a MONAI bundle ``model.pt`` (plain state dict), a training checkpoint ``{"model": ..., ...}``;
            the ``module.`` / ``_orig_mod.`` prefixes of a wrapped network's checkpoint are removed.
        mode: ``"all"`` loads every entry whose name and shape match; ``"encoder"`` loads everything except the
            prediction heads (the ``out_conv*`` layers), e.g. to fine-tune a pretext model on new classes.
            In both modes a head whose class count differs is skipped and keeps its fresh initialisation.
        map_location: where tensors are loaded.
        log: logger for the report (default: this module's).

    Raises:
        ValueError: the checkpoint matches less than half of the network's non-head entries, i.e. it belongs
            to another network (rather than loading a few tensors silently).
    """
    if mode not in ("all", "encoder"):
        raise ValueError(f"mode must be 'all' or 'encoder', got {mode!r}.")
    ckpt = extract_state_dict(source, map_location)
    net = unwrap_model(net)
    target = net.state_dict()
    report = LoadReport()
    to_load = {}
    for name, value in ckpt.items():
        if name not in target:
            report.unexpected.append(name)
        elif mode == "encoder" and is_prediction_head(name):
            report.skipped.append((name, tuple(value.shape), tuple(target[name].shape),
                                   "prediction head, mode='encoder'"))
        elif value.shape != target[name].shape:
            why = "class count differs" if is_prediction_head(name) else "shape differs"
            report.skipped.append((name, tuple(value.shape), tuple(target[name].shape), why))
        else:
            to_load[name] = value
            report.loaded.append(name)
    report.missing = [
        name for name in target
        if name not in ckpt and not any(name.endswith(buffer) for buffer in _DERIVED_BUFFERS)
    ]
    body = [name for name in target if not is_prediction_head(name)]
    matched = sum(name in to_load for name in body)
    if body and matched < MIN_MATCH_FRACTION * len(body):
        raise ValueError(
            f"the checkpoint does not fit {type(net).__name__}: only {matched} of its {len(body)} non-head entries "
            f"match by name and shape (checkpoint keys look like: {_abbreviate(sorted(ckpt), 5)}). "
            "Is it a checkpoint of another network, or built with other widths?"
        )
    net.load_state_dict(to_load, strict=False)
    (log or logger).info("pretrained weights (%s): %s", mode, report.summary())
    return report
