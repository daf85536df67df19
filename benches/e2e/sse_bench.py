#!/usr/bin/env python3
"""SSE token-stream bench (stdlib only, loopback only): time to first byte and
per-event delivery delay through a proxy, for one target per run.

  sse_bench.py ADDR [-c STREAMS] [-d SECS] [-n TOKENS] [--ms DELAY]

STREAMS concurrent keep-alive connections each GET /sse?n=TOKENS&ms=DELAY from
sse_upstream.py (through the proxy at ADDR, or straight at :8085 for "direct")
again and again for SECS seconds. Every event carries the wall-clock time the
upstream wrote it ("t"), so each event's delivery delay is measured on its own:
delay = time it was read here - t. Through a proxy, delay - (delay direct) is
what the proxy adds to every token (the number the SSE goal is about), and
the time from sending the request to the first event is the TTFB.

Prints one JSON line: streams (completed), events, errors, ttfb_p50/p99_ms,
delay_p50/p99/p999_ms, gap_p99_ms (time between consecutive events of one
stream), and tokens_ok (every stream had all its events and [DONE]).
"""
import argparse, asyncio, json, re, time

EVENT = re.compile(rb'data: \{"tok":(\d+),"t":([\d.]+)\}')


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    k = max(1, min(len(xs), int(-(-q * len(xs) // 1))))  # nearest rank
    return xs[k - 1]


async def stream_loop(host, port, path, stop_at, out):
    reader, writer = await asyncio.open_connection(host, port)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        import socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    req = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
           "Accept: text/event-stream\r\n\r\n").encode()
    try:
        while time.time() < stop_at:
            t0 = time.time()
            writer.write(req)
            await writer.drain()
            buf = b""
            pos = 0
            first = None
            last = None
            seen = 0
            deadline = t0 + 10
            while not (b"[DONE]" in buf and buf.endswith(b"0\r\n\r\n")):
                remaining = deadline - time.time()
                if remaining <= 0:
                    raise TimeoutError("stream took > 10 s")
                d = await asyncio.wait_for(reader.read(65536), remaining)
                now = time.time()
                if not d:
                    raise ConnectionError("closed mid-stream")
                buf += d
                for m in EVENT.finditer(buf, pos):
                    out["delay"].append(now - float(m.group(2)))
                    if first is None:
                        first = now
                    elif last is not None:
                        out["gap"].append(now - last)
                    last = now
                    seen += 1
                    pos = m.end()
            out["ttfb"].append(first - t0 if first is not None else None)
            out["streams"] += 1
            out["events"] += seen
            out["expected"] += out["tokens"]
    except Exception as e:  # noqa: BLE001 - counted and reported
        out["errors"] += 1
        out["first_error"] = out["first_error"] or repr(e)
    finally:
        writer.close()


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("addr")
    ap.add_argument("-c", type=int, default=16, help="concurrent streams (default 16)")
    ap.add_argument("-d", type=float, default=10, help="seconds (default 10)")
    ap.add_argument("-n", type=int, default=32, help="tokens per stream (default 32)")
    ap.add_argument("--ms", type=float, default=5, help="ms between tokens (default 5)")
    a = ap.parse_args()
    host, port = a.addr.rsplit(":", 1)
    if not (host.startswith("127.") or host == "localhost"):
        raise SystemExit("loopback only")
    out = {"ttfb": [], "delay": [], "gap": [], "streams": 0, "events": 0, "expected": 0, "errors": 0,
           "first_error": None, "tokens": a.n}
    path = f"/sse?n={a.n}&ms={a.ms:g}"
    stop_at = time.time() + a.d
    await asyncio.gather(*(stream_loop(host, int(port), path, stop_at, out) for _ in range(a.c)))
    ms = lambda v: None if v is None else round(v * 1e3, 3)  # noqa: E731
    ttfb = [t for t in out["ttfb"] if t is not None]
    print(json.dumps({
        "kind": "sse", "conns": a.c, "streams": out["streams"], "events": out["events"],
        "errors": out["errors"], "first_error": out["first_error"],
        "tokens_ok": out["events"] == out["expected"],
        "ttfb_p50_ms": ms(pct(ttfb, 0.5)), "ttfb_p99_ms": ms(pct(ttfb, 0.99)),
        "delay_p50_ms": ms(pct(out["delay"], 0.5)), "delay_p99_ms": ms(pct(out["delay"], 0.99)),
        "delay_p999_ms": ms(pct(out["delay"], 0.999)), "gap_p99_ms": ms(pct(out["gap"], 0.99)),
    }))


if __name__ == "__main__":
    asyncio.run(main())
