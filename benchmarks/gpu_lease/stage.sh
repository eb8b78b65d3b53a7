#!/usr/bin/env bash
# Prepare, on the dev machine, what a lease of the GPU machine needs that its image lacks
# (torch 2.11 + CUDA 13 and Triton 3.6 are there; TorchRec, fbgemm-gpu and grpcio-tools are
# not, and it has no network):
#   bash benchmarks/gpu_lease/stage.sh [DIR]        (DIR: an ignored folder; default .gpu_wheels)
# Writes DIR/fbx.part.00..02 (the fbgemm-gpu 1.6.0 wheel's files as one xz tarball, 161 MB in
# three parts that each fit the device tool's 64 MiB carry with the checkout), DIR/fbx.sha256,
# DIR/small/ (torchrec 1.6.1 and its small dependencies) and DIR/grpc/ (grpcio and
# grpcio-tools at requirements/cpu-lock.txt's versions: the config loader compiles its .proto
# files with them). Takes ~4 minutes on 2 cores (the xz pass). benchmarks/gpu_lease/run.sh
# sends and installs them (docs/training.md, section 7).
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${1:-.gpu_wheels}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
if [ ! -f "$dir/fbx.sha256" ]; then
  bash ../shared/tools/stage-gpu-wheels.sh "$dir"
  work=$(mktemp -d)
  cat "$dir"/fbgemm.part.* > "$work/fbgemm.whl"
  (cd "$work" && sha256sum -c "$dir/fbgemm.sha256")
  (cd "$work" && mkdir x && cd x && unzip -q ../fbgemm.whl &&
     tar cf - fbgemm_gpu fbgemm_gpu-1.6.0.dist-info | xz -T2 -8 > ../fbx.tar.xz)
  (cd "$dir" && rm -f fbx.part.* && split -b 56000000 -d -a 2 "$work/fbx.tar.xz" fbx.part.)
  (cd "$work" && sha256sum fbx.tar.xz) > "$dir/fbx.sha256"
  rm -rf "$work" "$dir"/fbgemm.part.*
fi
mkdir -p "$dir/grpc"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$dir/grpc" \
  $(grep -E '^grpcio(-tools)?==' requirements/cpu-lock.txt)
ls -la "$dir" "$dir/small" "$dir/grpc"
