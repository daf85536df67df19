//! Shared test support: simulated replicas, edges started in-process on
//! loopback (port 0), and small HTTP clients (HTTP/1.1, h2c, TLS with ALPN).

#![allow(dead_code)]

pub mod browser;
pub mod nats;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use stoke_router::edge::Edge;
use stoke_router::sim::{Replica, ReplicaOptions};
use tokio::net::TcpStream;

/// Log to the test output when `RUST_LOG` is set.
pub fn logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// A simulated replica on a free loopback port.
pub async fn replica(name: &str) -> Replica {
    replica_with(name, |_| {}).await
}

/// A simulated replica with options changed by `f`.
pub async fn replica_with(name: &str, f: impl FnOnce(&mut ReplicaOptions)) -> Replica {
    let mut opts = ReplicaOptions { name: name.to_owned(), ..ReplicaOptions::default() };
    f(&mut opts);
    Replica::start(opts).await.expect("replica starts")
}

/// A config file in its own temporary directory (kept alive with the value).
pub struct ConfigFile {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl ConfigFile {
    pub fn new(text: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("stoke.toml");
        std::fs::write(&path, text).expect("write config");
        ConfigFile { dir, path }
    }

    /// Write a file beside the config (certificates).
    pub fn write(&self, name: &str, contents: &[u8]) {
        std::fs::write(self.dir.path().join(name), contents).expect("write file");
    }

    pub fn rewrite(&self, text: &str) {
        std::fs::write(&self.path, text).expect("rewrite config");
    }
}

/// Start an edge at `location` for the config `text`.
pub async fn edge(text: &str, location: &str) -> (Edge, ConfigFile) {
    let file = ConfigFile::new(text);
    let edge = edge_from(&file, location).await;
    (edge, file)
}

/// Start an edge from a config file already written (reloadable).
pub async fn edge_from(file: &ConfigFile, location: &str) -> Edge {
    let source = stoke_router::reload::ConfigSource { path: file.path.clone(), location: Some(location.to_owned()) };
    Edge::start_from(source).await.unwrap_or_else(|e| panic!("edge does not start: {e}"))
}

/// Locations used by the tests: Frankfurt, Paris, Singapore, Sydney.
pub const LOCATIONS: &str = r#"
[[location]]
id = "fra"
lat = 50.11
lon = 8.68

[[location]]
id = "par"
lat = 48.86
lon = 2.35

[[location]]
id = "sin"
lat = 1.35
lon = 103.82

[[location]]
id = "syd"
lat = -33.87
lon = 151.21
"#;

/// The ten locations of `config/examples/network.toml`, named, from
/// Frankfurt to Sydney.
pub const TEN_LOCATIONS: &str = r#"
[[location]]
id = "fra"
name = "Frankfurt"
lat = 50.11
lon = 8.68

[[location]]
id = "par"
name = "Paris"
lat = 48.86
lon = 2.35

[[location]]
id = "lon"
name = "London"
lat = 51.51
lon = -0.13

[[location]]
id = "iad"
name = "Washington DC"
lat = 38.91
lon = -77.04

[[location]]
id = "nyc"
name = "New York"
lat = 40.71
lon = -74.01

[[location]]
id = "sfo"
name = "San Francisco"
lat = 37.77
lon = -122.42

[[location]]
id = "gru"
name = "São Paulo"
lat = -23.55
lon = -46.63

[[location]]
id = "sin"
name = "Singapore"
lat = 1.35
lon = 103.82

[[location]]
id = "nrt"
name = "Tokyo"
lat = 35.68
lon = 139.69

[[location]]
id = "syd"
name = "Sydney"
lat = -33.87
lon = 151.21
"#;

/// Their ids, in that order; every one runs an edge.
pub const TEN_EDGES: [&str; 10] = ["fra", "par", "lon", "iad", "nyc", "sfo", "gru", "sin", "nrt", "syd"];

/// `[edge]` with a plain listener on a free port and debug headers. Every
/// replica is on loopback, so the tests rank pools by the locations'
/// distance (`measure_rtt = false`), except where they measure RTTs.
pub const EDGE: &str = r#"
[edge]
http = "127.0.0.1:0"
admin = "127.0.0.1:0"
debug_headers = true
threads = 2
drain_timeout = "5s"
measure_rtt = false
"#;

/// A `[[pool]]` block with fast health probes.
pub fn pool(id: &str, location: &str, serves: &[&str], replicas: &[SocketAddr], extra: &str) -> String {
    pool_probed(id, location, serves, replicas, FAST_PROBES, extra)
}

/// Probes every 100 ms: tests see readiness change at once.
pub const FAST_PROBES: &str = "health = { path = \"/health\", interval = \"100ms\", timeout = \"100ms\" }";
/// Probes once a minute: only passive marks (failed connections) can take
/// a replica out within a test.
pub const SLOW_PROBES: &str = "health = { path = \"/health\", interval = \"60s\", timeout = \"500ms\" }";

/// A `[[pool]]` table like [`pool`], with its `health` line given.
pub fn pool_probed(
    id: &str,
    location: &str,
    serves: &[&str],
    replicas: &[SocketAddr],
    health: &str,
    extra: &str,
) -> String {
    let serves = serves.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ");
    let replicas = replicas.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ");
    format!(
        "\n[[pool]]\nid = \"{id}\"\nlocation = \"{location}\"\nserves = [{serves}]\nreplicas = [{replicas}]\n{health}\n{extra}\n"
    )
}

/// The route that takes the service from the body's `model` under `/v1/`.
pub const BODY_ROUTE: &str = "\n[[route]]\npath_prefix = \"/v1/\"\nservice_from = \"body:model\"\n";

/// A response, body read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A request to send.
pub struct Req {
    pub method: Method,
    pub path: String,
    pub host: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Req {
    pub fn get(path: &str) -> Self {
        Req {
            method: Method::GET,
            path: path.to_owned(),
            host: "localhost".into(),
            headers: vec![],
            body: Bytes::new(),
        }
    }

    pub fn post(path: &str, body: impl Into<Bytes>) -> Self {
        Req {
            method: Method::POST,
            path: path.to_owned(),
            host: "localhost".into(),
            headers: vec![],
            body: body.into(),
        }
    }

    /// A chat completion for `model`.
    pub fn chat(model: &str) -> Self {
        Self::post("/v1/chat/completions", chat_body(model, false, 4))
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn host(mut self, host: &str) -> Self {
        self.host = host.to_owned();
        self
    }

    fn build(&self) -> Request<Full<Bytes>> {
        let mut b = Request::builder().method(self.method.clone()).uri(&self.path).header("host", &self.host);
        for (k, v) in &self.headers {
            b = b.header(k, v);
        }
        b.body(Full::new(self.body.clone())).expect("request")
    }

    pub fn build_h2(&self, scheme: &str) -> Request<Full<Bytes>> {
        let uri = format!("{scheme}://{}{}", self.host, self.path);
        let mut b = Request::builder().method(self.method.clone()).uri(uri);
        for (k, v) in &self.headers {
            b = b.header(k, v);
        }
        b.body(Full::new(self.body.clone())).expect("request")
    }
}

/// A chat completion request body.
pub fn chat_body(model: &str, stream: bool, max_tokens: u32) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": max_tokens,
        "stream": stream,
    })
    .to_string()
}

/// Send over a fresh HTTP/1.1 connection and read the whole answer.
pub async fn send(addr: SocketAddr, req: Req) -> Resp {
    let resp = open(addr, &req).await;
    collect(resp).await
}

/// Send over a fresh HTTP/1.1 connection; the body is left to read.
pub async fn open(addr: SocketAddr, req: &Req) -> http::Response<Incoming> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    sender.send_request(req.build()).await.expect("response head")
}

/// Read a response whole.
pub async fn collect(resp: http::Response<Incoming>) -> Resp {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Resp { status: parts.status, headers: parts.headers, body }
}

/// A fresh h2c (prior knowledge) connection to `addr`: its sender, and
/// its connection's task, which ends when the connection closes.
pub async fn h2c_connect(
    addr: SocketAddr,
) -> (hyper::client::conn::http2::SendRequest<Full<Bytes>>, tokio::task::JoinHandle<hyper::Result<()>>) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.expect("h2 handshake");
    (sender, tokio::spawn(conn))
}

/// Send over a fresh h2c (prior knowledge) connection.
pub async fn send_h2c(addr: SocketAddr, req: Req) -> Resp {
    let (mut sender, _conn) = h2c_connect(addr).await;
    let resp = sender.send_request(req.build_h2("http")).await.expect("response head");
    collect(resp).await
}

/// A self-signed certificate for `names`: (cert PEM, key PEM, cert DER).
pub fn certificate(names: &[&str]) -> (String, String, rustls::pki_types::CertificateDer<'static>) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).expect("rcgen");
    let der = ck.cert.der().clone();
    (ck.cert.pem(), ck.signing_key.serialize_pem(), der)
}

/// What a TLS handshake negotiated, and the answer to one request.
pub struct TlsResp {
    pub alpn: Option<Vec<u8>>,
    pub peer_cert: Option<rustls::pki_types::CertificateDer<'static>>,
    pub resp: Resp,
}

/// A TLS client trusting `roots` and offering `alpn`.
pub fn tls_client_config(
    roots: &[rustls::pki_types::CertificateDer<'static>],
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Send one request over TLS, trusting `roots`, with SNI `sni` and ALPN `alpn`.
pub async fn send_tls(
    addr: SocketAddr,
    roots: &[rustls::pki_types::CertificateDer<'static>],
    sni: &str,
    alpn: &[&[u8]],
    req: Req,
) -> TlsResp {
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(roots, alpn));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).expect("server name");
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let (_, conn) = tls.get_ref();
    let alpn = conn.alpn_protocol().map(|p| p.to_vec());
    let peer_cert = conn.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned());
    let resp = if alpn.as_deref() == Some(b"h2") {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.expect("h2");
        tokio::spawn(conn);
        collect(sender.send_request(req.build_h2("https")).await.expect("response")).await
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.expect("h1");
        tokio::spawn(conn);
        collect(sender.send_request(req.build()).await.expect("response")).await
    };
    TlsResp { alpn, peer_cert, resp }
}

/// Poll `check` until it returns `Some`, failing after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// In-flight counts of every replica of every pool, and of the pools.
pub fn in_flight(edge: &Edge) -> Vec<(String, u32, Vec<u32>)> {
    let live = edge.router.live();
    live.pools
        .iter()
        .map(|p| (p.state.id.to_string(), p.state.in_flight(), p.replicas.iter().map(|r| r.in_flight()).collect()))
        .collect()
}

/// Wait until nothing is in flight anywhere on the edge.
pub async fn assert_drained(edge: &Edge) {
    eventually(Duration::from_secs(5), "in-flight counts back to zero", || {
        let counts = in_flight(edge);
        async move { counts.iter().all(|(_, p, r)| *p == 0 && r.iter().all(|n| *n == 0)).then_some(()) }
    })
    .await;
}

/// An upstream that answers `/health` with 200 and every other request with
/// a JSON echo of what it received: method, path, headers and body length.
/// With `hang = true` it never answers anything but `/health`.
pub async fn echo_upstream(hang: bool) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use stoke_router::net::server::{serve_http, HttpBody};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let _keep = tx;
        serve_http(listener, rx, move |req: Request<Incoming>| async move {
            if req.uri().path() == "/health" {
                return Ok(http::Response::new(HttpBody::Left(Full::new(Bytes::from_static(b"ok")))));
            }
            if hang {
                std::future::pending::<()>().await;
            }
            let method = req.method().to_string();
            let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
            let headers: serde_json::Map<String, serde_json::Value> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::from(v.to_str().unwrap_or("<binary>"))))
                .collect();
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let out = serde_json::json!({"method": method, "path": path, "headers": headers, "body_len": body.len()});
            Ok(http::Response::new(HttpBody::Left(Full::new(Bytes::from(out.to_string())))))
        })
        .await
    });
    (addr, task)
}

/// Send a body in `chunks` with `Transfer-Encoding: chunked`.
pub async fn send_chunked(addr: SocketAddr, path: &str, chunks: Vec<Bytes>) -> Resp {
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(4);
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let req = Request::builder().method(Method::POST).uri(path).header("host", "localhost").body(body).expect("req");
    tokio::spawn(async move {
        for c in chunks {
            if tx.send_data(c).await.is_err() {
                return;
            }
        }
    });
    collect(sender.send_request(req).await.expect("response")).await
}

/// A loopback address with a port that was free a moment ago (for replicas
/// that an orchestrator starts later, whose addresses the config must name).
pub fn free_addr() -> SocketAddr {
    // Outside the ephemeral range: the replica binds it only when woken,
    // and an outgoing connection must not take it first.
    stoke_router::sim::ports::replica_addr().expect("a free port outside the ephemeral range")
}

/// A `[[pool]]` that scales to zero through the orchestrator at `orch`.
pub fn scaled_pool(
    id: &str,
    location: &str,
    serves: &[&str],
    replicas: &[SocketAddr],
    orch: SocketAddr,
    scale: &str,
) -> String {
    let mut p = pool(id, location, serves, replicas, "");
    p.push_str(&format!(
        "[pool.scale]\nwake = {{ url = \"http://{orch}/pools/{id}/wake\", token_env = \"STOKE_TEST_ORCH_TOKEN\" }}\n\
         sleep = {{ url = \"http://{orch}/pools/{id}/sleep\" }}\n{scale}\n"
    ));
    p
}

/// An orchestrator listener bound now, so that its address can go in a config.
pub async fn orchestrator_listener() -> (tokio::net::TcpListener, SocketAddr) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    (l, a)
}

/// Start the orchestrator for the network in `file`.
pub async fn start_orchestrator(
    listener: tokio::net::TcpListener,
    file: &ConfigFile,
    opts: stoke_router::sim::OrchestratorOptions,
) -> stoke_router::sim::Orchestrator {
    let network = stoke_config::load(&file.path).expect("config");
    stoke_router::sim::Orchestrator::start_on(listener, network, opts).await.expect("orchestrator")
}

/// `GET` a path on the admin listener, as JSON.
pub async fn admin_json(edge: &Edge, path: &str) -> serde_json::Value {
    send(edge.bound.admin, Req::get(path)).await.json()
}

/// The `/state` entry of a pool.
pub async fn pool_state(edge: &Edge, pool: &str) -> serde_json::Value {
    let state = admin_json(edge, "/state").await;
    state["pools"].as_array().and_then(|p| p.iter().find(|p| p["id"] == pool).cloned()).expect("pool in /state")
}

/// The idle kept-alive connections from `edge` to `pool`'s replicas, as
/// `/state` counts them.
pub async fn idle_connections(edge: &Edge, pool: &str) -> u64 {
    let p = pool_state(edge, pool).await;
    let replicas = p["replicas"].as_array().cloned().unwrap_or_default();
    replicas.iter().map(|r| r["idle_connections"].as_u64().expect("idle_connections in /state")).sum()
}

/// Bring `pool` up and check that none of the requests whose clients left
/// while held reached its replicas.
pub async fn assert_nothing_reached(edge: &Edge, orch: &stoke_router::sim::Orchestrator, pool: &str) {
    orch.start_pool(pool).await.expect("start");
    eventually(Duration::from_secs(5), "pool warm", || async {
        (pool_state(edge, pool).await["state"] == "warm").then_some(())
    })
    .await;
    // Anything still in the edge's hands would go out now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(orch.requests_received(pool).await, 0, "a request whose client left reached the replica");
}

/// A TCP proxy to `upstream` on a free loopback port that holds every
/// chunk `one_way` before passing it on, in both directions: a round trip
/// through it takes twice that longer (this kernel has no netem).
pub async fn delay_proxy(upstream: SocketAddr, one_way: Duration) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn pipe(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, delay: Duration) {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return;
                }
                Ok(n) => {
                    tokio::time::sleep(delay).await;
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((down, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(up) = TcpStream::connect(upstream).await else { return };
                let _ = (down.set_nodelay(true), up.set_nodelay(true));
                let ((dr, dw), (ur, uw)) = (down.into_split(), up.into_split());
                tokio::join!(pipe(dr, uw, one_way), pipe(ur, dw, one_way));
            });
        }
    });
    addr
}

pub type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// An HTTP/3 client connection (quinn + h3).
pub struct H3Client {
    pub _endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub send: SendRequest,
    pub base: String,
}

/// Connect to the HTTP/3 endpoint at `addr`, trusting `root`.
pub async fn h3_client(addr: SocketAddr, root: rustls::pki_types::CertificateDer<'static>) -> H3Client {
    try_h3_client(addr, root).await.unwrap_or_else(|e| panic!("{e}"))
}

/// [`h3_client`], failing with what went wrong.
pub async fn try_h3_client(
    addr: SocketAddr,
    root: rustls::pki_types::CertificateDer<'static>,
) -> Result<H3Client, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root).expect("root");
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic client config");
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint
        .connect(addr, "localhost")
        .map_err(|e| format!("connect: {e}"))?
        .await
        .map_err(|e| format!("QUIC handshake: {e}"))?;
    let (mut driver, send) =
        h3::client::new(h3_quinn::Connection::new(conn.clone())).await.map_err(|e| format!("h3 client: {e}"))?;
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    Ok(H3Client { _endpoint: endpoint, conn, send, base: format!("https://localhost:{}", addr.port()) })
}

/// An HTTP/3 answer, read whole.
pub struct H3Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Vec<u8>,
}

impl H3Client {
    /// Send a request and read its answer whole (panics on errors).
    pub async fn request(&mut self, method: &str, path: &str, body: Option<&[u8]>, headers: &[(&str, &str)]) -> H3Resp {
        let mut req = http::Request::builder().method(method).uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.header("content-length", b.len());
        }
        let mut s = self.send.send_request(req.body(()).expect("request")).await.expect("send request");
        if let Some(b) = body {
            for chunk in b.chunks(16 * 1024) {
                s.send_data(Bytes::copy_from_slice(chunk)).await.expect("send body");
            }
        }
        s.finish().await.expect("finish");
        let resp = s.recv_response().await.expect("response");
        let mut out = Vec::new();
        while let Some(mut c) = s.recv_data().await.expect("body") {
            out.extend_from_slice(&c.copy_to_bytes(c.remaining()));
        }
        H3Resp { status: resp.status().as_u16(), headers: resp.headers().clone(), body: out }
    }
}

// `stoke serve` and `stoke upgrade` as processes.

/// Where the first process listens.
pub struct Listeners {
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub https: Option<SocketAddr>,
    pub h3: Option<SocketAddr>,
}

/// Read the JSON log lines of the first process until it serves, noting
/// its listeners; then keep draining them into `log`.
pub fn listening(stderr: std::process::ChildStderr, log: Arc<parking_lot::Mutex<Vec<String>>>) -> Listeners {
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let (mut http, mut admin, mut https, mut h3) = (None, None, None, None);
    while let Some(Ok(line)) = lines.next() {
        log.lock().push(line.clone());
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            let addr = || v["addr"].as_str().and_then(|a| a.parse().ok());
            match v["listener"].as_str() {
                Some("http") => http = addr(),
                Some("admin") => admin = addr(),
                Some("h3") => h3 = addr(),
                Some("https") => https = addr(),
                _ => {}
            }
            let message = v["message"].as_str().or(v["fields"]["message"].as_str()).unwrap_or_default();
            let serving = message.starts_with("edge serving");
            if let (Some(http), Some(admin), true) = (http, admin, serving) {
                std::thread::spawn(move || {
                    for line in lines.map_while(Result::ok) {
                        log.lock().push(line);
                    }
                });
                return Listeners { http, admin, https, h3 };
            }
        }
    }
    panic!("the edge never reported its listeners:\n{}", log.lock().join("\n"));
}

/// What `stoke upgrade` came to: its exit, what it printed, and the log of
/// the process it started (in `upgrades.log` beside the config).
pub struct Upgrade {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Upgrade {
    /// The new process's id, from `stoke upgrade`'s report.
    pub fn pid(&self) -> u32 {
        let at = self.stdout.find("(pid ").unwrap_or_else(|| panic!("no pid in {:?}", self.stdout)) + 5;
        self.stdout[at..].split(')').next().and_then(|p| p.parse().ok()).expect("a pid")
    }
}

/// Run `stoke upgrade` for `file` and wait for it.
pub async fn upgrade(file: &ConfigFile) -> Upgrade {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file.dir.path().join("upgrades.log"))
        .expect("log file");
    let path = file.path.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_stoke"))
            .args(["--log-format", "json", "upgrade", "--config"])
            .arg(path)
            .env("STOKE_TEST_ORCH_TOKEN", "orch-secret")
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .output()
            .expect("run stoke upgrade")
    })
    .await
    .expect("join");
    let log = std::fs::read_to_string(file.dir.path().join("upgrades.log")).unwrap_or_default();
    Upgrade { ok: out.status.success(), stdout: String::from_utf8_lossy(&out.stdout).into_owned(), stderr: log }
}

/// Whether process `pid` is still running (not yet reaped counts as
/// gone: its `/proc` state is Z).
pub fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// SIGTERM to `pid`.
pub fn terminate(pid: u32) {
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
}
