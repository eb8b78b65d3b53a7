#!/usr/bin/env bash
# On one host with several GPUs (issue 14): weak scaling, sharding plans and 1-vs-N equivalence
# of the training step, with benchmarks/train_bench.py (NCCL, no Ray):
#   bash benchmarks/gpu_scaling.sh OUT_DIR [MAX_GPUS]
# MAX_GPUS defaults to every GPU nvidia-smi lists. Needs torch, triton, torchrec, fbgemm-gpu
# and the config loader's protobuf/grpcio-tools. NOT YET RUN: no machine with more than one GPU
# has been available to this project (docs/BENCHMARKS.md, "Several GPUs").
#
# 1. Weak scaling: each worker its own 131,072-token batches of the 27K recipe's shape, N = 1,
#    2, 4, 8 up to MAX_GPUS; the table's "vs 1 worker" column is tokens/s per GPU over one GPU's,
#    and "communication ms" the NCCL kernels' time per step (the JSON's profile also has the part
#    of it that no compute overlapped: exposed_communication_ms).
# 2. The two big tables forced table-wise, row-wise and column-wise at the largest N.
# 3. Equivalence: the same global batches (32 rows, split over the workers) and seed on 1 and 2
#    GPUs for 100 steps, dropout off, then an evaluation on 20 more global batches: train_bench
#    prints the largest step-wise loss difference and the largest eval AUC difference.
set -uo pipefail
out=${1:?usage: gpu_scaling.sh OUT_DIR [MAX_GPUS]}
gpus=${2:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
mkdir -p "$out"
counts=()
for n in 1 2 4 8; do [ "$n" -le "$gpus" ] && counts+=("$n"); done
[ ${#counts[@]} -gt 0 ] || { echo "gpu_scaling.sh: no GPU found (MAX_GPUS $gpus)" >&2; exit 2; }
largest=${counts[-1]}
failed=0
check() {  # check NAME: after a `train_bench ... | tee | grep` pipeline, report a failed run
  local status=${PIPESTATUS[0]}
  [ "$status" -eq 0 ] || { echo "!! $1 failed (exit $status): see $out/$1.log"; failed=1; }
}
shape=(--device cuda --kernels TRITON --table-rows 0 --max-history 7894 --batch-size 32
       --warmup 2 --steps 6 --batches 3)
echo "== weak scaling: workers ${counts[*]}"
python3 benchmarks/train_bench.py "${shape[@]}" --token-budget 131072 --workers "${counts[@]}" \
  --json "$out/weak_scaling.json" 2>&1 | tee "$out/weak_scaling.log" | grep -v -i warn | grep -A12 "^kernel |"
check weak_scaling
for plan in table_wise row_wise column_wise; do
  echo "== $largest workers, video_id_emb and user_id_emb $plan"
  python3 benchmarks/train_bench.py "${shape[@]}" --token-budget 131072 --workers "$largest" \
    --sharding "video_id_emb=$plan" --sharding "user_id_emb=$plan" \
    --json "$out/plan_$plan.json" 2>&1 | tee "$out/plan_$plan.log" | grep -v -i warn | grep -A4 "^kernel |"
  check "plan_$plan"
done
if [ "$gpus" -ge 2 ]; then
  echo "== equivalence: 1 and 2 workers, the same 100 global batches of 32 rows, dropout off"
  python3 benchmarks/train_bench.py --device cuda --kernels TRITON --table-rows 0 \
    --max-history 7894 --batch-size 32 --split-global --workers 1 2 --warmup 0 --steps 100 \
    --batches 100 --eval-batches 20 --profile-steps 0 \
    --set model_config.dlrm_hstu.hstu.input_dropout_ratio=0 \
    --set model_config.dlrm_hstu.hstu.stu.output_dropout_ratio=0 \
    --json "$out/equivalence.json" 2>&1 | tee "$out/equivalence.log" | grep -v -i warn | grep -A6 "^kernel |"
  check equivalence
fi
exit $failed
