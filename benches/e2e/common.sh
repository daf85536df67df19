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

# An OTLP/HTTP sink on 127.0.0.1:4318 for stoke's [tracing]: every export is
# answered 200 with an empty (valid) protobuf body. Needs run.sh's or
# profile.sh's `start`; $1 is the CPU to pin it to.
start_otlp_sink() {
  start otlp-sink "$1" python3 -c '
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200); self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", 4318), H).serve_forever()'
}
