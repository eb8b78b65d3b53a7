#!/usr/bin/env bash
# On a GPU machine: the training step of this checkout against another one (an older commit's
# worktree), in one call, so both run on the same card at the same temperature:
#   bash benchmarks/gpu_train_ab.sh BASE_CHECKOUT OUT_DIR [CASES...]
# CASES: 27k (the 27K recipe's shape: histories up to 7,894, 32 rows and a 131,072-token
# budget) and 1k (histories capped at 1,024, 32 rows); default both. Needs torch, triton,
# torchrec, fbgemm-gpu and the config loader's protobuf/grpcio-tools importable.
set -uo pipefail
base=${1:?usage: gpu_train_ab.sh BASE_CHECKOUT OUT_DIR [27k] [1k]}
out=${2:?usage: gpu_train_ab.sh BASE_CHECKOUT OUT_DIR [27k] [1k]}
shift 2
cases=("${@:-27k 1k}")
[ $# -eq 0 ] && cases=(27k 1k)
common=(--device cuda --kernels TRITON --workers 1 --table-rows 0 --steps 6 --warmup 2
        --batches 3 --find-syncs)
mkdir -p "$out"
run() {
  local dir=$1 tag=$2
  shift 2
  echo "== $tag ($dir)"
  (cd "$dir" && python3 benchmarks/train_bench.py "${common[@]}" "$@" --json "$out/$tag.json") \
    > "$out/$tag.log" 2>&1
  echo "exit $?"
  grep -v -e Warning -e warn "$out/$tag.log" | grep -A40 "^kernel |" | head -40
}
for case in "${cases[@]}"; do
  case "$case" in
    27k) shape=(--max-history 7894 --batch-size 32 --token-budget 0 131072) ;;
    1k) shape=(--max-history 1024 --batch-size 32) ;;
    *) echo "unknown case $case" >&2; exit 2 ;;
  esac
  run . "new$case" "${shape[@]}"
  run "$base" "base$case" "${shape[@]}"
done
