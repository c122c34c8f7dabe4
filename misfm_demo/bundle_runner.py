"""Bundles as users run them: find one, read its configs, run a workflow (``python -m monai.bundle run ...``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from tqdm import tqdm

__all__ = ["BUNDLES_DIR", "SHORT_NAMES", "BundleRunError", "bundle_folder", "bundle_config", "bundle_network",
           "run_bundle"]

BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"
SHORT_NAMES = {
    "pretraining": "misfm_ct_pretraining",
    "abdomen": "misfm_abdomen_ct_segmentation",
    "thorax": "misfm_thorax_ct_segmentation",
    "headneck": "misfm_headneck_ct_segmentation",
}
# MONAI's StatsHandler: "Epoch: 3/10, Iter: 4/5 -- train_loss: 0.6021"
_ITERATION = re.compile(r"Epoch: (\d+)/(\d+), Iter: (\d+)/(\d+)")


class BundleRunError(RuntimeError):
    """A bundle command failed; the message names the command and the log with its full output."""


def bundle_folder(bundle: str | Path) -> Path:
    """A bundle's folder from a short name (``abdomen``), a bundle name or a folder path."""
    name = SHORT_NAMES.get(str(bundle), str(bundle))
    path = Path(name) if Path(name).is_dir() else BUNDLES_DIR / name
    if not (path / "configs" / "train.json").is_file():
        raise ValueError(f"bundle {str(bundle)!r}: no bundle there; use one of {sorted(SHORT_NAMES)}, a bundle name "
                         "or a bundle folder.")
    return path


def bundle_config(bundle: str | Path, overrides: Mapping[str, object] | None = None, config: str = "train.json"):
    """A bundle's config with ``overrides``, parsed by MONAI (nothing instantiated)."""
    from monai.bundle import ConfigParser

    folder = bundle_folder(bundle)
    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / config))
    parser.update({"bundle_root": str(folder), **(overrides or {})})
    return parser


def bundle_network(parser):
    """The PCT-Net a parsed bundle config builds (``network_def``), built from the installed ``misfm_nets``."""
    from misfm_nets import PCTNet

    args = {k: parser.get_parsed_content(f"network_def#{k}") for k in parser["network_def"] if not k.startswith("_")}
    return PCTNet(**args)


def _override(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def run_bundle(
    bundle: str | Path,
    workflow: str,
    config_files: Sequence[str],
    overrides: Mapping[str, object],
    log_file: Path,
    description: str,
    launcher: Sequence[str] = (sys.executable, "-m"),
) -> None:
    """``python -m monai.bundle run <workflow>`` on ``bundles/<bundle>`` (or a bundle folder) with ``--key value``
    overrides.

    The full output goes to ``log_file``; training iterations drive a progress bar.
    """
    root = bundle_folder(bundle)
    configs = [str(root / "configs" / name) for name in config_files]
    cmd = [*launcher, "monai.bundle", "run", workflow,
           "--meta_file", str(root / "configs" / "metadata.json"),
           "--config_file", json.dumps(configs) if len(configs) > 1 else configs[0],
           "--logging_file", str(root / "configs" / "logging.conf"),
           "--bundle_root", str(root)]
    for key, value in overrides.items():
        cmd += [f"--{key}", _override(value)]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_file, "w", encoding="utf-8") as log, tqdm(desc=description, unit="it", leave=True,
                                                             dynamic_ncols=True) as bar:
        log.write(" ".join(cmd) + "\n")
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8",
                                   errors="replace", env=env)
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            match = _ITERATION.search(line)
            if match:
                epoch, epochs, it, its = map(int, match.groups())
                bar.total = epochs * its
                bar.n = (epoch - 1) * its + it
                loss = line.rsplit(":", 1)[-1].strip()
                bar.set_postfix_str(f"loss {loss}", refresh=False)
                bar.refresh()
        code = process.wait()
    if code:
        tail = "".join(log_file.read_text(encoding="utf-8").splitlines(keepends=True)[-25:])
        raise BundleRunError(f"{description} failed (exit {code}); full log: {log_file}\n{tail}")
