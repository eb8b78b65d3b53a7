#!/usr/bin/env bash
# On a GPU machine, without TorchRec: the dense encoder and the attention of this checkout
# against another one (an older commit's worktree), in one call, so both run on the same card:
#   bash benchmarks/gpu_encoder_ab.sh BASE_CHECKOUT OUT_DIR
# Runs the bf16 GPU tests of the Triton ops first (fp32 compiles for minutes: run
# `pytest tests/ops/triton -m gpu` for those), then encoder_bench at the 27K step's
# long-tailed 131K-token batch and at 32 x 1,024 (this checkout also with TRITON_SEPARATE: the
# STU layer as three ops instead of the fused node), and attention_row_order, in both checkouts.
# The base checkout gets this checkout's two benchmark scripts (older ones may lack the
# tokensN shapes); what they import from the package is the base's own.
set -uo pipefail
base=${1:?usage: gpu_encoder_ab.sh BASE_CHECKOUT OUT_DIR}
out=${2:?usage: gpu_encoder_ab.sh BASE_CHECKOUT OUT_DIR}
mkdir -p "$out"
here=$(pwd)
cp benchmarks/encoder_bench.py benchmarks/attention_row_order.py "$base/benchmarks/"
python3 -m pytest -q -m gpu -k "dtype0 or odd_head or serving_size" tests/ops/triton 2>&1 | tail -3
for side in new base; do
  dir=$here; kernels="TRITON TRITON_SEPARATE"
  [ "$side" = base ] && dir=$base && kernels=TRITON
  (cd "$dir" && python3 benchmarks/encoder_bench.py --shapes tokens131072 32x1024 \
    --kernels $kernels --repeats 10 --out "$out/$side" > "$out/encoder_$side.log" 2>&1)
  echo "== encoder $side exit $?"; grep -A3 "^kernel " "$out/encoder_$side.log"
  (cd "$dir" && python3 benchmarks/attention_row_order.py --batches 2 \
    --json "$out/row_order_$side.json" > "$out/row_order_$side.log" 2>&1)
  echo "== attention $side exit $?"; grep "sort_by_length" "$out/row_order_$side.log"
done
