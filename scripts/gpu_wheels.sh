#!/usr/bin/env bash
# Download the wheels the offline GPU machine lacks into an ignored folder (default .gpu-wheels/), for
# scripts/gpu_check.sh to install there without network. Run it on a machine WITH network, then carry the
# folder to the GPU machine with the working tree (it is ignored by git: carry it explicitly).
#
#   scripts/gpu_wheels.sh                  # -> .gpu-wheels/   (~6 MB, 15 wheels)
#   scripts/gpu_wheels.sh /some/folder     # elsewhere; then E5V_GPU_WHEELS=/some/folder scripts/gpu_check.sh
#
# What and why: the GPU image has CPython 3.12 with torch, transformers, peft, accelerate, pytest, pillow,
# pyarrow ...; it lacks deepspeed and its needs (hjson, pydantic, pydantic-core, annotated-types,
# typing-inspection, typing-extensions), hydra-core, omegaconf, antlr4-python3-runtime, datasets (+ dill,
# multiprocess), num2words (+ docopt; SmolVLM's processor). deepspeed, antlr4 and docopt publish only sdists:
# they are built here into py3-none-any wheels (no DeepSpeed ops prebuilt; none are needed for ZeRO-2 with torch.optim.AdamW). The others are the cp312
# manylinux x86_64 (or pure-Python) wheels. deepspeed, hydra-core, omegaconf and datasets take their
# versions from requirements-gpu.txt; their needs are pinned below.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-${E5V_GPU_WHEELS:-$REPO/.gpu-wheels}}"
PY="${PYTHON:-python3}"

pin() {  # pin PACKAGE: "PACKAGE==VERSION" as requirements-gpu.txt pins it
  local line
  line="$(grep -iE "^$1==" "$REPO/requirements-gpu.txt")" || { echo "requirements-gpu.txt pins no $1" >&2; exit 1; }
  echo "$line"
}

BUILT=("$(pin deepspeed)" antlr4-python3-runtime==4.9.3 docopt==0.6.2)  # sdists only
DOWNLOADED=("$(pin hydra-core)" "$(pin omegaconf)" "$(pin datasets)" hjson==3.1.0 pydantic==2.14.4
            pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
            dill==0.4.1 multiprocess==0.70.19 "$(pin num2words)")

mkdir -p "$DEST"
echo "building the sdist-only packages into $DEST: ${BUILT[*]}"
$PY -m pip wheel -q --no-deps -w "$DEST" "${BUILT[@]}"
echo "downloading cp312 manylinux x86_64 / pure-Python wheels into $DEST"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" \
  "${DOWNLOADED[@]}"
ls -1 "$DEST"/*.whl
echo "$(ls "$DEST"/*.whl | wc -l) wheels in $DEST ($(du -sh "$DEST" | cut -f1)); carry this folder to the GPU machine"
