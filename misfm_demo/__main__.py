"""``python -m misfm_demo``: the main job (see :mod:`misfm_demo.main_job`)."""

from .main_job import main

if __name__ == "__main__":
    main()
