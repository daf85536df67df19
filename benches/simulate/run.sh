#!/usr/bin/env bash
# The idle-policy tables and trade-off curves of benches/README.md (fixed
# windows and auto with one depth of sleep; auto-light with two):
# `stoke simulate` on a day of the demo's traffic and on the Azure LLM
# inference trace (conversation services, one hour, stretched to a day and
# spread over the ten edges of config/examples/network.toml by daylight).
#
#   benches/simulate/run.sh [DEMO_TRACE] [AZURE_CSV]
#
# DEMO_TRACE: a day recorded with `stoke demo --duration 4m --record FILE`
# (recorded first when missing: four minutes). AZURE_CSV: the Azure trace
# (default ../shared/traces/azure-llm-2023-conv.csv).
set -euo pipefail
cd "$(dirname "$0")/../.."
S=target/release/stoke
[ -x "$S" ] || cargo build --release
DEMO=${1:-target/demo-day.jsonl}
AZURE=${2:-../shared/traces/azure-llm-2023-conv.csv}
ASSIGN=edges=sun,models=zipf:1,stretch=24,start=0
if [ ! -s "$DEMO" ]; then
  echo "recording a demo day into $DEMO (4 minutes)" >&2
  "$S" demo --duration 4m --record "$DEMO" --status 127.0.0.1:0 >/dev/null 2>&1
fi
windows=(10s 30s 1m 2m 5m 10m 30m)
curve() { # label, simulate args...
  local label=$1; shift
  local args=()
  for w in "${windows[@]}"; do args+=(--policy "fixed:$w"); done
  "$S" simulate "$@" --policy always-on "${args[@]}" --policy auto --policy auto-light --json |
    python3 benches/simulate/table.py "$label"
}
curve "demo day ($DEMO)" --demo --trace "$DEMO"
curve "Azure conv, $ASSIGN" --config config/examples/network.toml --trace "$AZURE" --assign "$ASSIGN"
echo
echo "a week of the Azure trace (stretch=168), every default policy:"
time "$S" simulate --config config/examples/network.toml --trace "$AZURE" \
  --assign edges=sun,models=zipf:1,stretch=168,start=0 --json >/dev/null
