# `make train` and `make test` set up .venv themselves (once) and then do their job.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch first, pinned, so pip takes the local wheels and never a multi-GB download.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: train test test-fast lint format bench mlflow clean-venv gpu-check gpu-wheels

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/pipeline train --config jobs/configs/digits.yaml

# The whole suite (CI: .ci/run), with the 25 slowest tests and fixtures listed at the end. Two
# test processes, each module whole in one of them (its module fixtures start once; the modules
# that share the session's trained model together), the slowest first (tests/conftest.py:
# SLOW_MODULES, TRAINED_MODEL_USERS) so that the short ones even out the end.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=25

# The inner loop: tests marked `quick` (every unit test, and integration tests without Ray).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m quick --durations=10

lint: $(STAMP)
	$(BIN)/ruff check pipeline jobs tests
	$(BIN)/ruff format --check pipeline jobs tests

format: $(STAMP)
	$(BIN)/ruff format pipeline jobs tests
	$(BIN)/ruff check --fix pipeline jobs tests

# A tracking server for every command (MLFLOW_TRACKING_URI=http://127.0.0.1:5000). Override e.g.
# make mlflow MLFLOW_BACKEND=postgresql://mlflow@db/mlflow MLFLOW_ARTIFACTS=s3://bucket/mlflow
MLFLOW_BACKEND ?= sqlite:///mlflow.db
MLFLOW_ARTIFACTS ?= ./mlartifacts
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
mlflow: $(STAMP)
	@# (not echoed: the backend URI may hold a password)
	@$(BIN)/pipeline server mlflow --backend-store-uri '$(MLFLOW_BACKEND)' \
		--artifacts-destination '$(MLFLOW_ARTIFACTS)' --host $(MLFLOW_HOST) --port $(MLFLOW_PORT)

# On the lent GPU machine (no venv, no Ray or MLflow): every GPU check in one command, results in
# jobs/bench/results/gpu_check.json and $$OUT. Fetch the wheels it carries here first:
# `make gpu-wheels` (into .whl/, ignored by git). `GPU_CHECK_ARGS=--dry-run` runs it on a CPU.
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
gpu-check:
	bash jobs/bench/gpu_env.sh $(GPU_PYTHON) jobs/bench/gpu_check.py $(GPU_CHECK_ARGS)

gpu-wheels: $(STAMP)
	PYTHON=$(BIN)/python bash jobs/bench/gpu_wheels.sh

clean-venv:
	rm -rf $(VENV)
