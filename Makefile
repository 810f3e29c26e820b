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
PYTEST_ARGS ?= --durations=15
# make test runs on TEST_WORKERS processes (pytest-xdist, a test file per worker: its fixtures built once),
# each torch on one thread; TEST_WORKERS=0 runs in this process
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
TEST_ENV = $(if $(filter 0,$(TEST_WORKERS)),,OMP_NUM_THREADS=1 MKL_NUM_THREADS=1)
UV_PIN := uv==0.13.9

.PHONY: eval-mmeb hub-fixtures help setup test test-all test-faults bench gpu-check gpu-check-dry gpu-wheels demo train mine eval eval-mini bench-train bench-eval clean compat-v4 phi3v-parity \
	reproduce-zero-shot reproduce-e5v reproduce-train \
	data data-nli data-senteval data-flickr30k data-coco data-cirr data-fashioniq data-mmeb replicate-mini eval-mieb data-mieb
ARGS ?=
# Multi-GPU / multi-node: make reproduce-train GPUS=8 NODES=4 NODE_RANK=0 MASTER=host:29500
GPUS ?= 1
NODES ?= 1
NODE_RANK ?= 0
MASTER ?= 127.0.0.1:29500
RUN ?= paper
LAUNCH := $(VENV)/bin/torchrun --nnodes $(NODES) --node_rank $(NODE_RANK) --nproc_per_node $(GPUS) --rdzv_backend c10d --rdzv_endpoint $(MASTER)

help: ## list the targets
	@echo "E5-V: make <target>"
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-20s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv and install (CPU torch pinned first; REQUIREMENTS=requirements-gpu.txt on GPU)

$(VENV)/.installed: $(REQUIREMENTS) pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ "$(REQUIREMENTS)" = "requirements.txt" ]; then $(PIP) install -q torch==2.13.0; fi
	@# the rest through uv (parallel downloads and bytecode compilation: 42 s here against pip's ~115 s);
	@# plain pip where uv cannot run (no network: the GPU machine)
	$(PIP) install -q $(UV_PIN) && $(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode -r $(REQUIREMENTS) \
	  || $(PIP) install -q -r $(REQUIREMENTS)
	$(PIP) install -q --no-deps -e .
	touch $@

test: setup ## run the test suite (CPU, offline, slow tests excluded; TEST_WORKERS=2 processes)
	$(OFFLINE) $(TEST_ENV) $(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-all: setup ## run every CPU test, the slow ones too
	$(OFFLINE) $(TEST_ENV) $(PY) -m pytest $(XDIST) -m "not gpu" $(PYTEST_ARGS)

test-faults: setup ## fault-injection suite (kills, torn files, bad data, full disk, secrets), slow tests included
	$(OFFLINE) $(TEST_ENV) $(PY) -m pytest $(XDIST) tests/faults -m "slow or not slow" $(PYTEST_ARGS)

hub-fixtures: setup ## fetch the configured hub checkpoints' small files into tests/fixtures/hub/ (needs the hub; ARGS="qwen2_vl_7b ...")
	$(PY) -m scripts.fetch_hub_fixtures $(ARGS)

compat-v4: setup ## a merged checkpoint embeds the same in transformers 4.44.2 (the release's, mteb's): per-item cosines
	$(OFFLINE) $(PY) -m scripts.compat_v4 $(ARGS)

phi3v-parity: setup ## native Phi-3-V == the hub's remote code under transformers 4.44 (REMOTE=folder of its .py files)
	$(OFFLINE) $(PY) -m scripts.phi3v_remote_parity --remote-code $(REMOTE) $(ARGS)

demo: setup ## mini world: eval tiny_world -> train on text (DeepSpeed) -> eval -> before/after report (CPU, ~2 min)
	$(OFFLINE) $(PY) -m scripts.demo

train: setup ## train with configs/train.yaml (ARGS="experiment=tiny_cpu" etc.)
	$(PY) -m e5v.train $(ARGS)

mine: setup ## hard negatives for stage-2 rows with a trained model (configs/mine.yaml; ARGS="data=... checkpoint=...")
	$(PY) -m eval.mining $(ARGS)

eval: setup ## the paper's benchmarks with the released model (data under data/; ARGS="benchmarks=[sts]")
	$(PY) -m eval.cli suite=paper $(ARGS)

eval-mmeb: setup ## MMEB-V1, 36 tasks, Hit@1 (make data-mmeb first; ARGS="backbone=... 'benchmark.mmeb.tasks=[...]'")
	$(PY) -m eval.cli suite=mmeb $(ARGS)

eval-mini: setup ## evaluate the tiny model on generated data: every benchmark family, CPU, offline
	$(OFFLINE) $(PY) -m eval.cli backbone=tiny suite=mini $(ARGS)

eval-mieb: setup ## mteb's MIEB(lite) through our mteb encoder, offline (after make data-mieb); ARGS="--model tiny --tasks CUB200I2IRetrieval"
	$(OFFLINE) $(PY) -m eval.mieb run $(ARGS)

data-mieb: setup ## MIEB(lite) task datasets into the Hugging Face cache (HF_HOME; needs network; ARGS="--tasks ...")
	$(PY) -m eval.mieb prepare $(ARGS)

# Data root for `make data*` (default: $$E5V_DATA, else ./data); e.g. make data DATA_ROOT=/datasets/e5v
DATA_ROOT ?=
PREP := $(PY) -m scripts.prepare_data $(if $(DATA_ROOT),--data-root $(DATA_ROOT))

data: setup ## download, verify and convert every dataset (docs/data.md; ARGS="--check" re-verifies)
	$(PREP) all $(ARGS)

data-nli: setup ## NLI training triplets (princeton-nlp/datasets-for-simcse)
	$(PREP) nli $(ARGS)

data-senteval: setup ## STS12-16, STS-B, SICK-R test sets (SimCSE's senteval.tar)
	$(PREP) senteval $(ARGS)

data-flickr30k: setup ## Flickr30K Karpathy test (ARGS="--source nlphuji" for the original files)
	$(PREP) flickr30k $(ARGS)

data-coco: setup ## COCO Karpathy 5K test (ARGS="--source karpathy" for val2014 + Karpathy annotations)
	$(PREP) coco $(ARGS)

data-cirr: setup ## CIRR annotations; says how to request the NLVR2 images, then verifies them
	$(PREP) cirr $(ARGS)

data-fashioniq: setup ## FashionIQ val annotations and images
	$(PREP) fashioniq $(ARGS)

data-mmeb: setup ## MMEB-V1 eval data: 36 task parquets + the images they name (TIGER-Lab/MMEB-eval)
	$(PREP) mmeb $(ARGS)

replicate-mini: setup ## mini-world Tables 6+7 + MMEB-mini + stage 2 (mined negatives, Matryoshka), 3 seeds (CPU, ~8 min; ARGS=--no-stage2: ~4 min)
	$(OFFLINE) $(PY) -m scripts.replicate_mini $(ARGS)

reproduce-zero-shot: setup ## Table 6 row 1: LLaVA-NeXT-8B + E5-V prompts, no fine-tuning, every benchmark
	$(LAUNCH) -m eval.cli suite=paper backbone=llava_next_llama3_8b report.reference=llava_next_8b_prompt $(ARGS)

reproduce-e5v: setup ## Tables 1-5: the released royokong/e5-v on every benchmark
	$(LAUNCH) -m eval.cli suite=paper backbone=e5v $(ARGS)

reproduce-train: setup ## the paper recipe (experiment=paper; GPUS x NODES = 32 as released), then the full suite
	$(LAUNCH) -m e5v.train experiment=paper run_name=$(RUN) $(ARGS)
	$(LAUNCH) -m eval.cli suite=paper backbone=llava_next_llama3_8b checkpoint=outputs/train/$(RUN)

bench: setup ## CPU benchmarks -> docs/benchmarks.md (15-45 min on 2 cores, mostly the 10^6 search)
	$(OFFLINE) $(PY) -m scripts.bench_encode $(ARGS)
	$(OFFLINE) $(PY) -m scripts.bench_train
	$(OFFLINE) $(PY) -m scripts.bench_search
	$(OFFLINE) $(PY) -m scripts.bench_eval
	$(OFFLINE) $(PY) -m scripts.bench_tiles

gpu-check: ## one H100/H200, no network: CUDA tests, ZeRO-2 step, 8B-shape encode + GradCache benchmarks (stage 1, stage 2), < 10 min (OUT=dir)
	scripts/gpu_check.sh

gpu-wheels: ## download the wheels the offline GPU machine lacks into .gpu-wheels/ (needs network; carry it there)
	PYTHON=$(PY) scripts/gpu_wheels.sh

gpu-check-dry: setup ## the GPU check's CPU dry run (everything except CUDA work)
	$(OFFLINE) PYTHON=$(PY) scripts/gpu_check.sh --dry-run

bench-eval: setup ## embedding cache: the same eval command cold, then warm (prints the ratio)
	$(OFFLINE) $(PY) -m scripts.bench_eval $(ARGS)

bench-train: setup ## training throughput, plain vs GradCache, padded vs packed (ARGS for scripts/bench_train.py; ARGS="--data stage2": mini MMEB-train)
	$(OFFLINE) $(PY) -m scripts.bench_train $(ARGS)

clean: ## remove evaluation/demo outputs and caches; keeps .venv and trained runs (outputs/train, outputs/sweeps) unless ALL=1
	rm -rf .pytest_cache
	@if [ "$(ALL)" = "1" ]; then rm -rf outputs; echo "removed outputs/ (trained checkpoints included)"; \
	elif [ -d outputs ]; then find outputs -mindepth 1 -maxdepth 1 ! -name train ! -name sweeps -exec rm -rf {} +; \
	  echo "kept outputs/train and outputs/sweeps (trained checkpoints); make clean ALL=1 removes them too"; fi
