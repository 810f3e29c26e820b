#!/usr/bin/env bash
# GPU check: one command, under 10 minutes (one device command's limit), on one H100/H200 machine without
# network access.
#
#   scripts/gpu_check.sh              # the real check (needs CUDA); figures land in $OUT (default outputs/gpu_check)
#   scripts/gpu_check.sh --dry-run    # everything except CUDA work, on any CPU machine (the test suite runs this)
#   scripts/gpu_check.sh --list       # the stages and their time budgets
#   scripts/gpu_check.sh --only env,tests      # a subset of the stages
#
# The machine is expected to have Python 3.12 with torch, transformers, peft and accelerate. Every other
# package comes as wheels (pure-Python or cp312 manylinux x86_64) that scripts/gpu_wheels.sh downloads,
# on a machine with network, into the git-ignored folder $E5V_GPU_WHEELS (default .gpu-wheels/, ~6 MB);
# carry that folder to the GPU machine with the working tree (ignored files do not travel by themselves).
# They are installed without network into a private folder prepended to PYTHONPATH ($E5V_WHEEL_SITE,
# default /tmp/e5v-site): deepspeed and its missing needs (hjson, pydantic, pydantic-core, annotated-types,
# typing-inspection, typing-extensions), hydra-core, omegaconf, antlr4-python3-runtime, datasets (+ dill,
# multiprocess). Only the env stage of the real check needs them, and only for packages the machine lacks.
#
# Stages (each under `timeout`, so the whole check ends within its budget even when one stage hangs;
# a failed stage is reported and the next one still runs; exit status 1 if any failed):
#   env     versions, GPU, wheel install, imports                                     (budget  30 s)
#   tests   pytest -m gpu: tiny model in bf16 on CUDA (parity with fp32, batch invariance, packed vs padded,
#           workers), DeepSpeed ZeRO-2 steps on CUDA: text and image-caption, plain and GradCache (budget 80 s)
#   encode  python -m scripts.bench_encode on llava_next_8b_shape in bf16: ours padded, ours packed, released;
#           MFU, paper-suite estimate, padding share                                     (budget 170 s)
#   compile the same on 4 layers of the 8B shape, text only: ours eager vs torch.compile'd decoder, its
#           warm-up timed apart (per-layer kernels: the ratio carries to 32 layers, the warm-up grows) (budget 50 s)
#   train   python -m scripts.bench_train on llava_next_8b_shape: global batch 768 by GradCache vs plain,
#           each padded and packed, LoRA r=64, activation checkpointing, bf16, ZeRO-2  (budget 150 s)
#   train2  the same for stage 2 (--data stage2: the mini MMEB-train mixture, image / image+text / text rows in
#           homogeneous sub-batches, ~1,240 tokens per image item) on 4 layers of the 8B shape: global batch 64
#           by GradCache vs plain (micro 16), each padded and packed                  (budget 100 s)
# In --dry-run the same stages run on the CPU with the tiny model and tiny sizes: env checks the imports
# (no wheels needed), tests only collects the gpu tests, encode, compile, train and train2 run their CPU versions.
#
# Output in $OUT: gpu_check.log (everything printed), gpu_check.md (summary + the benchmark tables),
# bench_encode.{json,md}, compile/bench_encode.{json,md}, bench_train.{json,md}, stage2/bench_train.{json,md}
# (10 files).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DRY=0
ONLY=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --list) LIST=1 ;;
    --only=*) ONLY="${arg#--only=}" ;;
    --only) ONLY="__next__" ;;
    -h|--help) sed -n '2,38p' "$0"; exit 0 ;;
    *) if [ "$ONLY" = "__next__" ]; then ONLY="$arg"; else echo "unknown argument: $arg" >&2; exit 2; fi ;;
  esac
done
[ "$ONLY" = "__next__" ] && { echo "--only needs a comma-separated list of stages" >&2; exit 2; }

STAGES=(env tests encode compile train train2)
declare -A BUDGET=([env]=30 [tests]=80 [encode]=170 [compile]=50 [train]=150 [train2]=100)
TOTAL_BUDGET=580  # one device command may run 600 s; the machine's start comes on top (15 min of device time)
if [ "${LIST:-0}" = 1 ]; then
  sum=0
  for s in "${STAGES[@]}"; do echo "$s ${BUDGET[$s]}"; sum=$((sum + BUDGET[$s])); done
  echo "total $sum (limit $TOTAL_BUDGET)"
  exit 0
fi
# The dry run checks the plumbing on a CPU, not the GPU's timing: a cold inductor compile of the tiny model on 2
# loaded cores took 50-90 s (2026-12-02, beside another test process), so its compile stage gets 150 s.
[ "$DRY" = 1 ] && BUDGET[compile]=150

PY="${PYTHON:-python3}"
OUT="${OUT:-$REPO/outputs/gpu_check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export OUT
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/gpu_check.md"
: > "$LOG"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline E5V_NO_PROGRESS=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
T_START=$SECONDS
declare -A STATUS=()
FAILED=0

want() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

say() { echo "$*" | tee -a "$LOG"; }

run_stage() {  # run_stage NAME COMMAND...: under timeout, output to the log and the terminal
  local name="$1"; shift
  local budget="${BUDGET[$name]}"
  if ! want "$name"; then STATUS[$name]="skipped"; return 0; fi
  say ""
  say "=== $name (budget ${budget}s, elapsed $((SECONDS - T_START))s) ==="
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$budget" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local dt=$((SECONDS - t0))
  if [ "$rc" = 0 ]; then
    STATUS[$name]="ok (${dt}s)"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    STATUS[$name]="TIMEOUT after ${dt}s (budget ${budget}s)"; FAILED=1
  else
    STATUS[$name]="FAILED (exit $rc, ${dt}s)"; FAILED=1
  fi
  say "=== $name: ${STATUS[$name]} ==="
}

# ---------------------------------------------------------------- env
stage_env() {
  set -e
  echo "repo: $REPO   python: $($PY -c 'import sys; print(sys.version.split()[0])')   dry-run: $DRY"
  if [ "$DRY" = 0 ]; then
    nvidia-smi -L || true
    missing=$($PY - <<'EOF'
import importlib.util
need = ["deepspeed", "hydra", "omegaconf", "datasets", "pydantic", "hjson", "antlr4", "PIL", "pytest"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)
    if [ -n "$missing" ]; then
      wheels="${E5V_GPU_WHEELS:-$REPO/.gpu-wheels}"
      echo "not installed here: $missing -> installing $wheels/*.whl (no network) into ${E5V_WHEEL_SITE:-/tmp/e5v-site}"
      ls "$wheels"/*.whl >/dev/null 2>&1 || {
        echo "$wheels holds no wheels: run scripts/gpu_wheels.sh on a machine with network and carry the folder here"
        exit 1
      }
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "${E5V_WHEEL_SITE:-/tmp/e5v-site}" "$wheels"/*.whl
    fi
  fi
  $PY - <<'EOF'
import importlib, sys
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", "sm", f"{p.major}.{p.minor}")
for m in ("transformers", "peft", "accelerate", "deepspeed", "hydra", "omegaconf", "datasets", "pyarrow", "PIL", "pytest"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m} {getattr(mod, '__version__', '?')}")
    except Exception as e:  # report every missing piece before failing
        print(f"  {m} IMPORT FAILED: {type(e).__name__}: {e}")
        sys.exit(1)
import e5v.embedder, e5v.train  # noqa: F401  (the project imports)
print("imports ok")
EOF
}

# ---------------------------------------------------------------- the stages
if [ "$DRY" = 0 ]; then
  export PYTHONPATH="${E5V_WHEEL_SITE:-/tmp/e5v-site}:$PYTHONPATH"
fi
run_stage env bash -c "$(declare -f stage_env); DRY=$DRY PY='$PY' REPO='$REPO' stage_env"

if [ "$DRY" = 1 ]; then
  run_stage tests "$PY" -m pytest -q -p no:cacheprovider -m gpu --collect-only tests/test_gpu.py
  run_stage encode "$PY" -m scripts.bench_encode --backbone tiny --device cpu --n-text 32 --n-image 6 \
    --batch-size 16 --rounds 1 --no-append
  run_stage compile env OUT="$OUT/compile" "$PY" -m scripts.bench_encode --backbone tiny --device cpu --kinds text \
    --n-text 32 --n-released 4 --batch-size 16 --rounds 1 --no-packed --compile --no-append
  run_stage train "$PY" -m scripts.bench_train --backbone tiny --global-batch 32 --micro 16 --steps 1 \
    --warmup 0 --rounds 1 --lora-r 8 --no-append
  run_stage train2 env OUT="$OUT/stage2" "$PY" -m scripts.bench_train --data stage2 --backbone tiny \
    --global-batch 32 --micro 16 --steps 1 --warmup 0 --rounds 1 --lora-r 8 --no-append
else
  run_stage tests "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
  run_stage encode "$PY" -m scripts.bench_encode --backbone llava_next_8b_shape --dtype bfloat16 \
    --n-text 2048 --n-image 96 --n-released 32 --batch-size 64 --max-batch-tokens 65536 --num-workers 6 \
    --rounds 2 --attn auto
  run_stage compile env OUT="$OUT/compile" "$PY" -m scripts.bench_encode --backbone llava_next_8b_shape \
    --dtype bfloat16 --layers 4 --kinds text --n-text 1024 --n-released 8 --batch-size 64 --max-batch-tokens 65536 \
    --rounds 2 --attn auto --no-packed --compile
  run_stage train "$PY" -m scripts.bench_train --backbone llava_next_8b_shape --global-batch 768 --micro 32 \
    --precision bf16 --activation-checkpointing --lora-r 64 --steps 1 --warmup 1 --rounds 1 --attn auto
  run_stage train2 env OUT="$OUT/stage2" "$PY" -m scripts.bench_train --data stage2 \
    --backbone llava_next_8b_shape --layers 4 --global-batch 64 --micro 16 --precision bf16 \
    --activation-checkpointing --lora-r 64 --steps 1 --warmup 1 --rounds 1 --attn auto
fi

# ---------------------------------------------------------------- summary
{
  echo "# GPU check $(date '+%Y-%m-%d %H:%M') ($([ "$DRY" = 1 ] && echo dry-run || echo CUDA))"
  echo
  echo "| stage | result |"
  echo "|---|---|"
  for s in "${STAGES[@]}"; do echo "| $s | ${STATUS[$s]:-not run} |"; done
  echo
  echo "Total: $((SECONDS - T_START)) s (limit $TOTAL_BUDGET s)."
  echo
  # the benchmark tables (also appended to docs/benchmarks.md on that machine, outside --dry-run)
  for f in "$OUT"/bench_encode.md "$OUT"/compile/bench_encode.md "$OUT"/bench_train.md "$OUT"/stage2/bench_train.md; do
    [ -f "$f" ] && { cat "$f"; echo; }
  done
} > "$SUMMARY"
cat "$SUMMARY"
exit $FAILED
