#!/usr/bin/env bash
# Prompt-cache affinity, side by side on the same simulated replicas (a
# prefix cache each, prefill for uncached tokens only), one target at a time
# with fresh replicas: stoke with affinity through two edges (alone, and as
# a cluster on a local nats-server sharing their load), stoke without
# affinity, and vLLM's router (cache_aware and power_of_two). Loopback only.
#
#   benches/affinity/run.sh            # needs target/release/stoke and target/py (openai, vllm-router)
#
# Prints a markdown table; raw JSON lines go to benches/affinity/out/.
set -euo pipefail
cd "$(dirname "$0")/../.."
STOKE=${STOKE:-target/release/stoke}
PY=${PY:-target/py/bin/python}
ROUTER=${ROUTER:-target/py/bin/vllm-router}
OUT=benches/affinity/out
mkdir -p "$OUT"
REPLICAS=${REPLICAS:-4}
BASE=${BASE:-19100}
LOAD_ARGS=${LOAD_ARGS:---sessions 48 --turns 4 --concurrency 12}
CACHE_TOKENS=${CACHE_TOKENS:-65536}
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=(); }
trap cleanup EXIT

wait_http() { for _ in $(seq 100); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "no answer from $1" >&2; return 1; }

start_replicas() {
  REP_URLS=()
  for i in $(seq 0 $((REPLICAS - 1))); do
    port=$((BASE + i))
    "$STOKE" sim replica --listen "127.0.0.1:$port" --name "r$i" --model m \
      --tokens-per-sec 400 --prefill-tokens-per-sec 4000 --max-concurrency 16 --cache-tokens "$CACHE_TOKENS" 2>/dev/null &
    PIDS+=($!)
    REP_URLS+=("http://127.0.0.1:$port")
  done
  for u in "${REP_URLS[@]}"; do wait_http "$u/health"; done
}

stoke_config() {  # $1: affinity table or empty
  local reps; reps=$(for u in "${REP_URLS[@]}"; do printf '"%s",' "${u#http://}"; done)
  cat <<TOML
[edge]
http = "127.0.0.1:0"
admin = "127.0.0.1:0"
debug_headers = true
threads = 1
measure_rtt = false
[[location]]
id = "fra"
lat = 50.11
lon = 8.68
[[location]]
id = "par"
lat = 48.86
lon = 2.35
[[pool]]
id = "fra-gpu"
location = "fra"
serves = ["m"]
replicas = [${reps%,}]
max_concurrency = 16
health = { path = "/health", interval = "1s", timeout = "500ms" }
load = { path = "/metrics", format = "vllm", interval = "250ms" }
$1
[[route]]
path_prefix = "/v1/"
service_from = "body:model"
TOML
}

selected() { [[ "$1" =~ ${ONLY:-.} ]]; }  # ONLY=REGEX runs the targets whose name matches

run_stoke() {  # $1: name, $2: affinity table, $3: "cluster" to share load over NATS, "one" for a single edge
  selected "$1" || return 0
  start_replicas
  local cfg="$OUT/$1.toml"
  stoke_config "$2" > "$cfg"
  if [ "${3:-}" = cluster ]; then
    local sd; sd=$(mktemp -d)
    nats-server -a 127.0.0.1 -p 19195 -js -sd "$sd" >/dev/null 2>&1 & PIDS+=($!)
    for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/19195) 2>/dev/null && break; sleep 0.1; done
    printf '\n[cluster]\nnats = ["nats://127.0.0.1:19195"]\nname = "affinity"\n' >> "$cfg"
  fi
  # Two edges with fixed ports, so the load can alternate between them.
  sed 's/http = "127.0.0.1:0"/http = "127.0.0.1:19180"/' "$cfg" > "$cfg.fra"
  sed 's/http = "127.0.0.1:0"/http = "127.0.0.1:19181"/' "$cfg" > "$cfg.par"
  "$STOKE" serve --config "$cfg.fra" --location fra 2>/dev/null & PIDS+=($!)
  "$STOKE" serve --config "$cfg.par" --location par 2>/dev/null & PIDS+=($!)
  wait_http http://127.0.0.1:19180/v1/models; wait_http http://127.0.0.1:19181/v1/models
  local reps=(); for u in "${REP_URLS[@]}"; do reps+=(--replica "$u"); done
  local second=19181; [ "${3:-}" = one ] && second=19180
  echo "{\"target\":\"$1\",\"result\":$("$PY" benches/affinity/load.py --target http://127.0.0.1:19180 --target http://127.0.0.1:$second "${reps[@]}" $LOAD_ARGS)}" | tee -a "$OUT/results.jsonl"
  cleanup
}

run_router() {  # $1: policy
  selected "vllm-router $1" || return 0
  start_replicas
  "$ROUTER" --host 127.0.0.1 --port 19190 --worker-urls "${REP_URLS[@]}" --policy "$1" --log-level error >/dev/null 2>&1 & PIDS+=($!)
  for _ in $(seq 200); do curl -fs http://127.0.0.1:19190/health >/dev/null 2>&1 && break; sleep 0.1; done
  local reps=(); for u in "${REP_URLS[@]}"; do reps+=(--replica "$u"); done
  echo "{\"target\":\"vllm-router $1\",\"result\":$("$PY" benches/affinity/load.py --target http://127.0.0.1:19190 "${reps[@]}" $LOAD_ARGS)}" | tee -a "$OUT/results.jsonl"
  cleanup
}

: > "$OUT/results.jsonl"
run_stoke "stoke affinity (2 edges)" $'[pool.affinity]\nkey = "prefix"'
run_stoke "stoke affinity (2 edges, cluster)" $'[pool.affinity]\nkey = "prefix"' cluster
for ml in ${MAX_LOADS-1.25}; do run_stoke "stoke affinity max_load $ml (2 edges, cluster)" $'[pool.affinity]\nkey = "prefix"\nmax_load = '"$ml" cluster; done
run_stoke "stoke affinity (1 edge)" $'[pool.affinity]\nkey = "prefix"' one
run_stoke "stoke p2c (2 edges)" ""
run_router cache_aware
run_router power_of_two

"$PY" - "$OUT/results.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| target | requests | errors | req/s | cache hit rate | TTFT p50 ms | TTFT p99 ms | load max/mean p50 | p95 | steady p50 | steady p95 |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for r in rows:
    x = r["result"]
    f = lambda v: "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))
    print(f"| {r['target']} | {x['requests']} | {x['errors']} | {f(x['req_per_s'])} | {f(x['hit_rate'])} | "
          f"{f(x['ttft_ms']['p50'])} | {f(x['ttft_ms']['p99'])} | {f(x['load_max_over_mean']['p50'])} | {f(x['load_max_over_mean']['p95'])} | "
          f"{f(x['load_steady']['p50'])} | {f(x['load_steady']['p95'])} |")
PYEOF
