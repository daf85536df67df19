#!/usr/bin/env python3
"""Hold N long SSE streams open through a proxy (stdlib only, asyncio), for streams.sh.

  streams_client.py h1 127.0.0.1:8084 -n 10000 --path '/sse?n=3600&ms=1000'
      N plain HTTP/1.1 connections, one stream each.
  streams_client.py h2 127.0.0.1:8444 -n 10000 -m 100 --path ...
      ceil(N/M) TLS connections (ALPN h2, SNI --host), M concurrent streams each.

A stream counts as open once its response head (status 200) and its first
body bytes (an SSE event) have arrived, and until it ends or fails; "head"
counts the 200 heads received, "closed" the streams that ended after that. At most
--par connections are being set up at once (so no listen backlog overflows).
Every 0.5 s the counters go to --status FILE as one JSON object (written
atomically): requested, conns, head, open, failed, closed, events, bytes, the
HTTP/2 servers' SETTINGS_MAX_CONCURRENT_STREAMS, and errors by kind. The
client holds the streams until it is killed or --hold seconds have passed.

The HTTP/2 side is minimal and only what this needs: requests are HPACK
literals (no Huffman, no dynamic table); responses are not decoded except
that a header block starting 0x88 (static index 8, ":status: 200", what every
proxy here sends) is a 200; our receive windows are opened to 2^31-1 at the
start, so no WINDOW_UPDATE is ever due; PINGs and SETTINGS are acknowledged.
"""
import argparse, asyncio, json, os, ssl, struct, sys, time

C = dict(requested=0, conns=0, head=0, open=0, failed=0, closed=0, events=0, bytes=0)
ERR = {}
MAXSTREAMS = set()


def err(kind):
    ERR[kind] = ERR.get(kind, 0) + 1


def write_status(path, done=False):
    if not path:
        return
    d = dict(C, errors=ERR, server_max_streams=sorted(MAXSTREAMS), t=time.time(), done=done)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(d, f)
    os.replace(tmp, path)


# ---------------------------------------------------------------- HTTP/1.1

async def h1_stream(a, sem):
    async with sem:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(a.host_ip, a.port), 10)
            C["conns"] += 1
            w.write(b"GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n\r\n"
                    % (a.path.encode(), a.host.encode()))
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            if head.split(b" ", 2)[1:2] != [b"200"]:
                err("status " + head.split(b"\r\n", 1)[0].decode("latin1", "replace")[:40])
                C["failed"] += 1
                w.close()
                return
            C["head"] += 1
            data = await asyncio.wait_for(r.read(65536), 10)
            if not data:
                raise ConnectionError("eof before first event")
            C["open"] += 1
            C["bytes"] += len(data)
            C["events"] += data.count(b"data:")
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            err(type(e).__name__ + (" " + str(e)[:40] if str(e) else ""))
            C["failed"] += 1
            return
    try:
        while True:
            data = await r.read(65536)
            if not data:
                break
            C["bytes"] += len(data)
            C["events"] += data.count(b"data:")
            if b"[DONE]" in data:  # the stream's last event (the connection stays open)
                break
    except OSError as e:
        err(type(e).__name__)
    C["open"] -= 1
    C["closed"] += 1
    w.close()


# ---------------------------------------------------------------- HTTP/2

DATA, HEADERS, RST, SETTINGS, PING, GOAWAY, WINUP = 0, 1, 3, 4, 6, 7, 8


def frame(typ, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([typ, flags]) + struct.pack(">I", sid) + payload


def hpack_str(s):
    b = s.encode()
    assert len(b) < 127
    return bytes([len(b)]) + b


def h2_request(a):
    # :method GET (2), :scheme https (7), :path (name 4), :authority (name 1): literals without indexing
    return (b"\x82\x87" + b"\x04" + hpack_str(a.path) + b"\x01" + hpack_str(a.host)
            + b"\x00" + hpack_str("accept") + hpack_str("text/event-stream"))


async def h2_conn(a, sem, nstreams, ctx):
    streams = {}  # sid -> "new" | "head" | "open" | "done"

    def end(sid, failed, why=None):
        s = streams.get(sid)
        if s is None or s == "done":
            return
        if s == "open":
            C["open"] -= 1
        if failed or s == "new":
            C["failed"] += 1
            err(why or "stream ended before first event")
        else:
            C["closed"] += 1
        streams[sid] = "done"

    async with sem:
        try:
            r, w = await asyncio.wait_for(
                asyncio.open_connection(a.host_ip, a.port, ssl=ctx, server_hostname=a.host), 10)
        except (OSError, asyncio.TimeoutError) as e:
            err("connect " + type(e).__name__)
            C["failed"] += nstreams
            return
        proto = w.get_extra_info("ssl_object").selected_alpn_protocol()
        if proto != "h2":
            err("alpn %s" % proto)
            C["failed"] += nstreams
            w.close()
            return
        C["conns"] += 1
        # preface; SETTINGS: ENABLE_PUSH 0, INITIAL_WINDOW_SIZE 2^31-1; connection window to 2^31-1
        w.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                + frame(SETTINGS, 0, 0, struct.pack(">HIHI", 2, 0, 4, 2**31 - 1))
                + frame(WINUP, 0, 0, struct.pack(">I", 2**31 - 1 - 65535)))
        req = h2_request(a)
        for k in range(nstreams):
            sid = 1 + 2 * k
            streams[sid] = "new"
            w.write(frame(HEADERS, 0x5, sid, req))  # END_STREAM | END_HEADERS
        await w.drain()

        async def first_events():  # hold the connect slot until every stream has begun
            while any(s in ("new", "head") for s in streams.values()):
                await asyncio.sleep(0.05)
        reader = asyncio.ensure_future(h2_read(r, w, streams, end))
        try:
            await asyncio.wait_for(asyncio.shield(first_events()), 15)
        except asyncio.TimeoutError:
            pass
    await reader
    w.close()


async def h2_read(r, w, streams, end):
    try:
        while True:
            h = await r.readexactly(9)
            ln = int.from_bytes(h[:3], "big")
            typ, flags = h[3], h[4]
            sid = int.from_bytes(h[5:9], "big") & 0x7FFFFFFF
            p = await r.readexactly(ln) if ln else b""
            if typ == DATA:
                s = streams.get(sid)
                C["bytes"] += ln
                C["events"] += p.count(b"data:")
                if s == "head" and ln:
                    streams[sid] = "open"
                    C["open"] += 1
                if flags & 0x1:
                    end(sid, False)
            elif typ == HEADERS:
                s = streams.get(sid)
                off = 0
                if flags & 0x8:
                    off += 1 + 0  # pad length byte (the padding is at the end)
                if flags & 0x20:
                    off += 5
                if s == "new":
                    if p[off:off + 1] == b"\x88":
                        streams[sid] = "head"
                        C["head"] += 1
                    else:
                        end(sid, True, "status block %s" % p[off:off + 1].hex())
                if flags & 0x1:
                    end(sid, False)
            elif typ == RST:
                code = int.from_bytes(p[:4], "big")
                end(sid, True, "RST_STREAM %d" % code)
            elif typ == SETTINGS and not flags & 0x1:
                for i in range(0, ln - ln % 6, 6):
                    k, v = struct.unpack(">HI", p[i:i + 6])
                    if k == 3:
                        MAXSTREAMS.add(v)
                w.write(frame(SETTINGS, 0x1, 0))
            elif typ == PING and not flags & 0x1:
                w.write(frame(PING, 0x1, 0, p))
            elif typ == GOAWAY:
                err("GOAWAY %d" % int.from_bytes(p[4:8], "big"))
    except (OSError, asyncio.IncompleteReadError) as e:
        if not isinstance(e, asyncio.IncompleteReadError):
            err(type(e).__name__)
    for sid in list(streams):
        end(sid, streams[sid] != "open", "connection closed")


# ---------------------------------------------------------------- main

async def main(a):
    t0 = time.monotonic()
    C["requested"] = a.n
    sem = asyncio.Semaphore(a.par)
    if a.proto == "h1":
        tasks = [asyncio.ensure_future(h1_stream(a, sem)) for _ in range(a.n)]
    else:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        tasks, left = [], a.n
        while left > 0:
            k = min(a.m, left)
            tasks.append(asyncio.ensure_future(h2_conn(a, sem, k, ctx)))
            left -= k
    while time.monotonic() - t0 < a.hold:
        write_status(a.status)
        if all(t.done() for t in tasks):
            break
        await asyncio.sleep(0.5)
    write_status(a.status, done=True)
    print(json.dumps(dict(C, errors=ERR, server_max_streams=sorted(MAXSTREAMS))))
    sys.stdout.flush()
    os._exit(0)  # do not wait for the streams to end


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("proto", choices=["h1", "h2"])
    ap.add_argument("addr", help="IP:PORT")
    ap.add_argument("-n", type=int, required=True, help="streams")
    ap.add_argument("-m", type=int, default=100, help="h2: streams per connection (default 100)")
    ap.add_argument("--host", default="localhost", help="Host / :authority / SNI (default localhost)")
    ap.add_argument("--path", default="/sse?n=3600&ms=1000")
    ap.add_argument("--par", type=int, default=100, help="connections being set up at once (default 100)")
    ap.add_argument("--status", help="JSON status file, rewritten every 0.5 s")
    ap.add_argument("--hold", type=float, default=120, help="exit after this many seconds (default 120)")
    a = ap.parse_args()
    a.host_ip, a.port = a.addr.rsplit(":", 1)
    a.port = int(a.port)
    asyncio.run(main(a))
