#!/usr/bin/env bash
# The GPU engine on one NVIDIA GPU, end to end, in under 8 minutes:
#   1. the GPU tests (tests/gpu.rs): greedy tokens and logits against the CPU engine on random
#      SmolLM2-shaped weights, batch invariance, a chat completion served over HTTP from cuda:0;
#   2. the GPU benchmark (benches/gpu.rs): single-stream and aggregate decode, TTFT(512), KV capacity,
#      each against the bandwidth ceiling;
#   3. the GPU memory service's cuda backend (scripts/gms-gpu-check.sh), when a dynamix binary is given.
#
#   scripts/gpu-check.sh                   # builds here and runs here (a machine with a GPU and cargo)
#   scripts/gpu-check.sh --prepare DIR     # builds DIR/{gpu-tests,gpu-bench,dynamix,tokenizer.gguf} here
#   scripts/gpu-check.sh DIR               # runs those on a GPU machine (no cargo or network needed)
#
# CUDA libraries outside the loader's path (a toolkit in /usr/local/cuda, pip's nvidia-* wheels) are
# found and put on LD_LIBRARY_PATH. Prints each part's output and exits non-zero if a part failed.
set -u
failed=0

# Build the release test and bench binaries, dynamix, and SmolLM2's tokenizer (metadata only) into $1.
prepare() {
    local dir="$1" exe
    mkdir -p "$dir"
    exe() {
        python3 -c 'import json,sys; [print(m["executable"]) for m in map(json.loads, sys.stdin) if m.get("executable") and m["target"]["name"]=="gpu"]' | tail -1
    }
    local test_bin bench_bin
    test_bin=$(cargo test --release --test gpu --no-run --message-format=json 2>/dev/null | exe)
    bench_bin=$(cargo bench --bench gpu --no-run --message-format=json 2>/dev/null | exe)
    [ -n "$test_bin" ] && cp "$test_bin" "$dir/gpu-tests" && strip "$dir/gpu-tests" 2>/dev/null
    [ -n "$bench_bin" ] && cp "$bench_bin" "$dir/gpu-bench"
    cargo build --release --bin dynamix && cp target/release/dynamix "$dir/dynamix" && strip "$dir/dynamix" 2>/dev/null
    DYNAMIX_GPU_TEST_WRITE_TOKENIZER="$dir/tokenizer.gguf" "$dir/gpu-tests" --ignored write_tokenizer_for_gpu_check >/dev/null
    local anchor
    anchor="$(dirname "$0")/../../shared/gpu_anchor/torch_graphs.py"
    [ -f "$anchor" ] && cp "$anchor" "$dir/"
    ls -la "$dir"
}

if [ "${1:-}" = "--prepare" ]; then
    [ -n "${2:-}" ] || { echo "usage: $0 --prepare DIR"; exit 2; }
    prepare "$2"
    exit $?
fi
DIR="${1:-}"
if [ -z "$DIR" ]; then
    DIR="$(mktemp -d)"
    prepare "$DIR"
fi
[ -f "$DIR/tokenizer.gguf" ] && export DYNAMIX_GPU_TEST_TOKENIZER="$DIR/tokenizer.gguf"
for b in gpu-tests gpu-bench; do
    if [ ! -x "$DIR/$b" ]; then echo "FAIL: $DIR/$b is missing"; exit 1; fi
done

# CUDA 13's libraries first, then 12's.
libdirs=""
for name in 'libnvrtc.so.13*' 'libcublas.so.13*' 'libnvrtc.so.12*' 'libcublas.so.12*'; do
    for f in $(find /usr/local /opt /usr/lib -xdev -name "$name" 2>/dev/null | head -3); do
        d=$(dirname "$f")
        case ":$libdirs:" in *":$d:"*) ;; *) libdirs="$libdirs:$d" ;; esac
    done
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo "== GPU tests"
start=$(date +%s)
if ! timeout 170 "$DIR/gpu-tests" --test-threads 1 --nocapture; then echo "FAIL: GPU tests"; failed=1; fi
echo "GPU tests took $(( $(date +%s) - start )) s"

echo "== GPU benchmark"
start=$(date +%s)
if ! timeout 130 "$DIR/gpu-bench"; then echo "FAIL: GPU benchmark"; failed=1; fi
echo "GPU benchmark took $(( $(date +%s) - start )) s"

# The PyTorch anchor (../shared/gpu_anchor/torch_graphs.py, copied into DIR by --prepare when it is
# there): a hand-written decode loop of the same shape, eager and as CUDA graphs, for ratios taken in
# the same run.
if [ -f "$DIR/torch_graphs.py" ] && command -v python3 >/dev/null 2>&1; then
    echo "== PyTorch anchor (hand-written decode loop, tok/s)"
    timeout 60 python3 "$DIR/torch_graphs.py" || echo "(the anchor did not finish)"
fi

if [ -x "$DIR/dynamix" ]; then
    echo "== GPU memory service (cuda backend)"
    if ! timeout 40 "$(dirname "$0")/gms-gpu-check.sh" "$DIR/dynamix"; then echo "FAIL: GPU memory service"; failed=1; fi
fi
[ "$failed" -eq 0 ] && echo "gpu-check: all parts passed"
exit "$failed"
