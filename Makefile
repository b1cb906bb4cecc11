# Quick start: `make demo` trains the default model on the built-in corpus; `make test` runs the tests.
# Both create a virtualenv in .venv (override with VENV=...) and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bltjax-installed

.PHONY: demo test venv clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m bltjax.cli demo --workdir runs/demo

# A test whose xdist worker dies runs once more, in a fresh worker: XLA:CPU's compiler
# segfaulted in a long-lived worker in 3 of the last 7 full runs (2 here, 1 in CI; the
# test passes alone every time). An ordinary failure is never rerun (--only-rerun
# matches only the worker-crash report); a test that crashes twice fails. The 25 slowest
# tests are listed at the end, to keep the suite's time in view.
test: $(STAMP)
	$(PY) -m pytest -n 2 --reruns 1 --only-rerun "crashed while running" --durations=25 tests

clean:
	rm -rf $(VENV) runs
