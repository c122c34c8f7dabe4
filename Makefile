# Two commands on a fresh machine:  `make demo` (set up + main job)  and  `make test` (set up + tests).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.misfm-installed

.PHONY: setup demo lint test test-oldest bench clean

# torch==2.13.0 first: an unpinned torch would pull a multi-GB CUDA build on a CPU-only machine.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[demo,test,bench]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m misfm_demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) .ci/check_json.py

# UTF-8 mode: the subprocess logs read by the tests hold non-ASCII text, whatever locale a library sets.
test: lint
	PYTHONUTF8=1 $(PY) -m pytest -q tests

# The quick tests on the oldest MONAI that setup.cfg admits (supported = tested), in a venv of its own.
OLDEST_MONAI := 1.6.0
OLD_VENV     := .venv-monai$(OLDEST_MONAI)
$(OLD_VENV)/.misfm-installed: setup.cfg pyproject.toml
	test -x $(OLD_VENV)/bin/python || $(PYTHON) -m venv $(OLD_VENV)
	$(OLD_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OLD_VENV)/bin/python -m pip install --quiet torch==2.13.0
	# torch pinned again: a MONAI that wanted another torch must fail here, not pull a multi-GB CUDA build
	$(OLD_VENV)/bin/python -m pip install --quiet -e ".[demo,test,bench]" "monai==$(OLDEST_MONAI)" torch==2.13.0
	touch $@

test-oldest: $(OLD_VENV)/.misfm-installed
	PYTHONUTF8=1 $(OLD_VENV)/bin/python -m pytest -q -m "not slow" -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) benchmarks/bench_volume_fusion.py
	$(PY) benchmarks/bench_pctnet.py

clean:
	rm -rf $(VENV) $(OLD_VENV) outputs
