#!/usr/bin/env bash
# Soak: run the demo world (ten edges, simulated pools that sleep and wake,
# users following the sun) under its steady load for N minutes, with a
# config reload every 20 s and a pool put to sleep (replica churn) every
# 30 s, and report errors, RSS and open file descriptors over time.
# Not part of CI. Loopback only; bounded by the duration.
#
#   tests/scripts/soak.sh [MINUTES]     (default 10)
set -euo pipefail
cd "$(dirname "$0")/../.."
MINUTES=${1:-10}
STOKE=${STOKE:-target/release/stoke}
[ -x "$STOKE" ] || cargo build --release -p stoke-router --bin stoke
OUT=$(mktemp -d /tmp/stoke-soak.XXXXXX)

"$STOKE" demo --duration "${MINUTES}m" --day 2m --status 127.0.0.1:0 >"$OUT/demo.out" 2>"$OUT/demo.err" &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do grep -q "config " "$OUT/demo.out" 2>/dev/null && break; sleep 0.1; done
CONFIG=$(awk '/^  config /{print $2}' "$OUT/demo.out")
ORCH=$(grep -o 'http://127.0.0.1:[0-9]*/pools' "$CONFIG" | head -1 | sed 's|/pools||')
POOLS=$(grep -o 'pools/[a-z0-9-]*/sleep' "$CONFIG" | cut -d/ -f2 | sort -u)
echo "soak: ${MINUTES} min, demo pid $PID, config $CONFIG, orchestrator $ORCH"
printf '%8s %10s %6s %8s %8s\n' "t (s)" "RSS (KiB)" "fds" "reloads" "sleeps" | tee "$OUT/samples.txt"

start=$(date +%s); reloads=0; sleeps=0; next_reload=20; next_churn=30; next_sample=0
while kill -0 "$PID" 2>/dev/null; do
  t=$(( $(date +%s) - start ))
  if [ "$t" -ge "$next_reload" ]; then
    echo "# soak reload at ${t}s" >>"$CONFIG"; reloads=$((reloads + 1)); next_reload=$((t + 20))
  fi
  if [ "$t" -ge "$next_churn" ]; then
    pool=$(echo "$POOLS" | shuf -n1)
    curl -s -m 2 -X POST "$ORCH/pools/$pool/sleep" -d '{"edge":"soak","reason":"churn"}' >/dev/null || true
    sleeps=$((sleeps + 1)); next_churn=$((t + 30))
  fi
  if [ "$t" -ge "$next_sample" ] && [ -r "/proc/$PID/status" ]; then
    rss=$(awk '/VmRSS/{print $2}' "/proc/$PID/status" 2>/dev/null || echo 0)
    fds=$(ls "/proc/$PID/fd" 2>/dev/null | wc -l)
    printf '%8d %10d %6d %8d %8d\n' "$t" "$rss" "$fds" "$reloads" "$sleeps" | tee -a "$OUT/samples.txt"
    next_sample=$((t + 15))
  fi
  sleep 1
done
wait "$PID" && status=0 || status=$?
echo
sed -n '/^stoke demo: ran/,$p' "$OUT/demo.out"
echo "exit status $status; samples in $OUT/samples.txt"
