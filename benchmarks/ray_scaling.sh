#!/usr/bin/env bash
# Issue 14 as a user runs it: a Ray head on this machine, `ray job submit` with
# cluster/runtime_env.yaml, `launch.py train --workers N` for each N, then the largest-N run
# resumed on one worker (its checkpoint resharded) and exported.
#   bash benchmarks/ray_scaling.sh OUT_DIR [N ...]            # default N: 1 2 4 8 up to the GPUs
#   DEVICE=cpu RECIPE=recipes/smoke.config bash benchmarks/ray_scaling.sh OUT 1 2   # CPU check
# Environment: DEVICE (gpu, default, or cpu), RECIPE (default the 27K recipe), USERS (synthetic
# users, default 4000), STEPS (training steps per run, default 200).
# Prints each run's last progress lines (samples/s, tokens/s over the last logging interval)
# and its summary; `launch.py compare` then sets the runs side by side. Run it from a checkout
# without large untracked files: the job uploads the working directory (Ray's limit: 100 MiB).
# On GPU NOT YET RUN (no machine with several GPUs so far); on CPU: docs/BENCHMARKS.md.
set -uo pipefail
out=$(realpath -m "${1:?usage: ray_scaling.sh OUT_DIR [N ...]}")
shift
device=${DEVICE:-gpu}
recipe=${RECIPE:-recipes/kuairand_dlrm_hstu.config}
users=${USERS:-4000}
steps=${STEPS:-200}
counts=("$@")
if [ ${#counts[@]} -eq 0 ]; then
  gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
  for n in 1 2 4 8; do [ "$n" -le "$gpus" ] && counts+=("$n"); done
fi
[ ${#counts[@]} -gt 0 ] || { echo "ray_scaling.sh: no worker counts (no GPU found; give N)" >&2; exit 2; }
largest=${counts[-1]}
mkdir -p "$out"
gpu_flag=(); head_resources=(--num-cpus "$(nproc)")
if [ "$device" = gpu ]; then
  gpu_flag=(--use-gpu); head_resources+=(--num-gpus "$(nvidia-smi --list-gpus | wc -l)")
fi

if [ ! -d "$out/data/train" ]; then
  python3 launch.py prepare synthetic --out "$out/data" --users "$users" --users-per-shard 250 \
    --recipe "$recipe" > "$out/prepare.log" 2>&1 || { tail -5 "$out/prepare.log"; exit 1; }
fi
ray start --head "${head_resources[@]}" --dashboard-port 8265 > "$out/ray_start.log" 2>&1 \
  || { tail -5 "$out/ray_start.log"; exit 1; }
trap 'ray stop > /dev/null 2>&1' EXIT
export RAY_ADDRESS=http://127.0.0.1:8265 RAY_AUTH_MODE=token

submit() {  # submit LOG NAME ARGS...: one training job (run NAME), its log in OUT/LOG.log
  local log=$1 name=$2
  shift 2
  ray job submit --runtime-env cluster/runtime_env.yaml -- \
    python launch.py train --recipe "$recipe" "${gpu_flag[@]}" \
    --train "$out/data/train" --eval "$out/data/eval" --storage "$out/storage" \
    --mlflow-uri "sqlite:///$out/mlflow.db" --run-name "$name" "$@" > "$out/$log.log" 2>&1
  local status=$?
  echo "== $log: exit $status"
  grep -E "step +[0-9]+/[0-9]+ +epoch" "$out/$log.log" | tail -2 | sed 's/.* step/  step/' | cut -c1-90
  grep -E "^(steps|samples trained|restarts|wall time|checkpoint|export) " "$out/$log.log"
  return $status
}

failed=0
for n in "${counts[@]}"; do
  submit "scale-$n" "scale-$n" --workers "$n" --set "train_config.num_steps=$steps" --no-export \
    || failed=1
done
# The largest run's last checkpoint, on one worker: resharded, trained further, exported.
if grep -q "^checkpoint " "$out/scale-$largest.log"; then
  submit "resume-$largest-on-1" "scale-$largest" --resume --workers 1 \
    --set "train_config.num_steps=$((steps + 20))" || failed=1
else
  echo "!! scale-$largest left no checkpoint: no resume"; failed=1
fi
python3 launch.py compare $(for n in "${counts[@]}"; do echo "scale-$n"; done) \
  --mlflow-uri "sqlite:///$out/mlflow.db" 2>&1 | tee "$out/compare.txt"
exit $failed
