#!/usr/bin/env bash
# The floor under stoke: HTTP/1.1 keep-alive (wrk -t1 -c64, 100-byte answers) through
# HAProxy, through the minimal forwarding loop on pingora-core's HTTP/1 sessions that
# stoke's engine was prototyped as (stoke-benches' engine-loop: no routing, no header
# edits, no log), through stoke (on hyper, its access log off), and through stoke with
# its access log on, as it is run (stoke-log: RUST_LOG=info, the log to a file),
# interleaved in rounds (H E S L H E S L ...), each proxy alone on cpu1, wrk and the
# upstream on cpu0. See ../README.md ("The floor on pingora-core", "The data path on
# hyper") and README.md beside this file ("Profiling").
#
# Usage: benches/e2e/floor.sh [-r ROUNDS (default 3)] [-d SECS (default 8)]
# Needs: cargo build --profile perf -p stoke-router --bin stoke && \
#        cargo build --profile perf -p stoke-benches --bin engine-loop; nginx, haproxy, wrk.
# Ports: upstream 8080, HAProxy 8082 (haproxy.cfg), stoke 8084 (stoke.toml), loop 8086,
# stoke-log 8088 (stoke.toml with its ports moved: 8088, 8448, admin 8098);
# 127.0.0.1 only; every load run is bounded by -d and wrapped in `timeout`.
set -euo pipefail

DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$DIR/../.." && pwd)"
ROUNDS=3 D=8
while getopts "r:d:h" o; do
  case "$o" in r) ROUNDS="$OPTARG";; d) D="$OPTARG";; *) sed -n '2,15p' "$0"; exit 2;; esac
done
STOKE="$ROOT/target/perf/stoke" LOOP="$ROOT/target/perf/engine-loop"
for b in "$STOKE" "$LOOP"; do [ -x "$b" ] || { echo "no $b (see the usage)" >&2; exit 1; }; done
for t in nginx haproxy wrk taskset; do command -v "$t" >/dev/null || { echo "needs $t" >&2; exit 1; }; done
if [ "$(id -u)" = 0 ]; then NICE=(nice -n -10); else NICE=(); fi

# shellcheck source=common.sh
. "$DIR/common.sh"
require_free_ports
for p in 8086 8088 8448 8098; do
  if ss -ltnH "sport = :$p" | grep -q .; then echo "TCP port $p busy: stop what listens there first" >&2; exit 1; fi
done
OUT="${BENCH_WORK:-/tmp/stoke-e2e}/floor/$(date +%Y%m%d-%H%M%S)"
RUN="$OUT/run"
mkdir -p "$RUN/upstream/tmp" "$RUN/upstream/logs"
CERT="$ROOT/config/examples/certs/example.crt" KEY="$ROOT/config/examples/certs/example.key"
cat "$CERT" "$KEY" >"$RUN/example.pem"
for f in upstream.conf haproxy.cfg; do
  sed -e "s#@CERT@#$CERT#g" -e "s#@KEY@#$KEY#g" -e "s#@PEM@#$RUN/example.pem#g" "$DIR/$f" >"$RUN/$f"
done
# The second stoke: its own ports, certificates where the copy can find them.
sed -e 's/:8084"/:8088"/; s/:8444"/:8448"/g; s/:8099"/:8098"/' -e "s#\"../../config/#\"$ROOT/config/#g" \
  "$DIR/stoke.toml" >"$RUN/stoke-log.toml"

start() { # name cpu cmd...
  local name="$1" cpu="$2"; shift 2
  taskset -c "$cpu" "${NICE[@]}" "$@" >"$OUT/$name.stdout" 2>"$OUT/$name.stderr" &
  PIDS+=($!)
}
wait_200() {
  for _ in $(seq 1 100); do
    [ "$(curl -s -o /dev/null -m 1 -w '%{http_code}' "$1")" = 200 ] && return 0
    sleep 0.2
  done
  echo "$1 is not answering 200 (see $OUT/*.stderr)" >&2; exit 1
}

start upstream 0 nginx -p "$RUN/upstream/" -c "$RUN/upstream.conf"
wait_200 http://127.0.0.1:8080/
start haproxy 1 haproxy -db -f "$RUN/haproxy.cfg"
start engine-loop 1 "$LOOP" 127.0.0.1:8086 127.0.0.1:8080
start stoke 1 env RUST_LOG=warn "$STOKE" serve --config "$DIR/stoke.toml"
# The access log is an info event: it goes to stoke-log.stderr.
start stoke-log 1 env RUST_LOG=info "$STOKE" serve --config "$RUN/stoke-log.toml"
TARGETS=(haproxy:8082 engine-loop:8086 stoke:8084 stoke-log:8088)
for t in "${TARGETS[@]}"; do wait_200 "http://127.0.0.1:${t##*:}/"; done
for t in "${TARGETS[@]}"; do timeout 20 taskset -c 0 wrk -t1 -c64 -d2s "http://127.0.0.1:${t##*:}/" >/dev/null; done

echo "round target req/s p99" | tee "$OUT/results.txt"
for r in $(seq 1 "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    out=$(timeout $((D + 20)) taskset -c 0 "${NICE[@]}" wrk -t1 -c64 -d"${D}s" --latency "http://127.0.0.1:${t##*:}/")
    echo "$r ${t%%:*} $(echo "$out" | awk '/Requests\/sec/{print $2}') $(echo "$out" | awk '$1=="99%"{print $2}')" \
      | tee -a "$OUT/results.txt"
  done
done
# Medians over the rounds, and each round's ratio to HAProxy's (median of the ratios).
python3 - "$OUT/results.txt" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]).read().splitlines()[1:]]
def ms(v):
    for unit, f in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if v.endswith(unit):
            return float(v[: -len(unit)]) * f
    return float(v)
by = {}
for r, t, rps, p99 in rows:
    by.setdefault(t, {})[r] = (float(rps), ms(p99))
base = by["haproxy"]
print("| target | req/s (median) | ÷ HAProxy | p99 ms (median) | ÷ HAProxy |")
print("| --- | ---: | ---: | ---: | ---: |")
for t, runs in by.items():
    rps = statistics.median(v[0] for v in runs.values())
    p99 = statistics.median(v[1] for v in runs.values())
    r_rps = statistics.median(runs[r][0] / base[r][0] for r in runs)
    r_p99 = statistics.median(runs[r][1] / base[r][1] for r in runs)
    print(f"| {t} | {rps:,.0f} | {r_rps:.2f} | {p99:.2f} | {r_p99:.2f} |")
EOF
echo "raw: $OUT/results.txt"
