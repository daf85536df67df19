//! A minimal forwarder on pingora-proxy's `ProxyHttp` (see `stoke_benches::engine`).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use async_trait::async_trait;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::upstreams::peer::HttpPeer;
use stoke_benches::engine;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Names the one upstream; every other phase is pingora-proxy's default.
struct Fixed {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Fixed {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(engine::peer(self.upstream)))
    }
}

fn main() -> ExitCode {
    engine::main("engine-proxy", |args| {
        let conf =
            ServerConf { threads: 1, upstream_keepalive_pool_size: engine::UPSTREAM_POOL, ..ServerConf::default() };
        let mut proxy = pingora::proxy::http_proxy(&Arc::new(conf), Fixed { upstream: args.upstream });
        proxy.server_options = Some(engine::server_options());
        proxy
    })
}
