"""Shared set-up of the test suite.

The helpers shared by several test modules live in ``bundle_utils.py`` (synthetic CT cases, datalists, running a
bundle through ``python -m monai.bundle``); ``bad_inputs.py`` builds the corpus of broken inputs; ``hub_server.py``
and ``ddp_probe.py`` are run by the tests as servers and worker processes. This file makes them importable, and
``bundles/build.py`` (as ``build``), whatever pytest's import mode.

Markers: ``slow`` for minutes-long runs (real bundles, torchrun, the wheel install): ``pytest -m "not slow"`` is the
quick subset.
"""

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
for folder in (TESTS, TESTS.parent / "bundles"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
