#!/usr/bin/env bash
# The GPU engine end to end on the CPU: fake libcuda/libnvrtc/libcublas (fakecuda.cpp) under the
# engine's real code (cudarc, weights, forward pass, scheduler), running tests/gpu.rs on a tiny random
# model against the CPU engine. Slow (minutes); needs g++ with C++20.
#   scripts/kernel-emulation/engine.sh
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
lib="$(mktemp -d)"
g++ -std=c++20 -O2 -shared -fPIC -pthread -DEMU_DIR="\"$here\"" -o "$lib/libfakecuda.so" "$here/fakecuda.cpp"
for name in libcuda.so libnvrtc.so libcublas.so; do ln -s libfakecuda.so "$lib/$name"; done
cd "$root"
bin=$(cargo test --test gpu --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys; [print(m["executable"]) for m in map(json.loads, sys.stdin) if m.get("executable") and m["target"]["name"]=="gpu"]' | tail -1)
LD_LIBRARY_PATH="$lib" DYNAMIX_GPU_TEST_SHAPE=tiny "$bin" --test-threads 1 --nocapture
