# E5-V: universal multimodal embeddings with multimodal LLMs.  `make` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
REQUIREMENTS ?= requirements.txt
# Offline by default: tests and the demo never touch the network.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
PYTEST_ARGS ?=

.PHONY: help setup test test-all demo train eval eval-mini bench-train bench-eval clean
ARGS ?=

help: ## list the targets
	@echo "E5-V: make <target>"
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv and install (CPU torch pinned first; REQUIREMENTS=requirements-gpu.txt on GPU)

$(VENV)/.installed: $(REQUIREMENTS) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ "$(REQUIREMENTS)" = "requirements.txt" ]; then $(PIP) install -q torch==2.13.0; fi
	$(PIP) install -q -r $(REQUIREMENTS)
	$(PIP) install -q --no-deps -e .
	touch $@

test: setup ## run the test suite (CPU, offline, slow tests excluded)
	$(OFFLINE) $(PY) -m pytest $(PYTEST_ARGS)

test-all: setup ## run every CPU test, the slow ones too
	$(OFFLINE) $(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

demo: setup ## run the embedder end to end on the tiny offline backbone
	$(OFFLINE) $(PY) scripts/demo.py

train: setup ## train with configs/train.yaml (ARGS="experiment=tiny_cpu" etc.)
	$(PY) -m e5v.train $(ARGS)

eval: setup ## the paper's benchmarks with the released model (data under data/; ARGS="benchmarks=[sts]")
	$(PY) -m eval.run suite=paper $(ARGS)

eval-mini: setup ## evaluate the tiny model on generated data: every benchmark family, CPU, offline
	$(OFFLINE) $(PY) -m eval.run backbone=tiny suite=mini $(ARGS)

bench-eval: setup ## embedding cache: the same eval command cold, then warm (prints the ratio)
	$(OFFLINE) $(PY) scripts/bench_eval.py $(ARGS)

bench-train: setup ## training throughput, plain vs GradCache (ARGS for scripts/bench_train.py)
	$(OFFLINE) $(PY) scripts/bench_train.py $(ARGS)

clean: ## remove outputs and caches (keeps .venv)
	rm -rf outputs .pytest_cache
