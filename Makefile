# `make train` and `make test` set up .venv themselves (once) and then do their job.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch first, pinned, so pip takes the local wheels and never a multi-GB download.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: train test lint format bench mlflow clean-venv

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/pipeline train --config jobs/configs/digits.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check pipeline jobs tests
	$(BIN)/ruff format --check pipeline jobs tests

format: $(STAMP)
	$(BIN)/ruff format pipeline jobs tests
	$(BIN)/ruff check --fix pipeline jobs tests

clean-venv:
	rm -rf $(VENV)
