# Set-up and everyday commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=
# Test processes (pytest-xdist), one torch thread each; a file runs whole on one worker (its
# fixtures built once), but tests/conftest.py's SPREAD files go test by test. 0: one process.
PYTEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),-p no:xdist,-n $(PYTEST_WORKERS) --dist loadfile)

.DEFAULT_GOAL := help
.PHONY: help install run test test-slow test-all lint format bench tables fidelity device-kit clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

install: $(VENV)/.installed ## Create .venv and install the project (torch, torchvision, timm, hydra, ...)

run: install ## Run the default experiment (BadNets, mnist5k, small_cnn, undefended); ARGS="..." adds overrides
	$(PY) -m benchmark.run $(ARGS)

test: install ## Run the CPU test suite without the tests marked slow (under 10 min on 2 cores)
	$(PY) -m pytest -m "not slow and not gpu" $(XDIST) $(PYTEST_ARGS)

test-slow: install ## Run the tests marked slow (training runs, sweeps, kill-and-resume)
	$(PY) -m pytest -m "slow and not gpu" $(XDIST) $(PYTEST_ARGS)

test-all: install ## Both: the whole CPU suite (what CI runs, as test then test-slow)
	$(PY) -m pytest -m "not gpu" $(XDIST) $(PYTEST_ARGS)

lint: install ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install ## Format and autofix with ruff
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install ## Benchmarks -> results/bench/{train_throughput,sweep,fast_track}.json (fit() speed; smoke_all wall time, cache hits; fastnet + train=fast)
	$(PY) scripts/bench_train.py $(ARGS)
	$(PY) scripts/bench_sweep.py
	$(PY) scripts/bench_fast.py

tables: install ## Collect outputs/**/metrics.json -> results/tables/
	$(PY) scripts/make_tables.py outputs $(ARGS)

fidelity: install ## Ours vs published numbers for every reference row, and why not -> results/fidelity/
	$(PY) scripts/fidelity.py outputs $(ARGS)

# The device machine has torch but not these pure-Python packages, and no network.
DEVICE_WHEELS := hydra-core==1.3.8 omegaconf==2.3.1 mlxtend==0.25.0
device-kit: install ## Wheels the GPU machine lacks (.whl/) and the CIFAR-10 folder (.device/) for scripts/device_check.sh
	mkdir -p .whl .device
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform any -d .whl $(DEVICE_WHEELS)
	$(PY) -m pip wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3
	cp ../shared/data/cifar10-jpeg.tar.gz .device/

clean: ## Remove caches and run outputs (keeps .venv and data/)
	rm -rf outputs multirun wandb .cache .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -not -path './.venv/*' -prune -exec rm -rf {} +
