# Two entry points for a fresh machine: `make run` (the pipeline) and `make test`.
# Both create .venv and install the locked dependencies on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Prefect keeps its database and settings inside the project; analytics off (offline it errors every run).
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 300
export TOKENIZERS_PARALLELISM := false
export PREFECT_LOGGING_EXTRA_LOGGERS ?= gptflow,data,model,eval

.PHONY: setup run test check e2e llama-cpp server deploy worker image clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/gptflow pipeline $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest --durations=15 $(PYTEST_ARGS)

# llama.cpp itself (llama-cpp-python, built from source: about 6 minutes on 2 cores the first time; the wheel is kept
# in ~/.cache/gptflow/wheels, per CPU, and reused). The GGUF tests load our files in it; without it they are skipped.
llama-cpp: $(STAMP)
	PYTHON=$(BIN)/python scripts/install_llama_cpp.sh

# The edit-test loop (about 2 minutes): lint plus the unit tier, the tests that need no Prefect server, start no
# process and train no more than a few tiny steps (markers in pyproject.toml). `make test` runs them all.
UNIT := not slow and not server and not subprocess
check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -m "$(UNIT)" $(PYTEST_ARGS)

# A local Prefect server + process worker for the deployments of prefect.yaml (nightly pipeline, weekly
# pretraining, on-demand evaluation). `make server` in one terminal, then `make deploy` and `make worker`.
# These targets talk to PREFECT_API_URL when it is set, else to the local server; `make run` is unaffected
# (no PREFECT_API_URL: an ephemeral API).
PREFECT_PORT ?= 4200
LOCAL_API := http://127.0.0.1:$(PREFECT_PORT)/api
SERVER_API = $(or $(PREFECT_API_URL),$(LOCAL_API))
# The process pool of prefect.yaml (`make worker`); every pool is listed under its definitions.work_pools.
WORK_POOL := gptflow-process
# The image of the docker and kubernetes deployments (prefect.yaml reads it when they are registered).
GPTFLOW_IMAGE ?= gptflow:latest

server: $(STAMP)
	PREFECT_UI_API_URL=$(LOCAL_API) $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

deploy: $(STAMP)
	PREFECT_API_URL=$(SERVER_API) $(BIN)/python scripts/create_pools.py
	PREFECT_API_URL=$(SERVER_API) GPTFLOW_IMAGE=$(GPTFLOW_IMAGE) $(BIN)/prefect --no-prompt deploy --all

# The image of the container deployments, CPU torch. For NVIDIA GPUs (README: "Work pools"):
#   make image GPTFLOW_IMAGE=gptflow:cuda IMAGE_ARGS="--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130"
image:
	docker build $(IMAGE_ARGS) -t $(GPTFLOW_IMAGE) .

# GPTFLOW_REPO: the clone the deployments' pull step runs the code from.
worker: $(STAMP)
	GPTFLOW_REPO=$(CURDIR) PREFECT_API_URL=$(SERVER_API) $(BIN)/prefect worker start --pool $(WORK_POOL) \
		--type process --install-policy never

# Throwaway server + worker + headless Chromium: the nightly deployment with configs/tiny.yaml (scripts/e2e.py).
e2e: $(STAMP)
	$(BIN)/python scripts/e2e.py $(E2E_ARGS)

clean:
	rm -rf $(VENV) .prefect .pytest_cache
