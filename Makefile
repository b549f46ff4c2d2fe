# Two commands: `make demo` trains the default network and its dense twin, analyses both and
# writes the report; `make test` runs the tests. Both create .venv and install everything first.
# `make docs` builds the API reference from the docstrings (pdoc) into build/api/.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/default.yaml
BASELINE ?= configs/default_dense.yaml
NOW := $(shell date +%Y%m%d-%H%M%S)
DEMO_DIR ?= runs/demo-$(NOW)
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test lint docs install results clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# A CPU torch is installed first when missing: a bare `torch` requirement would pull CUDA wheels.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# Each line is a CLI command that can be re-run on its own; the last one prints the report path.
RUN := $(DEMO_DIR)/$(notdir $(basename $(CONFIG)))
BASE_RUN := $(DEMO_DIR)/$(notdir $(basename $(BASELINE)))
demo: $(STAMP)
	$(BIN)/neuroplex train $(CONFIG) --run-dir $(RUN)
	$(BIN)/neuroplex train $(BASELINE) --run-dir $(BASE_RUN)
	$(BIN)/neuroplex analyze $(RUN)
	$(BIN)/neuroplex analyze $(BASE_RUN)
	$(BIN)/neuroplex report $(RUN) --baseline $(BASE_RUN)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

docs: $(STAMP)
	$(BIN)/python scripts/build_docs.py build/api

results: $(STAMP)
	$(BIN)/python scripts/measure_results.py

clean:
	rm -rf $(VENV) runs
