#!/usr/bin/env bash
# KV-aware routing against round-robin in three regimes, each at three loads, on four mocker engines
# at speed-up 1 (simulated vLLM timing), through HTTP with `dynamix bench replay`:
#
#   pressure   prefix groups whose distinct tokens are about 2x one engine's KV cache: round-robin
#              keeps evicting, a prefix-aware router keeps each prefix on one engine
#   multiturn  multi-turn sessions that grow their own prefix; everything fits in every engine
#   unique     no shared prefixes at all
#
# For each regime: a trace is generated (`dynamix bench trace`, seeded), round-robin's capacity is
# measured (the trace's requests sent as one burst; capacity = requests / time to finish them), then
# the trace is replayed at LOADS x that capacity through a fresh server per run (so no run starts
# with another's cache), once per router. Prints one table: TTFT p50/p99, ITL p50, hit rate and
# kv/round-robin TTFT ratios (> 1: kv is better).
#
#   scripts/kv-regimes.sh                      # all regimes, loads 0.5 0.8 0.95 (about 20 minutes)
#   REGIMES="multiturn" LOADS="0.8" scripts/kv-regimes.sh
#   DURATION=40 ROUTERS="round-robin kv kv@4" OUT=/tmp/kv-regimes scripts/kv-regimes.sh  # kv@W: weight W
# Env: DYNAMIX_BIN (use this binary, build nothing), DURATION (seconds of trace per run, 30),
# ROUTERS, REGIMES, LOADS, OUT (keeps traces, server logs and JSON results), SEED,
# CAPACITY_PRESSURE / CAPACITY_MULTITURN / CAPACITY_UNIQUE (req/s: skip measuring it), and
# SERVE_ARGS (extra `dynamix serve` arguments for every server). The servers inherit the
# environment, so DYN_ROUTER__KV_OVERLAP_SCORE_WEIGHT=2 (for instance) tunes the kv router.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
REGIMES="${REGIMES:-pressure multiturn unique}"
LOADS="${LOADS:-0.5 0.8 0.95}"
ROUTERS="${ROUTERS:-round-robin kv}"
DURATION="${DURATION:-30}"
SEED="${SEED:-1}"
OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/kv-regimes.XXXXXX")}"
mkdir -p "$OUT"

if [ -n "${DYNAMIX_BIN:-}" ]; then
  BIN="$DYNAMIX_BIN"
else
  (cd "$ROOT" && cargo build --release --bin dynamix --quiet)
  BIN="$ROOT/target/release/dynamix"
fi

server=""
stop_server() {
  if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then
    kill -TERM "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
  fi
  server=""
}
trap stop_server EXIT

free_port() {
  for _ in $(seq 50); do
    local candidate=$((20000 + RANDOM % 30000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$candidate") 2>/dev/null; then echo "$candidate"; return; fi
  done
  echo "no free port found" >&2; exit 1
}

# The regime's engines: KV blocks per engine (64 tokens each).
blocks_for() {
  case "$1" in
    pressure) echo 2048 ;;   # 131k tokens per engine
    *) echo 16384 ;;         # the mocker's default, 1M tokens per engine
  esac
}

# The regime's trace at about RATE req/s for DURATION s (the replay rescales it anyway).
trace_for() {
  local regime="$1" rate="$2" file="$3" n
  n=$(python3 -c "print(max(50, int($rate * $DURATION)))")
  case "$regime" in
    # 36 groups x 14 blocks x 512 tokens = 258k distinct prefix tokens: 2x one engine's 131k.
    # Prompts of 14-15 blocks (up to 7.7k tokens) stay inside the model's 8k context.
    pressure) "$BIN" bench trace --kind prefix-groups -n "$n" --rate "$rate" --groups 36 \
                --prefix-blocks 14 --unique-blocks 1 --output-tokens 64 --seed "$SEED" -o "$file" ;;
    # Sessions of 6 turns, a block more per turn, on one of 4 system prompts of 2 blocks: at most
    # 8 blocks (4k tokens), inside the model's 8k context.
    multiturn) "$BIN" bench trace --kind multi-turn -n "$n" --rate "$rate" --groups 4 \
                --prefix-blocks 2 --unique-blocks 1 --turns 6 --think-ms 2000 \
                --output-tokens 64 --seed "$SEED" -o "$file" ;;
    unique) "$BIN" bench trace --kind unique -n "$n" --rate "$rate" --prefix-blocks 4 \
                --unique-blocks 1 --output-tokens 64 --seed "$SEED" -o "$file" ;;
    *) echo "unknown regime $regime (pressure, multiturn, unique)" >&2; exit 2 ;;
  esac 2>>"$OUT/trace.log"
}

# start ROUTER BLOCKS LOG: a fresh four-mocker server; sets $server and $url. ROUTER is a router
# mode, or kv@W for the kv router with overlap score weight W.
start() {
  local router="$1" blocks="$2" log="$3" port weight=()
  port=$(free_port)
  if [[ "$router" == kv@* ]]; then
    weight=(env "DYN_ROUTER__KV_OVERLAP_SCORE_WEIGHT=${router#kv@}")
    router=kv
  fi
  "${weight[@]}" env DYN_MOCKER__NUM_GPU_BLOCKS="$blocks" DYN_MOCKER__SPEEDUP_RATIO=1 DYN_LOG=warn \
    "$BIN" serve --config "$ROOT/configs/kv-routing.toml" --http-port "$port" \
    --router-mode "$router" ${SERVE_ARGS:-} >"$log" 2>&1 &
  server=$!
  url="http://127.0.0.1:$port"
  for _ in $(seq 100); do
    if curl -sf "$url/v1/models" >/dev/null 2>&1; then return; fi
    if ! kill -0 "$server" 2>/dev/null; then echo "server exited; see $log" >&2; cat "$log" >&2; exit 1; fi
    sleep 0.2
  done
  echo "server did not answer on $url; see $log" >&2; exit 1
}

# replay ROUTER BLOCKS TRACE RESULT [replay args...]
replay() {
  local router="$1" blocks="$2" trace="$3" result="$4"; shift 4
  start "$router" "$blocks" "$result.server.log"
  "$BIN" bench replay "$trace" --url "$url" --pid "$server" --json "$@" >"$result" \
    2>>"$result.stderr" || true
  stop_server
}

results="$OUT/results.jsonl"
: >"$results"
for regime in $REGIMES; do
  blocks=$(blocks_for "$regime")
  # Capacity: the trace at 20 req/s nominal, sent as one burst (x1000) through round-robin.
  trace="$OUT/$regime.jsonl"
  var="CAPACITY_${regime^^}"
  if [ -n "${!var:-}" ]; then
    capacity="${!var}"
  else
    trace_for "$regime" 20 "$trace"
    replay round-robin "$blocks" "$trace" "$OUT/$regime.capacity.json" --speedup 1000
    capacity=$(python3 -c "import json; print(json.load(open('$OUT/$regime.capacity.json'))['rps'])")
  fi
  echo "$regime: round-robin capacity $capacity req/s ($blocks blocks per engine)" >&2
  for load in $LOADS; do
    rate=$(python3 -c "print(round($capacity * $load, 3))")
    trace_for "$regime" "$rate" "$trace"
    for router in $ROUTERS; do
      result="$OUT/$regime.$load.$router.json"
      replay "$router" "$blocks" "$trace" "$result" --rate "$rate"
      python3 - "$result" "$regime" "$load" "$router" "$capacity" >>"$results" <<'EOF'
import json, sys
path, regime, load, router, capacity = sys.argv[1:]
try:
    r = json.load(open(path))
except Exception as e:
    r = {"error": f"no result: {e}"}
r.update(regime=regime, load=float(load), router=router, capacity_rps=float(capacity))
print(json.dumps(r))
EOF
      echo "  $regime load $load $router: $(tail -1 "$results" | cut -c1-160)" >&2
    done
  done
done

python3 - "$results" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {(r["regime"], r["load"], r["router"]): r for r in rows}
def f(v, p=1):
    return "-" if v is None else f"{v:.{p}f}"
print(f"{'regime':<10} {'load':>5} {'router':<12} {'req/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'hit %':>6} {'errors':>6}   kv vs rr TTFT p50 / p99")
for r in rows:
    hit = r.get("cache_hit_rate")
    errors = sum(r.get("errors", {}).values()) if isinstance(r.get("errors"), dict) else "?"
    line = (f"{r['regime']:<10} {r['load']:>5.2f} {r['router']:<12} {f(r.get('rps'), 2):>7} "
            f"{f(r.get('ttft_p50_ms')):>9} {f(r.get('ttft_p99_ms')):>9} {f(r.get('itl_p50_ms')):>8} "
            f"{f(None if hit is None else hit * 100):>6} {errors:>6}")
    rr = by.get((r["regime"], r["load"], "round-robin"))
    if r["router"].startswith("kv") and rr and r.get("ttft_p50_ms") and rr.get("ttft_p50_ms"):
        line += f"   {rr['ttft_p50_ms'] / r['ttft_p50_ms']:.2f}x / {rr['ttft_p99_ms'] / r['ttft_p99_ms']:.2f}x"
    print(line)
EOF
echo "results: $results" >&2
