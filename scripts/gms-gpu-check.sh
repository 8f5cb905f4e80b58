#!/usr/bin/env bash
# GPU check of the GPU memory service's cuda backend, end to end, on a machine with an NVIDIA GPU:
# a `dynamix gms --backend cuda` server, a writer process that fills device memory through its own
# mapping and commits, a reader in another process that imports the exported fds and verifies every
# byte, a stale-layout check, and a writer killed with SIGKILL mid-write followed by a clean rewrite.
#
#   scripts/gms-gpu-check.sh                      # builds target/release/dynamix
#   scripts/gms-gpu-check.sh path/to/dynamix      # uses a prebuilt binary (no cargo needed)
#
# Env: GMS_CHECK_DEVICE (default 0), GMS_CHECK_BACKEND (default cuda; host smoke-tests the script), GMS_CHECK_BYTES per allocation (default 64 MiB).
# Prints one PASS/FAIL line per step and exits non-zero if any step failed.
set -u

BIN="${1:-}"
DEVICE="${GMS_CHECK_DEVICE:-0}"
BACKEND="${GMS_CHECK_BACKEND:-cuda}"
BYTES="${GMS_CHECK_BYTES:-67108864}"
passed=0
failed=0
pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
finish() {
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
    exit $?
}

if [ -z "$BIN" ]; then
    if ! cargo build --release --bin dynamix; then
        fail "cargo build --release"
        finish
    fi
    BIN=target/release/dynamix
fi
if [ ! -x "$BIN" ]; then
    fail "binary $BIN is missing or not executable"
    finish
fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L

WORK="$(mktemp -d)"
SOCK="$WORK/gms_weights.sock"
SERVER_PID=""
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN" gms --backend "$BACKEND" --device "$DEVICE" --tag weights --socket "$SOCK" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 300); do
    [ -S "$SOCK" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
done
if [ -S "$SOCK" ]; then
    pass "$BACKEND server started ($(grep -o 'socket=.*' "$WORK/server.log" | head -1))"
else
    fail "$BACKEND server did not start: $(cat "$WORK/server.log")"
    SERVER_PID=""
    finish
fi

client() { "$BIN" gms "$@" --backend "$BACKEND" --device "$DEVICE" --socket "$SOCK"; }
field() { grep "^$1=" "$2" | head -1 | cut -d= -f2; }

# 1. Writer process: allocate, map read-write, fill, metadata, commit.
if client write --bytes "$BYTES" --count 3 --seed 7 >"$WORK/write.out" 2>"$WORK/write.err"; then
    pass "writer wrote $((3 * BYTES)) bytes and committed (layout_hash=$(field layout_hash "$WORK/write.out"))"
else
    fail "writer: $(cat "$WORK/write.err")"
fi

# 2. Reader in another process: import, map read-only, verify every byte against the pattern.
if client read >"$WORK/read.out" 2>"$WORK/read.err" && grep -q '^verified=true' "$WORK/read.out"; then
    if [ "$(field digest "$WORK/read.out")" = "$(field digest "$WORK/write.out")" ] &&
        [ "$(field layout_hash "$WORK/read.out")" = "$(field layout_hash "$WORK/write.out")" ]; then
        pass "reader process read exactly the bytes the writer wrote (digest=$(field digest "$WORK/read.out"))"
    else
        fail "reader digest/hash differ from the writer's"
    fi
else
    fail "reader: $(cat "$WORK/read.err")"
fi

# 3. A reader that saved another layout hash gets a stale-layout error.
if client read --expect-hash 0000 >/dev/null 2>"$WORK/stale.err"; then
    fail "stale layout hash was accepted"
elif grep -q "stale memory layout" "$WORK/stale.err"; then
    pass "stale layout hash rejected"
else
    fail "stale check failed for another reason: $(cat "$WORK/stale.err")"
fi

# 4. A writer killed with SIGKILL mid-write: the layout is wiped and the next writer proceeds.
# Run the binary itself in the background (not through the shell function) so $! is the writer.
"$BIN" gms write --backend "$BACKEND" --device "$DEVICE" --socket "$SOCK" --bytes $((256 * 1024 * 1024)) --count 256 --seed 9 >/dev/null 2>&1 &
WRITER=$!
for _ in $(seq 1 100); do
    client state >"$WORK/state.out" 2>/dev/null
    grep -q '^state=RW' "$WORK/state.out" && grep -q '^allocation_count=[1-9]' "$WORK/state.out" && break
    sleep 0.1
done
kill -9 "$WRITER" 2>/dev/null
wait "$WRITER" 2>/dev/null
for _ in $(seq 1 100); do
    client state >"$WORK/state.out" 2>/dev/null
    grep -q '^state=EMPTY' "$WORK/state.out" && break
    sleep 0.1
done
if grep -q '^state=EMPTY' "$WORK/state.out" && grep -q '^allocation_count=0' "$WORK/state.out" &&
    grep -q 'rw_aborted' "$WORK/state.out"; then
    pass "killed writer: layout wiped, state EMPTY"
else
    fail "killed writer: $(tr '\n' ' ' <"$WORK/state.out")"
fi
if client write --bytes "$BYTES" --count 1 --seed 11 --lock-timeout-ms 30000 >"$WORK/rewrite.out" 2>"$WORK/rewrite.err" &&
    client read >"$WORK/reread.out" 2>"$WORK/reread.err" && grep -q '^verified=true' "$WORK/reread.out"; then
    pass "next writer proceeded and a reader verified its bytes"
else
    fail "rewrite after kill: $(cat "$WORK/rewrite.err" "$WORK/reread.err")"
fi

finish
