# Two commands on a fresh machine:  `make demo` (set up + main job)  and  `make test` (set up + tests).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.misfm-installed

.PHONY: setup demo test bench clean

# torch==2.13.0 first: an unpinned torch would pull a multi-GB CUDA build on a CPU-only machine.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m misfm_demo

# UTF-8 mode: the subprocess logs read by the tests hold non-ASCII text, whatever locale a library sets.
test: $(STAMP)
	PYTHONUTF8=1 $(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/bench_volume_fusion.py
	$(PY) benchmarks/bench_pctnet.py

clean:
	rm -rf $(VENV) outputs
