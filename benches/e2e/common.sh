# Shared by run.sh and profile.sh (sourced, not run): the processes they
# start, ended on exit, and the check that the bench's ports are free.

PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Every TCP port a bench server listens on must be free (an earlier run or
# profile still running would answer in its place).
require_free_ports() {
  local p
  for p in 8080 8450 8081 8441 8082 8442 8084 8444 8085 8099; do
    if ss -ltnH "sport = :$p" | grep -q .; then
      echo "TCP port $p busy: is another run.sh or profile.sh still running? Stop it first" >&2
      exit 1
    fi
  done
}
