#!/usr/bin/env bash
# Run the GPU engine's kernels on the CPU (no GPU, no CUDA) and check them against plain references:
#   scripts/kernel-emulation/run.sh
# Needs g++ with C++20. Compiled for SmolLM2's shape (head size 64, 3 query heads per KV head).
set -eu
cd "$(dirname "$0")"
out="$(mktemp -d)/check"
g++ -std=c++20 -O1 -pthread -DDYNAMIX_KERNEL_EMULATION -DHEAD_DIM=64 -DGROUP=3 -DKV_HEADS=3 -DVOCAB_PER_THREAD=3 \
    -Wno-unused-result -I ../../actors/src/engine/gpu/kernels -o "$out" check.cpp
"$out"
