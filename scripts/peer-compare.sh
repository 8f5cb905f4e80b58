#!/usr/bin/env bash
# dynamix against Dynamo 1.6.1 with the peer bench (../shared/peer_bench): dynamix in one process,
# then as frontend + worker, each interleaved with Dynamo by compare.sh (closed loop, c=8,
# max_tokens 16, mockers at speed-up 100). Prints compare.sh's tables.
#
#   scripts/peer-compare.sh [one split]      (default: both)
#
# Needs: a release build (cargo build --release), ../shared/peer_bench/setup.sh run once (it installs
# etcd, nats-server and the Dynamo venv, and writes ~/.cache/peer-bench/paths.env). Dynamo is started
# with start_dynamo.sh unless its frontend already runs, and stopped again if this script started it.
# Env: passed on to compare.sh (MODES, REPS, DURATION, CONC, CLIENT), PLANE (the frontend's
# distributed.request_plane_protocol for the split run: mux | dynamo; default mux), DYNAMIX_BIN.
# CLIENT=dynamix drives both servers with `dynamix bench http` instead of load.py (same flags, same
# JSON keys, a fraction of load.py's CPU per request): on 2 cores load.py itself needs 0.25 ms of its
# one core per new-connection request, which caps what it can measure.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PEER="${PEER_BENCH:-$ROOT/../shared/peer_bench}"
PEER_HOME="${PEER_HOME:-$HOME/.cache/peer-bench}"
BIN="${DYNAMIX_BIN:-$ROOT/target/release/dynamix}"
STATE_DIR="${STATE_DIR:-${TMPDIR:-/tmp}/peer-bench-state}"
export STATE_DIR
[ -x "$BIN" ] || { echo "no $BIN: run cargo build --release" >&2; exit 2; }
[ -f "$PEER_HOME/paths.env" ] || { echo "run $PEER/setup.sh first" >&2; exit 2; }
# shellcheck disable=SC1091
source "$PEER_HOME/paths.env"
RUNS=("${@:-one split}")
WORK="$(mktemp -d)"
started_dynamo=""
cleanup() {
  for f in "$WORK"/*.pid; do [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true; done
  [ -n "$started_dynamo" ] && "$PEER/stop_all.sh" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

fe="$(cat "$STATE_DIR/frontend.pid" 2>/dev/null || true)"
if [ -z "$fe" ] || ! kill -0 "$fe" 2>/dev/null; then
  "$PEER/start_dynamo.sh" >/dev/null
  started_dynamo=1
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# One process: the mocker behind the full actor path.
cat >"$WORK/one.toml" <<EOF
[model]
name = "mock-model"
[http]
host = "127.0.0.1"
[engine]
kind = "mocker"
[mocker]
speedup_ratio = 100.0
[embeddings]
enabled = false
[log]
filter = "warn"
EOF

# Frontend + worker on their own etcd and NATS (not mixed with Dynamo's registrations); exec makes
# the frontend the process compare.sh measures, with etcd, NATS and the worker as its children.
EP="$(free_port)"; PP="$(free_port)"; NP="$(free_port)"
cat >"$WORK/split.sh" <<EOF
#!/usr/bin/env bash
export ETCD_ENDPOINTS=http://127.0.0.1:$EP NATS_SERVER=nats://127.0.0.1:$NP DYN_LOG=warn
export DYN_DISTRIBUTED__REQUEST_PLANE_PROTOCOL=${PLANE:-mux}
etcd --name split --data-dir "$WORK/etcd" --listen-client-urls http://127.0.0.1:$EP \\
  --advertise-client-urls http://127.0.0.1:$EP --listen-peer-urls http://127.0.0.1:$PP \\
  --initial-advertise-peer-urls http://127.0.0.1:$PP --initial-cluster split=http://127.0.0.1:$PP \\
  >"$WORK/etcd.log" 2>&1 & echo \$! >"$WORK/etcd.pid"
nats-server -a 127.0.0.1 -p $NP >"$WORK/nats.log" 2>&1 & echo \$! >"$WORK/nats.pid"
sleep 1
DYN_MOCKER__SPEEDUP_RATIO=100 "$BIN" worker --config "$ROOT/configs/worker.toml" out=mocker \\
  --model-name mock-model --model-path "$MODEL_DIR" >"$WORK/worker.log" 2>&1 & echo \$! >"$WORK/worker.pid"
exec "$BIN" frontend --config "$ROOT/configs/frontend.toml" --http-host 127.0.0.1 --http-port "\$1"
EOF
chmod +x "$WORK/split.sh"

if [ "${CLIENT:-raw}" = dynamix ]; then
  # compare.sh runs "$PYTHON load.py URL MODEL FLAGS" per run and "$PYTHON - FILE ..." for its table.
  cat >"$WORK/client.sh" <<EOF
#!/usr/bin/env bash
[ "\$1" = - ] && exec python3 "\$@"
shift; url="\$1"; model="\$2"; shift 2; label=""; args=(); pids=()
while [ \$# -gt 0 ]; do
  case "\$1" in
    --label) label="\$2"; shift 2 ;;
    --client) shift 2 ;;
    --pid) pids+=("\$2"); args+=("\$1" "\$2"); shift 2 ;;
    *) args+=("\$1"); shift ;;
  esac
done
"$BIN" bench http --url "\$url" --model "\$model" --tokenizer none --json "\${args[@]}" 2>/dev/null |
  python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
r["label"] = sys.argv[1]
# compare.sh reads the first pid as the server (bench http sorts them): keep the --pid order.
by = r.get("cpu_ms_per_req_by_pid") or {}
r["cpu_ms_per_req_by_pid"] = {p: by[p] for p in sys.argv[2:] if p in by}
print(json.dumps(r))' "\$label" "\${pids[@]}"
EOF
  chmod +x "$WORK/client.sh"
  export PYTHON="$WORK/client.sh"
fi

for run in ${RUNS[*]}; do
  case "$run" in
    one) echo "## dynamix in one process"
         OURS_CMD="$BIN serve --config $WORK/one.toml --model-path $MODEL_DIR --http-port" "$PEER/compare.sh" ;;
    split) echo "## dynamix as frontend + worker (request plane ${PLANE:-mux})"
         OURS_CMD="$WORK/split.sh" "$PEER/compare.sh"
         for f in "$WORK"/{worker,nats,etcd}.pid; do kill -9 "$(cat "$f")" 2>/dev/null || true; rm -f "$f"; done
         rm -rf "$WORK/etcd" ;;
    *) echo "unknown run $run (one | split)" >&2; exit 2 ;;
  esac
done
