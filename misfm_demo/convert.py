"""``misfm-convert SRC DST``: a MIS-FM / PyMIC PCT-Net checkpoint (e.g. the published ``pctnet_ct10k_volf.pt``)
as a bundle's ``model.pt``, with the load report and the SHA-256 of what was written.

The target is the network a bundle builds (``--bundle``, default the pretraining bundle, whose 5-class pretext
network is the published checkpoint's). ``--mode all`` (default) loads every entry whose name and shape match;
``--mode encoder`` leaves the class-count-dependent heads freshly initialised (a downstream bundle's
initialisation). Entries that do not fit are reported with the reason; a checkpoint of another network, or with
NaN weights, is refused. The output is written atomically (a killed run leaves no half file).

    misfm-convert pctnet_ct10k_volf.pt bundles/misfm_ct_pretraining/models/model.pt
    misfm-convert pctnet_ct10k_volf.pt abdomen_init.pt --bundle abdomen --mode encoder
    # then, for any segmentation bundle:
    python -m monai.bundle run training ... --pretrained_checkpoint abdomen_init.pt \\
        --pretrained_checkpoint_sha256 <the SHA-256 printed>
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from .bundle_runner import bundle_config, bundle_network
from .label_efficiency import parse_overrides

__all__ = ["convert", "main"]


def convert(source: Path, destination: Path, bundle: str = "pretraining", mode: str = "all",
            overrides: dict | None = None) -> tuple[str, str]:
    """Load ``source`` into ``bundle``'s network and save its state dict to ``destination``.

    Returns ``(load report summary, SHA-256 of destination)``. ``ValueError`` for a checkpoint that does not fit.
    """
    import torch

    from misfm_bundle_glue import file_sha256
    from misfm_bundle_glue.weights import check_finite_weights
    from misfm_nets import load_pretrained

    network = bundle_network(bundle_config(bundle, overrides))
    report = load_pretrained(network, str(source), mode=mode)
    check_finite_weights(network.state_dict(), f"checkpoint {str(source)!r}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{destination.name}.", dir=destination.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(network.state_dict(), f)
        os.replace(tmp, destination)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return report.summary(), file_sha256(str(destination))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="misfm-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="MIS-FM / PyMIC checkpoint ({'model_state_dict': ...}) or any "
                        "PCT-Net state dict")
    parser.add_argument("destination", type=Path, help="where to write the bundle model.pt")
    parser.add_argument("--bundle", default="pretraining", help="the bundle whose network to fill: pretraining "
                        "(default), abdomen, thorax, headneck or a bundle folder")
    parser.add_argument("--mode", choices=("all", "encoder"), default="all")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="bundle config overrides that shape the network, e.g. feature_channels=[8,16,32,64,128]")
    args = parser.parse_args(argv)
    if not args.source.is_file():
        parser.error(f"{args.source} does not exist")
    try:
        summary, digest = convert(args.source, args.destination, args.bundle, args.mode,
                                  parse_overrides(args.overrides))
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    print(summary)
    print(f"wrote {args.destination}\nSHA-256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
