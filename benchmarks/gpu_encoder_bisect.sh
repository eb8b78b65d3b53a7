#!/usr/bin/env bash
# On a GPU machine: the encoder at the 27K step's 131K-token shape in several checkouts (older
# commits' worktrees), one after another on the same card, to find which commit changed it:
#   git worktree add -f .bisect/e1a1768 e1a1768        # here, one per commit; carry .bisect
#   bash benchmarks/gpu_encoder_bisect.sh OUT_DIR .bisect/e1a1768 .bisect/887245e ... .
# Each checkout gets this checkout's encoder_bench.py and attention_row_order.py (older ones may
# lack the tokensN shapes); what they import from the package is their own. Prints one line per
# checkout: ms per forward + backward and STU TFLOP/s (median of --repeats 10).
set -uo pipefail
out=$(realpath -m "${1:?usage: gpu_encoder_bisect.sh OUT_DIR CHECKOUT...}")
shift
[ $# -gt 0 ] || { echo "gpu_encoder_bisect.sh: give the checkouts to compare" >&2; exit 2; }
mkdir -p "$out"
here=$(pwd)
for dir in "$@"; do
  name=$(basename "$(realpath "$dir")")
  [ "$(realpath "$dir")" = "$here" ] && name=this
  [ "$(realpath "$dir")" = "$here" ] || cp benchmarks/encoder_bench.py benchmarks/attention_row_order.py "$dir/benchmarks/"
  (cd "$dir" && timeout 120 python3 benchmarks/encoder_bench.py --shapes tokens131072 \
    --kernels TRITON --repeats 10 --out "$out/$name" > "$out/encoder_$name.log" 2>&1)
  status=$?
  line=$(grep -A1 "^kernel " "$out/encoder_$name.log" | tail -1)
  echo "$name (exit $status): ${line:-no result, see $out/encoder_$name.log}"
done
