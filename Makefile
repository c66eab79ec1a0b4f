# flowalign: the two commands a new user needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to releases that exist on the CPU build machines; any newer torch also works.
TORCH := "torch>=2.4,<=2.14.1" "torchvision<=0.29.1"

.PHONY: demo test lint install-dev install

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH) -e .

install-dev: $(BIN)/python
	$(BIN)/pip install -q $(TORCH) -e ".[dev,video]"

demo: install
	$(BIN)/flowalign train configs/crd/shapes.yaml out=runs/demo

test: install-dev
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

lint: install-dev
	$(BIN)/ruff check flowalign tests benchmarks
