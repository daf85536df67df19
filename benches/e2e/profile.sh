#!/usr/bin/env bash
# Profile stoke on the end-to-end bench's HTTP/1.1 path (scenario 1's load):
# the static upstream on cpu0 with the load generator, stoke alone on cpu1.
#
# Usage: benches/e2e/profile.sh [--perf SECS | --callgrind REQUESTS] [options]
#   --perf SECS          sample stoke with `perf record -e cpu-clock` (this VM has no hardware
#                        counters; cpu-clock is a software timer, kernel time included) while
#                        `wrk -t1 -c64` runs SECS seconds; prints self time by function, by
#                        crate (pingora / tokio / stoke / kernel / ...) and by DSO  (default: --perf 10)
#   --callgrind N        run stoke under valgrind's callgrind and count instructions over N requests
#                        (`h2load --h1 -c64 -n N`, counters reset after a warm-up):
#                        deterministic to about ±0.5 %;
#                        prints instructions per request and the top functions
#   --syscalls N         count the proxy's system calls over N requests (`perf trace -s`, h2load --h1 -c64 -n N)
#   --target NAME        stoke (default), or haproxy / nginx for the same measurement of a peer, or
#                        engine-proxy / engine-loop: the two minimal forwarders on pingora of
#                        stoke-benches (src/engine.rs), pingora-proxy's ProxyHttp against a loop of
#                        stoke's own on pingora-core (build: cargo build --profile perf -p stoke-benches --bins)
#   --stoke BIN          stoke binary (default target/perf/stoke)
#   --access-log         stoke with its access log on (RUST_LOG=info, to a file), as it runs by
#                        default; without it the bench runs stoke with RUST_LOG=warn
#   --tls                profile the HTTPS listener instead (h2load -c64 -m10 over TLS for --perf)
#   --rate R             --perf under scenario 5's load instead: h3load --h1 -c8 --rate R (open loop)
#   --tracing RATIO      stoke with [tracing] (sample = RATIO, 0 to 1) exporting to an OTLP/HTTP sink
#                        on 127.0.0.1:4318 (a Python server on cpu0 that answers 200 to every export)
# Env: BENCH_WORK (default /tmp/stoke-e2e): output goes to $BENCH_WORK/profile/DATE/
set -euo pipefail

DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$DIR/../.." && pwd)"
MODE=perf SECS=10 REQS=200000 TARGET=stoke TLS=0 LOG=warn RATE="" TRACING="" STOKE_BIN="$ROOT/target/perf/stoke"
while [ $# -gt 0 ]; do
  case "$1" in
    --perf) MODE=perf; SECS="$2"; shift 2;;
    --callgrind) MODE=callgrind; REQS="$2"; shift 2;;
    --syscalls) MODE=syscalls; REQS="$2"; shift 2;;
    --target) TARGET="$2"; shift 2;;
    --stoke) STOKE_BIN="$2"; shift 2;;
    --tls) TLS=1; shift;;
    --access-log) LOG=info; shift;;
    --rate) RATE="$2"; shift 2;;
    --tracing) TRACING="$2"; shift 2;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0;;
    *) echo "unknown argument $1 (see -h)" >&2; exit 2;;
  esac
done
[ "$SECS" -ge 1 ] && [ "$SECS" -le 120 ] || { echo "--perf SECS must be 1..120" >&2; exit 2; }
[ "$REQS" -ge 1000 ] && [ "$REQS" -le 10000000 ] || { echo "--callgrind N must be 1000..10000000" >&2; exit 2; }
case "$TARGET" in stoke|haproxy|nginx|engine-proxy|engine-loop) ;;
  *) echo "--target: stoke, haproxy, nginx, engine-proxy or engine-loop" >&2; exit 2;; esac
need=(nginx wrk h2load taskset curl python3)
[ "$MODE" = perf ] && need+=(perf)
[ "$MODE" = syscalls ] && need+=(perf)
[ "$MODE" = callgrind ] && need+=(valgrind callgrind_control callgrind_annotate)
[ "$TARGET" = haproxy ] && need+=(haproxy)
for t in "${need[@]}"; do
  command -v "$t" >/dev/null || { echo "missing $t (Debian: apt-get install -y nginx haproxy wrk nghttp2-client linux-perf valgrind)" >&2; exit 1; }
done
[ "$TARGET" != stoke ] || [ -x "$STOKE_BIN" ] || { echo "no $STOKE_BIN: cargo build --profile perf -p stoke-router --bin stoke" >&2; exit 1; }
ENGINE_BIN="$(dirname "$STOKE_BIN")/$TARGET"
case "$TARGET" in engine-*) [ -x "$ENGINE_BIN" ] || { echo "no $ENGINE_BIN: cargo build --profile perf -p stoke-benches --bins" >&2; exit 1; };; esac

WORK="${BENCH_WORK:-/tmp/stoke-e2e}"
OUT="$WORK/profile/$(date +%Y%m%d-%H%M%S)-$TARGET-$MODE"
RUN="$WORK/run-profile"
mkdir -p "$OUT" "$RUN/upstream/tmp" "$RUN/nginx/tmp"
# shellcheck source=common.sh
. "$DIR/common.sh"
require_free_ports
CERT="$ROOT/config/examples/certs/example.crt" KEY="$ROOT/config/examples/certs/example.key"
cat "$CERT" "$KEY" >"$RUN/example.pem"
for f in upstream.conf nginx.conf haproxy.cfg; do
  sed -e "s#@CERT@#$CERT#g" -e "s#@KEY@#$KEY#g" -e "s#@PEM@#$RUN/example.pem#g" "$DIR/$f" >"$RUN/$f"
done
start() { local name="$1" cpu="$2"; shift 2
  taskset -c "$cpu" "$@" >"$OUT/$name.stdout" 2>"$OUT/$name.stderr" & PIDS+=($!); }
wait_200() { for _ in $(seq 1 300); do
    [ "$(curl -sk -o /dev/null -m 1 -w '%{http_code}' "$1")" = 200 ] && return 0; sleep 0.2; done
  echo "$1 not answering 200 (see $OUT)" >&2; exit 1; }

start upstream 0 nginx -p "$RUN/upstream/" -c "$RUN/upstream.conf"
start sse 0 python3 "$DIR/sse_upstream.py"
wait_200 http://127.0.0.1:8080/; wait_200 http://127.0.0.1:8085/health
STOKE_CONFIG="$DIR/stoke.toml"
if [ -n "$TRACING" ]; then
  start_otlp_sink 0
  STOKE_CONFIG="$RUN/stoke-tracing.toml"
  sed -e "s#\.\./\.\./config/#$ROOT/config/#" "$DIR/stoke.toml" >"$STOKE_CONFIG"
  printf '\n[tracing]\nendpoint = "http://127.0.0.1:4318/v1/traces"\nsample = %s\n' "$TRACING" >>"$STOKE_CONFIG"
fi
PREFIX=()
[ "$MODE" = callgrind ] && PREFIX=(valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out")
case "$TARGET" in
  stoke)   start stoke 1 env RUST_LOG="$LOG" "${PREFIX[@]}" "$STOKE_BIN" serve --config "$STOKE_CONFIG"
           H1=127.0.0.1:8084 TLSA=127.0.0.1:8444;;
  engine-*) # plain HTTP/1.1 only, on stoke's port, to the same nginx upstream
           start "$TARGET" 1 "${PREFIX[@]}" "$ENGINE_BIN" 127.0.0.1:8084 127.0.0.1:8080
           H1=127.0.0.1:8084 TLSA="";;
  haproxy) start haproxy 1 "${PREFIX[@]}" haproxy -db -f "$RUN/haproxy.cfg"; H1=127.0.0.1:8082 TLSA=127.0.0.1:8442;;
  nginx)   # one process (no master) so that the profiler sees the worker
           sed -i 's/^master_process on;/master_process off;/' "$RUN/nginx.conf"
           start nginx 1 "${PREFIX[@]}" nginx -p "$RUN/nginx/" -c "$RUN/nginx.conf"; H1=127.0.0.1:8081 TLSA=127.0.0.1:8441;;
esac
PID="${PIDS[-1]}"
wait_200 "http://$H1/"
[ "$TLS" = 0 ] || [ -n "$TLSA" ] || { echo "--tls: $TARGET has no TLS listener" >&2; exit 2; }
if [ "$TLS" = 1 ]; then URL="https://${TLSA/127.0.0.1/localhost}/"; else URL="http://$H1/"; fi
echo "== $TARGET (pid $PID) $MODE, $URL; output in $OUT"

if [ "$MODE" = perf ]; then
  timeout 30 taskset -c 0 wrk -t1 -c64 -d3s "http://$H1/" >/dev/null   # warm-up
  H3LOAD="${H3LOAD:-$WORK/h3load-target/release/h3load}"
  if [ -n "$RATE" ]; then
    [ -x "$H3LOAD" ] || { echo "--rate needs h3load (run.sh builds it)" >&2; exit 1; }
    LOADCMD=("$H3LOAD" --h1 "$H1" -c8 --rate "$RATE" -d"$SECS" --warmup 0)
  elif [ "$TLS" = 1 ]; then
    LOADCMD=(h2load -t1 -c64 -m10 -D"$SECS" "$URL")
  else
    LOADCMD=(wrk -t1 -c64 -d"${SECS}s" --latency "$URL")
  fi
  timeout $((SECS + 30)) taskset -c 0 "${LOADCMD[@]}" >"$OUT/load.txt" 2>&1 &
  LOADPID=$!
  sleep 1
  timeout $((SECS + 10)) perf record -e cpu-clock -F 4999 -p "$PID" -o "$OUT/perf.data" -- sleep $((SECS - 2)) \
    >"$OUT/perf-record.txt" 2>&1 || true
  wait "$LOADPID" || true
  grep -E 'Requests/sec|req/s|99%|p99_us' "$OUT/load.txt" || true
  perf report -i "$OUT/perf.data" --stdio --no-children --sort dso,symbol --percent-limit 0.01 2>/dev/null \
    >"$OUT/report.txt" || true
  python3 "$DIR/profile_group.py" perf "$OUT/report.txt" | tee "$OUT/summary.txt"
elif [ "$MODE" = syscalls ]; then
  timeout 60 taskset -c 0 h2load --h1 -t1 -c64 -n 20000 "$URL" >/dev/null 2>&1 || true
  timeout 600 perf trace -s -p "$PID" -o "$OUT/trace.txt" &
  TRACEPID=$!
  sleep 2
  timeout 600 taskset -c 0 h2load --h1 -t1 -c64 -n "$REQS" "$URL" >"$OUT/load.txt" 2>&1 || true
  sleep 1
  kill -INT "$TRACEPID" 2>/dev/null || true
  wait "$TRACEPID" 2>/dev/null || true
  grep -E 'finished|succeeded' "$OUT/load.txt" || true
  # sum the per-thread tables of `perf trace -s`: calls per syscall, per request
  awk -v n="$REQS" '$1 ~ /^[a-z_0-9]+$/ && $2 ~ /^[0-9]+$/ && NF >= 6 { c[$1] += $2; t += $2 }
    END { for (k in c) if (c[k] / n >= 0.01) printf "  %-16s %6.2f\n", k, c[k] / n | "sort -k2 -rn";
          close("sort -k2 -rn"); printf "system calls per request (over %d requests): %.2f\n", n, t / n }' \
    "$OUT/trace.txt" | tee "$OUT/summary.txt"
else
  # warm-up, then count exactly the measured requests
  timeout 300 taskset -c 0 h2load --h1 -t1 -c64 -n 20000 "$URL" >/dev/null 2>&1 || true
  callgrind_control -z "$PID" >/dev/null
  timeout 3600 taskset -c 0 h2load --h1 -t1 -c64 -n "$REQS" "$URL" >"$OUT/load.txt" 2>&1 || true
  callgrind_control -d "$PID" >/dev/null
  sleep 1
  grep -E 'finished|succeeded' "$OUT/load.txt" || true
  f=$(ls -t "$OUT"/callgrind.out* | head -1)
  callgrind_annotate --inclusive=yes --threshold=99 "$f" >"$OUT/annotate-inclusive.txt" 2>/dev/null || true
  python3 "$DIR/profile_group.py" callgrind "$f" "$REQS" | tee "$OUT/summary.txt"
fi
echo "raw: $OUT"
