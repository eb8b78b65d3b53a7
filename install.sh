#!/usr/bin/env bash
# Creates .venv beside this file and installs hstu with its pinned dependencies.
#   bash install.sh        CPU build (torch 2.13 CPU, fbgemm-gpu-cpu 1.8.0, torchrec 1.8.0)
#   bash install.sh gpu    CUDA build of the same torch/fbgemm/torchrec triple
# Safe to re-run: an existing .venv is reused and only what is missing gets installed.
set -euo pipefail
cd "$(dirname "$0")"
flavour=${1:-cpu}
case "$flavour" in cpu|gpu) ;; *) echo "usage: bash install.sh [cpu|gpu]" >&2; exit 2 ;; esac
python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "install.sh: needs Python 3.11 or newer ($python is $("$python" -V 2>&1))" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip -q --disable-pip-version-check)
constraints=()
[ "$flavour" = cpu ] && constraints=(-c requirements/cpu-lock.txt)
"${pip[@]}" install "${constraints[@]}" -e ".[$flavour,test]"
# torchrec's wheel requires the CUDA fbgemm-gpu; --no-deps keeps the build chosen above.
"${pip[@]}" install --no-deps torchrec==1.8.0
.venv/bin/python -c 'import torch, torchrec, fbgemm_gpu, ray, mlflow' || {
  echo "install.sh: the environment in .venv does not import; see the errors above" >&2; exit 1; }
echo "install.sh: .venv ready ($flavour)"
