# Two commands for a new user (see README):
#   make demo   — set everything up, then run the main job
#   make test   — set everything up, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup demo test bench clean

setup: $(VENV)/.ltjax-installed

$(VENV)/.ltjax-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test,bench,models]"
	touch $@

demo: setup
	$(PY) -m models.demo

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m benchmarks.pack

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
