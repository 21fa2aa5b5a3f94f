WORKERS ?= 2  # pytest-xdist processes for make test (each test runs on one thread)

.PHONY: help install lint format test test-slow test-all demo toy-check bench

help:      ## list targets
	@grep -E '^[a-z-]+:.*## ' Makefile | awk 'BEGIN{FS=":.*## "}{printf "  %-9s %s\n",$$1,$$2}'

install:   ## editable install with dev tools (torch + torchvision as a matching registry pair)
	pip install -e ".[dev]"

lint:      ## what CI checks: ruff lint + format check
	ruff check clipadapt tests benchmarks
	ruff format --check clipadapt tests benchmarks

format:    ## fix what ruff can fix
	ruff check --fix clipadapt tests benchmarks
	ruff format clipadapt tests benchmarks

test:      ## the fast suite: CPU, tiny models, synthetic data, < 10 min on a loaded 2-core machine
	python -m pytest -n $(WORKERS) --dist loadfile -m "not slow and not gpu and not pretrained"

test-slow: ## what make test leaves out: multi-process DDP / torchrun / sweep runs and the notebooks (CI runs it)
	python -m pytest -m "slow and not gpu and not pretrained"

test-all:  ## everything this machine can run (pretrained tests need CLIPADAPT_PRETRAINED_FILE)
	python -m pytest

demo:      ## offline: CLIP-AST adapts the shipped toy CLIP to a shifted toy domain (~1-2 min CPU)
	clipadapt fit --config configs/demo.yaml

toy-check: ## retrain the shipped toy CLIP (~10 min on 2 cores) and compare with its manifest
	clipadapt pretrain-toy --check

bench:     ## speed benchmarks on the present device (CPU here; GPU when there is one)
	python benchmarks/text_encoder.py
	for m in ast adapt rada cite; do python benchmarks/methods.py --method $$m; done
	python benchmarks/prompting.py
	python benchmarks/cli_startup.py
	python benchmarks/towers.py
	python benchmarks/compile.py
	python benchmarks/rada_eft.py
	python benchmarks/feature_cache.py
	python benchmarks/train_features.py
	python benchmarks/loader.py
