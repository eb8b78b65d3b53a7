#!/usr/bin/env bash
# Creates .venv beside this file and installs hstu with its pinned dependencies.
#   bash install.sh        CPU build (torch 2.13 CPU, fbgemm-gpu-cpu 1.8.0, torchrec 1.8.0,
#                          triton 3.7.1)
#   bash install.sh gpu    CUDA build: the set the GPU figures were measured with (torch 2.11 with
#                          CUDA 13, fbgemm-gpu 1.6.0, torchrec 1.6.1, triton 3.6.0)
# The CPU set is not the GPU set's versions: PyPI has no CPU build of torch 2.11 (its Linux wheel
# pulls ~2.7 GB of CUDA wheels) and fbgemm 1.6.0 does not load under torch 2.13
# (docs/training.md, section 7).
# Both flavours take the other versions from requirements/cpu-lock.txt.
# Safe to re-run: an existing .venv is reused and only what is missing gets installed.
set -euo pipefail
cd "$(dirname "$0")"
flavour=${1:-cpu}
case "$flavour" in
  cpu) torchrec=1.8.0 ;;
  gpu) torchrec=1.6.1 ;;
  *) echo "usage: bash install.sh [cpu|gpu]" >&2; exit 2 ;;
esac
python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "install.sh: needs Python 3.11 or newer ($python is $("$python" -V 2>&1))" >&2; exit 1; }
# The two flavours cannot share an environment (fbgemm-gpu-cpu and fbgemm-gpu are one package).
other=fbgemm-gpu; [ "$flavour" = gpu ] && other=fbgemm-gpu-cpu
if [ -x .venv/bin/python ] && .venv/bin/python -m pip show -q "$other" >/dev/null 2>&1; then
  echo "install.sh: .venv holds the other build ($other); rm -rf .venv first" >&2; exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip -q --disable-pip-version-check)
lock=requirements/cpu-lock.txt
if [ "$flavour" = gpu ]; then
  # the lock without its torch/triton/fbgemm lines: the extra pins those
  lock=.venv/gpu-constraints.txt
  grep -v -i -E '^(torch|triton|fbgemm[-_]gpu[-_]cpu)==' requirements/cpu-lock.txt > "$lock"
fi
"${pip[@]}" install -c "$lock" -e ".[$flavour,test]"
# torchrec's wheel requires the CUDA fbgemm-gpu; --no-deps keeps the build chosen above.
"${pip[@]}" install --no-deps "torchrec==$torchrec"
.venv/bin/python -c 'import torch, torchrec, fbgemm_gpu, ray, mlflow' || {
  echo "install.sh: the environment in .venv does not import; see the errors above" >&2; exit 1; }
echo "install.sh: .venv ready ($flavour)"
