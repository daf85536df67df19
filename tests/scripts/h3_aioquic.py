#!/usr/bin/env python3
"""One HTTP/3 GET and one POST (aioquic); prints status, headers and body. Exits non-zero on failure."""
import argparse, asyncio, ssl, sys
from aioquic.asyncio import QuicConnectionProtocol, connect
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamReset

class H3(QuicConnectionProtocol):
    def __init__(self, *a, **kw): super().__init__(*a, **kw); self.h3, self.reqs = H3Connection(self._quic), {}
    def quic_event_received(self, ev):
        if isinstance(ev, StreamReset) and ev.stream_id in self.reqs:
            self.reqs[ev.stream_id]["done"].set_exception(RuntimeError(f"stream reset, code {ev.error_code:#x}"))
        for e in self.h3.handle_event(ev):
            r = self.reqs.get(e.stream_id)
            if r is None or r["done"].done(): continue
            if isinstance(e, HeadersReceived): r["headers"] += e.headers
            elif isinstance(e, DataReceived): r["body"] += e.data
            if getattr(e, "stream_ended", False): r["done"].set_result(r)
    async def request(self, method, authority, path, body=b""):
        sid = self._quic.get_next_available_stream_id()
        r = self.reqs[sid] = {"headers": [], "body": b"", "done": self._loop.create_future()}
        hdrs = [(b":method", method), (b":scheme", b"https"), (b":authority", authority), (b":path", path)]
        self.h3.send_headers(sid, hdrs + ([(b"content-length", b"%d" % len(body))] if body else []), end_stream=not body)
        if body: self.h3.send_data(sid, body, end_stream=True)
        self.transmit(); return await asyncio.wait_for(r["done"], 15)

async def main(a):
    host, port = a.target.rsplit(":", 1); host = host.strip("[]")
    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=a.sni or host)
    if a.ca: cfg.load_verify_locations(a.ca)
    else: cfg.verify_mode = ssl.CERT_NONE
    async with connect(host, int(port), configuration=cfg, create_protocol=H3) as c:
        for m, body in ((b"GET", b""), (b"POST", a.data.encode())):
            r = await c.request(m, (a.authority or f"{a.sni or host}:{port}").encode(), a.path.encode(), body)
            print(m.decode(), dict(r["headers"]).get(b":status", b"?").decode())
            for k, v in r["headers"]: print(f"  {k.decode()}: {v.decode()}")
            print("  body:", r["body"][:2000])

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("target", help="HOST:PORT of the HTTP/3 server (UDP); [v6]:PORT for IPv6")
    p.add_argument("--ca", help="CA file (PEM) to verify the server with; default: no verification")
    p.add_argument("--sni", help="TLS server name (default: HOST)"); p.add_argument("--authority", help=":authority (default: SNI:PORT)")
    p.add_argument("--path", default="/"); p.add_argument("--data", default="hello from h3_check", help="POST body")
    try: asyncio.run(main(p.parse_args()))
    except Exception as e: sys.exit(f"FAILED: {type(e).__name__}: {e}")
