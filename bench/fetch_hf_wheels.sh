#!/usr/bin/env bash
# Downloads transformers and the dependencies it needs beyond what the GPU machine has
# (python 3.12, x86-64; torch and numpy are there) into .whl/hf/, for the gpu_suite.sh
# step `hf_peer` (the port side of bench/hf_peer.py). Run here, once, after
# ../shared/gpu/fetch_wheels.sh; `.whl` then travels in the device tool's carry.
#   bash bench/fetch_hf_wheels.sh [TRANSFORMERS_VERSION=5.24.0]
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:-5.24.0}
mkdir -p .whl/hf
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl/hf "transformers==$VERSION"
rm -f .whl/hf/numpy-*.whl   # the machine's numpy is the one its jax and torch were built with
du -sh .whl/hf
