"""Run under torchrun by tests/test_bundle_runtime.py: what one rank of a multi-GPU bundle run gets.

Parses the bundle's real configs (train.json + the override files given, + multi_gpu_train.json), runs the
bundle's own set-up step, then writes to ``<out>/rank<RANK>.json``: RANK, LOCAL_RANK, the device and
``map_location`` the configs pick when CUDA is present (``torch.cuda.is_available`` is patched, nothing touches a
GPU), and digests of what the rank draws: a training batch (crops and Volume Fusion labels) and a dropout mask.

    torchrun ... tests/ddp_probe.py BUNDLE_DIR OUT OVERRIDES_JSON [CONFIG ...]
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from monai.bundle import ConfigParser


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    bundle, out, overrides, *configs = sys.argv[1:]
    bundle = Path(bundle)
    sys.path.insert(1, str(bundle))  # as `python -m monai.bundle run` does for the bundle's code
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / c) for c in configs])
    parser.update({"bundle_root": str(bundle), **json.loads(overrides)})
    dist.init_process_group("gloo")
    evaluation = ConfigParser()  # the multi-GPU evaluation layering of the same bundle
    evaluation.read_config([str(bundle / "configs" / c)
                            for c in ("train.json", "evaluate.json", "multi_gpu_evaluate.json")])
    evaluation.update({"bundle_root": str(bundle)})
    real = torch.cuda.is_available
    torch.cuda.is_available = lambda: True  # the configs' choice on a GPU machine; no CUDA call follows
    try:
        device = str(parser.get_parsed_content("device"))
        eval_device = str(evaluation.get_parsed_content("device"))
        map_location = str(evaluation.get_parsed_content("validate#handlers#0#map_location"))
    finally:
        torch.cuda.is_available = real
    parser["device"] = "cpu"
    parser.get_parsed_content("setup")
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    drop = torch.nn.functional.dropout(torch.ones(4096), 0.5)
    result = {
        "rank": dist.get_rank(),
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "device_with_cuda": device,
        "eval_device_with_cuda": eval_device,
        "eval_map_location_with_cuda": map_location,
        "image": _digest(batch["image"]),
        "label": _digest(batch["label"]),
        "dropout": _digest(drop),
    }
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
