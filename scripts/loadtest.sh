#!/usr/bin/env bash
# Load test in one command: builds the release binary (cargo decides whether anything changed),
# starts `dynamix serve` on a free loopback port, runs `dynamix bench http` against it with the
# server's pid (so server CPU per request is measured), then stops the server.
#
#   scripts/loadtest.sh [--config FILE] [--serve ARG]... [BENCH ARGS...]
#   scripts/loadtest.sh --url URL [BENCH ARGS...]      # any running OpenAI-compatible server
#
# BENCH ARGS go to `dynamix bench http` (see `dynamix bench http --help`), e.g. --mode unary -c 16
# -d 20 --json. --serve passes one argument to `dynamix serve` (repeat it). Examples:
#   scripts/loadtest.sh                                          # the default config: the real model
#   DYN_MOCKER__SPEEDUP_RATIO=100 scripts/loadtest.sh --serve out=mocker
#   scripts/loadtest.sh --config configs/kv-routing.toml --mode unary --json
#   scripts/loadtest.sh --url http://127.0.0.1:8000 --pid "$(pgrep -f 'dynamo.frontend')" --children
# Env: DYNAMIX_BIN (use this binary, build nothing); the server inherits the environment (DYN_*).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

config=()
serve_args=()
url=""
bench_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config=(--config "$2"); shift 2 ;;
    --serve) serve_args+=("$2"); shift 2 ;;
    --url) url="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) bench_args+=("$1"); shift ;;
  esac
done

if [ -n "${DYNAMIX_BIN:-}" ]; then
  BIN="$DYNAMIX_BIN"
else
  (cd "$ROOT" && cargo build --release --bin dynamix --quiet)
  BIN="$ROOT/target/release/dynamix"
fi

if [ -n "$url" ]; then
  exec "$BIN" bench http --url "$url" "${bench_args[@]}"
fi

log="$(mktemp "${TMPDIR:-/tmp}/loadtest-server.XXXXXX")"
server=""
cleanup() {
  if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then
    kill -TERM "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
  rm -f "$log"
}
trap cleanup EXIT

# A free port: the first one from a random start where nothing answers (the log cannot be relied
# on for the address: a config may set [log] filter = "warn").
port=""
for _ in $(seq 50); do
  candidate=$((20000 + RANDOM % 30000))
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$candidate") 2>/dev/null; then port=$candidate; break; fi
done
[ -n "$port" ] || { echo "loadtest: no free port found" >&2; exit 1; }
"$BIN" serve "${config[@]}" --http-host 127.0.0.1 --http-port "$port" "${serve_args[@]}" >"$log" 2>&1 &
server=$!
base="http://127.0.0.1:$port"

# Listening means the engines are up; a first start may pull the model first.
listening=""
for _ in $(seq 600); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then listening=1; break; fi
  if ! kill -0 "$server" 2>/dev/null; then
    echo "loadtest: dynamix serve exited before listening:" >&2
    tail -20 "$log" >&2
    exit 1
  fi
  sleep 0.5
done
if [ -z "$listening" ]; then
  echo "loadtest: dynamix serve did not listen on $base within 5 minutes:" >&2
  tail -20 "$log" >&2
  exit 1
fi
echo "loadtest: dynamix serve (pid $server) on $base" >&2

status=0
"$BIN" bench http --url "$base" --pid "$server" "${bench_args[@]}" || status=$?
exit "$status"
