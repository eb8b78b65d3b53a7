#!/usr/bin/env bash
# One step of a GPU lease, run on the GPU machine from the checkout's root through the device
# tool (each call's files come back from $OUT):
#   bash benchmarks/gpu_lease/run.sh STEP [DIR]      (DIR: what stage.sh filled; .gpu_wheels)
# The device machine keeps /tmp only while calls follow within its idle window (30 s), so the
# staging steps go back to back. Steps, with what each call must carry (besides this checkout):
#   part0 | part1          DIR/fbx.part.00 | DIR/fbx.part.01: gathered in /tmp/fbx.tar.xz
#   install                DIR/fbx.part.02 DIR/fbx.sha256 DIR/small DIR/grpc: checked, unpacked
#                          and installed into /tmp/site (TorchRec, fbgemm-gpu, grpcio-tools)
#   kernels                nothing: the cached attention's GPU tests and timing, kernel_bench
#   probes                 nothing: the positional backward eagerly and in a CUDA graph
#   serving                (after install) cached-path GPU tests, serving_bench at 1/32/128 users
#                          with both history checks, a profile of one-user calls, the timeline
#   train                  (after install) the 27K step (session 10's command, traced) and the
#                          32 x 1,024 step with CUDA graphs (traced), each trace's stream overlap
# kernels and probes need no staging, so a lease can start with them while the parts travel.
# Every command's output goes to $OUT/NAME.log (the tail printed), JSON beside it.
# Verification: its commands are the ones session 15 ran on one H100 through an untracked
# driver (docs/BENCHMARKS.md, session 15), except the probes step and the serving step's
# profile, which had no device time left; this script as a whole has not run there yet.
set -uo pipefail
step=${1:?usage: run.sh STEP [DIR]}
dir=${2:-.gpu_wheels}
out=${OUT:-/tmp/gpu_lease_out}
tmp=${LEASE_TMP:-/tmp}  # where the parts gather and the packages go (the tests point it elsewhere)
site=$tmp/site
mkdir -p "$out" "$site"
export PYTHONPATH=$site:$PWD

run() {  # run NAME SECONDS CMD...: CMD's output to $OUT/NAME.log, its tail without fbgemm's noise
  local name=$1 seconds=$2
  shift 2
  echo "=== $(date -u +%H:%M:%S) $name: $*"
  timeout "$seconds" "$@" > "$out/$name.log" 2>&1
  echo "rc=$?" >> "$out/$name.log"
  grep -v -e "fbgemm_torch_compat" -e "cannot determine compat" -e "^WARNING:root" \
    -e "^ *$" -e "\[0m" -e "\[33m" "$out/$name.log" | tail -n "${TAIL:-20}"
}

needs_torchrec() {
  [ -f "$site/.installed" ] || { echo "run.sh $step: TorchRec is not installed on this machine" \
    "(run the part0, part1 and install steps first, back to back)"; exit 4; }
}

serving=(python benchmarks/serving_bench.py --device cuda --history 4096 --new 10
         --candidates 100 --cache-gb 32 --warmup 3)
train=(python benchmarks/train_bench.py --device cuda --kernels TRITON --workers 1
       --table-rows 0 --steps 8 --warmup 4 --batches 4 --profile-steps 2 --trace)

case $step in
part0) cat "$dir/fbx.part.00" > "$tmp/fbx.tar.xz" && ls -la "$tmp/fbx.tar.xz" ;;
part1) cat "$dir/fbx.part.01" >> "$tmp/fbx.tar.xz" && ls -la "$tmp/fbx.tar.xz" ;;
install)
  cat "$dir/fbx.part.02" >> "$tmp/fbx.tar.xz"
  sums=$(cd "$dir" && pwd)/fbx.sha256
  (cd "$tmp" && sha256sum -c "$sums") || { echo "fbx.tar.xz: checksum failed"; exit 3; }
  xz -dc "$tmp/fbx.tar.xz" | tar x -C "$site" || { echo "fbx.tar.xz: unpacking failed"; exit 3; }
  python3 -m pip install -q --no-index --no-deps --target "$site" "$dir"/small/*.whl \
    "$dir"/grpc/*.whl || { echo "install: pip failed"; exit 5; }
  python -c "import torchrec, fbgemm_gpu, grpc_tools.protoc; print('torchrec', torchrec.__version__)" \
    || { echo "install: the packages do not import"; exit 5; }
  touch "$site/.installed"
  ;;
kernels)
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  run cached_attention_gpu_tests 300 python -m pytest -q -m gpu -p no:cacheprovider \
    tests/ops/triton/test_cached_attention.py tests/ops/triton/test_cached_attention_codegen.py
  TAIL=6 run cached_attention_bench 200 python benchmarks/cached_attention_bench.py \
    --json "$out/cached_attention_bench.json"
  TAIL=6 run kernel_bench 240 python benchmarks/kernel_bench.py --parts attention --out "$out"
  ;;
probes)
  run position_bwd_graph 120 python benchmarks/probes/position_bwd_graph/probe.py
  ;;
serving)
  needs_torchrec
  run cached_gpu_tests 240 python -m pytest -q -m gpu -p no:cacheprovider \
    tests/export/test_cached.py tests/export/test_cached_graphs.py
  TAIL=14 run serving_ends 200 "${serving[@]}" --batch 1 32 128 --phases --repeats 10 \
    --history-check ends --modes incremental exact_reuse --json "$out/serving_ends.json"
  TAIL=10 run serving_full 150 "${serving[@]}" --batch 1 32 128 --phases --repeats 10 \
    --modes incremental exact_reuse --json "$out/serving_full.json"
  TAIL=45 run serving_profile_1user 100 "${serving[@]}" --batch 1 --repeats 5 \
    --history-check ends --modes incremental --profile
  TAIL=4 run cached_timeline_1user 60 python benchmarks/probes/cached_timeline/probe.py --batch 1
  TAIL=4 run cached_timeline_128users 100 python benchmarks/probes/cached_timeline/probe.py \
    --batch 128
  ;;
train)
  needs_torchrec
  TAIL=12 run train_27k 200 "${train[@]}" --max-history 7894 --batch-size 32 \
    --token-budget 131072 --json "$out/train_27k.json"
  TAIL=12 run train_1k_graphs 150 "${train[@]}" --max-history 1024 --batch-size 32 \
    --cuda-graphs --json "$out/train_1k_graphs.json"
  for trace in "$out"/train_trace_*.json; do
    [ -f "$trace" ] || continue
    python benchmarks/probes/trace_overlap.py "$trace" > "${trace%.json}.overlap.txt" 2>&1
    head -12 "${trace%.json}.overlap.txt"
    gzip -f "$trace"
  done
  ;;
*) echo "run.sh: unknown step $step (part0 part1 install kernels probes serving train)"; exit 2 ;;
esac
echo "=== $(date -u +%H:%M:%S) step $step done"
