#!/usr/bin/env python3
"""Tiny inference-like SSE upstream (stdlib only, asyncio, HTTP/1.1 keepalive).

GET /<anything>?n=TOKENS&ms=DELAY  -> text/event-stream, chunked,
    TOKENS events 'data: {"tok":i,"t":UNIX_TIME}\\n\\n', DELAY ms apart, then 'data: [DONE]'.
    "t" is the wall-clock time the event was written (sse_bench.py measures each
    event's delivery delay from it).
GET /health -> 200 "ok" at once (for stoke's health probe).
Defaults n=32, ms=5. Listens on 127.0.0.1:${PORT:-8085} only, listen backlog
${BACKLOG:-1024} (streams.sh raises it; the kernel caps it at net.core.somaxconn).
"""
import asyncio, os, time
from urllib.parse import urlsplit, parse_qs

HOST, PORT = "127.0.0.1", int(os.environ.get("PORT", "8085"))
BACKLOG = int(os.environ.get("BACKLOG", "1024"))

async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].decode("latin1")
            parts = line.split(" ")
            if len(parts) > 1 and parts[1] == "/health":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n")
                await writer.drain()
                continue
            q = parse_qs(urlsplit(parts[1] if len(parts) > 1 else "/").query)
            n = min(int(q.get("n", ["32"])[0]), 100000)
            ms = min(float(q.get("ms", ["5"])[0]), 10000.0)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            for i in range(n):
                ev = b'data: {"tok":%d,"t":%.6f}\n\n' % (i, time.time())
                writer.write(b"%x\r\n%s\r\n" % (len(ev), ev))
                await writer.drain()
                if ms > 0:
                    await asyncio.sleep(ms / 1000.0)
            ev = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(ev), ev))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()

async def main():
    srv = await asyncio.start_server(handle, HOST, PORT, backlog=BACKLOG)
    async with srv:
        await srv.serve_forever()

if __name__ == "__main__":
    asyncio.run(main())
