//! Zero-downtime upgrades, with real processes: `stoke upgrade` starts a new
//! `stoke serve` that takes the running one's listening sockets over the
//! upgrade socket, serves on them, and only then lets the old one stop
//! accepting and drain. Nothing is refused, reset or cut: not the load on
//! HTTP/1.1 keep-alive and h2c, not the open token streams, not the
//! requests held for a waking pool; and an upgrade that fails leaves the
//! running process serving.

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use support::*;
use tokio::net::TcpStream;

const STOKE: &str = env!("CARGO_BIN_EXE_stoke");

/// The model of the load's requests: whole answers at once.
const FAST: &str = "f";

/// `[edge]` for the upgrade tests: port 0 everywhere (an upgraded process
/// inherits the ports the first one got), the upgrade socket beside the
/// config file.
const UPGRADE_EDGE: &str = r#"
[edge]
location = "fra"
http = "127.0.0.1:0"
admin = "127.0.0.1:0"
upgrade_socket = "upgrade.sock"
threads = 2
drain_timeout = "30s"
keepalive_timeout = "30s"
measure_rtt = false
"#;

/// `stoke serve` over `file`, logging JSON to a pipe.
fn serve(file: &ConfigFile) -> Child {
    Command::new(STOKE)
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&file.path)
        .env("STOKE_TEST_ORCH_TOKEN", "orch-secret")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn stoke serve")
}

/// What the load saw.
#[derive(Default)]
struct Seen {
    ok: AtomicU64,
    /// Requests whose connection had been told to close (GOAWAY) before
    /// they were sent, sent again on a new connection, as any client does.
    resent: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Seen {
    fn fail(&self, what: String) {
        self.failures.lock().push(what);
    }
}

/// HTTP/1.1 keep-alive: one request after another on one connection, a new
/// connection when an answer says `Connection: close`. Every failure
/// (refused, reset, not 200) is recorded.
async fn h1_load(addr: SocketAddr, stop: Arc<AtomicBool>, seen: Arc<Seen>) {
    let body = Bytes::from(chat_body(FAST, false, 2));
    'connection: while !stop.load(Ordering::Relaxed) {
        let stream = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                seen.fail(format!("h1 connect: {e}"));
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await else {
            seen.fail("h1 handshake".into());
            continue;
        };
        tokio::spawn(conn);
        while !stop.load(Ordering::Relaxed) {
            let req = http::Request::post("/v1/chat/completions")
                .header("host", "localhost")
                .header("content-type", "application/json")
                .body(Full::new(body.clone()))
                .expect("request");
            let resp = match sender.send_request(req).await {
                Ok(r) => r,
                Err(e) => {
                    seen.fail(format!("h1 request: {e}"));
                    continue 'connection;
                }
            };
            let status = resp.status();
            let closes = resp.headers().get("connection").is_some_and(|v| v == "close");
            match resp.into_body().collect().await {
                Ok(_) if status == 200 => {
                    seen.ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => seen.fail(format!("h1 answered {status}")),
                Err(e) => seen.fail(format!("h1 body: {e}")),
            }
            if closes {
                continue 'connection;
            }
        }
    }
}

/// h2c: requests one after another on one connection. After GOAWAY the
/// connection refuses new requests before sending them (`is_canceled`),
/// and a request sent on a stream above the GOAWAY's last stream id was not
/// processed (RFC 9113 §6.8, the h2 error `GoAway(.., NO_ERROR, Remote)`):
/// both go on a new connection, as a client does.
async fn h2_load(addr: SocketAddr, stop: Arc<AtomicBool>, seen: Arc<Seen>) {
    let body = Bytes::from(chat_body(FAST, false, 2));
    'connection: while !stop.load(Ordering::Relaxed) {
        let stream = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                seen.fail(format!("h2 connect: {e}"));
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok((mut sender, conn)) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await
        else {
            seen.fail("h2 handshake".into());
            continue;
        };
        tokio::spawn(conn);
        while !stop.load(Ordering::Relaxed) {
            if sender.ready().await.is_err() {
                // Closed by GOAWAY with nothing in flight.
                continue 'connection;
            }
            let req = http::Request::post("http://localhost/v1/chat/completions")
                .header("content-type", "application/json")
                .body(Full::new(body.clone()))
                .expect("request");
            let resp = match sender.send_request(req).await {
                Ok(r) => r,
                Err(e) if e.is_canceled() || format!("{e:?}").contains("GoAway(b\"\", NO_ERROR, Remote)") => {
                    seen.resent.fetch_add(1, Ordering::Relaxed);
                    continue 'connection;
                }
                Err(e) => {
                    seen.fail(format!("h2 request: {e:?}"));
                    continue 'connection;
                }
            };
            let status = resp.status();
            match resp.into_body().collect().await {
                Ok(_) if status == 200 => {
                    seen.ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => seen.fail(format!("h2 answered {status}")),
                Err(e) => seen.fail(format!("h2 body: {e}")),
            }
        }
    }
}

/// One POST over HTTP/3 on `send`, read to its end: a stream must end
/// with `[DONE]`. `Err(None)`: refused before it was served (GOAWAY, or
/// H3_REQUEST_REJECTED), which a client sends again on a new connection.
async fn h3_post(send: &mut SendRequest, base: &str, body: String, stream: bool) -> Result<(), Option<String>> {
    let req = http::Request::post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(())
        .expect("request");
    let mut s = send.send_request(req).await.map_err(|_| None)?;
    let rejected = |e: &dyn std::fmt::Display| {
        let text = e.to_string();
        if text.contains("H3_REQUEST_REJECTED") {
            None
        } else {
            Some(text)
        }
    };
    s.send_data(Bytes::from(body)).await.map_err(|e| rejected(&e))?;
    s.finish().await.map_err(|e| rejected(&e))?;
    let resp = s.recv_response().await.map_err(|e| rejected(&e))?;
    let mut out = Vec::new();
    while let Some(mut c) = s.recv_data().await.map_err(|e| Some(format!("body: {e}")))? {
        use bytes::Buf;
        out.extend_from_slice(&c.copy_to_bytes(c.remaining()));
    }
    let text = String::from_utf8_lossy(&out);
    if resp.status() != 200 {
        return Err(Some(format!("answered {}: {text}", resp.status())));
    }
    if stream && !text.ends_with("data: [DONE]\n\n") {
        return Err(Some(format!("a stream cut short: ...{}", &text[text.len().saturating_sub(80)..])));
    }
    Ok(())
}

/// A token stream over HTTP/3 on an open connection.
async fn h3_one(mut send: SendRequest, base: String, body: String) -> Result<(), String> {
    h3_post(&mut send, &base, body, true).await.map_err(|e| e.unwrap_or_else(|| "refused".into()))
}

/// HTTP/3: requests one after another on one connection, a new connection
/// once it is told to go away.
async fn h3_load(
    addr: SocketAddr,
    root: rustls::pki_types::CertificateDer<'static>,
    stop: Arc<AtomicBool>,
    seen: Arc<Seen>,
) {
    while !stop.load(Ordering::Relaxed) {
        let mut c = match try_h3_client(addr, root.clone()).await {
            Ok(c) => c,
            Err(e) => {
                seen.fail(format!("h3 connect: {e}"));
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        while !stop.load(Ordering::Relaxed) {
            match h3_post(&mut c.send, &c.base, chat_body(FAST, false, 2), false).await {
                Ok(()) => {
                    seen.ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(None) => {
                    seen.resent.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(Some(e)) => {
                    seen.fail(format!("h3: {e}"));
                    break;
                }
            }
        }
    }
}

/// One request on a fresh HTTP/1.1 connection, read to its end: a token
/// stream must end with `[DONE]`, any other answer must be 200.
async fn one(addr: SocketAddr, body: String, stream: bool) -> Result<(), String> {
    let conn = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(conn)).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let req = http::Request::post("/v1/chat/completions")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let resp = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| format!("body after {status}: {e}"))?.to_bytes();
    let text = String::from_utf8_lossy(&body);
    if status != 200 {
        return Err(format!("answered {status}: {text}"));
    }
    if stream && !text.ends_with("data: [DONE]\n\n") {
        return Err(format!("a stream cut short: ...{}", &text[text.len().saturating_sub(80)..]));
    }
    Ok(())
}

/// The process serving `admin` now: its generation and pid.
async fn serving(admin: SocketAddr) -> (u64, u32) {
    let state = send(admin, Req::get("/state")).await.json();
    let p = &state["process"];
    (p["generation"].as_u64().expect("generation"), p["pid"].as_u64().expect("pid") as u32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_upgrades_under_load_drop_nothing() {
    std::env::set_var("STOKE_TEST_ORCH_TOKEN", "orch-secret");
    // Whole answers at once, token streams of about 6 s.
    let warm = replica_with("fra-1", |o| {
        o.tokens_per_sec = 25.0;
        o.max_concurrency = 512;
    })
    .await;
    let fast = replica_with("fra-fast", |o| {
        o.tokens_per_sec = 5000.0;
        o.max_concurrency = 512;
    })
    .await;
    let (orch_listener, orch) = orchestrator_listener().await;
    let cold = free_addr();
    let (pem, key, root) = certificate(&["localhost"]);
    let file = ConfigFile::new(&format!(
        "{}h3 = \"127.0.0.1:0\"\n[[tls]]\nhosts = [\"localhost\"]\ncert = \"c.crt\"\nkey = \"c.key\"\n\
         {LOCATIONS}{}{}{}\n[[route]]\npath_prefix = \"/v1/\"\nservice_from = \"body:model\"\nmax_wait = \"30s\"\n",
        UPGRADE_EDGE,
        pool("fra-warm", "fra", &["m"], &[warm.addr], "max_concurrency = 512"),
        pool("fra-fast", "fra", &[FAST], &[fast.addr], "max_concurrency = 512"),
        scaled_pool("fra-cold", "fra", &["cold"], &[cold], orch, "idle_timeout = \"5m\"\nwake_time = \"3s\""),
    ));
    file.write("c.crt", pem.as_bytes());
    file.write("c.key", key.as_bytes());
    let orchestrator = start_orchestrator(
        orch_listener,
        &file,
        stoke_router::sim::OrchestratorOptions {
            boot_time: Some(Duration::from_secs(3)),
            start_always_on: false,
            ..Default::default()
        },
    )
    .await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut first = serve(&file);
    let Listeners { http, admin, h3, .. } = listening(first.stderr.take().expect("stderr"), log.clone());
    let h3 = h3.expect("an HTTP/3 listener");
    assert_eq!(serving(admin).await, (1, first.id()));

    let (stop, seen) = (Arc::new(AtomicBool::new(false)), Arc::new(Seen::default()));
    let mut load = Vec::new();
    for _ in 0..4 {
        load.push(tokio::spawn(h1_load(http, stop.clone(), seen.clone())));
    }
    for _ in 0..2 {
        load.push(tokio::spawn(h2_load(http, stop.clone(), seen.clone())));
    }
    let seen_h3 = Arc::new(Seen::default());
    for _ in 0..2 {
        load.push(tokio::spawn(h3_load(h3, root.clone(), stop.clone(), seen_h3.clone())));
    }
    // Token streams over HTTP/3, on QUIC connections of the first process
    // that outlive many upgrades.
    let mut h3_streams = Vec::new();
    let mut h3_conns = Vec::new();
    for _ in 0..4 {
        let c = try_h3_client(h3, root.clone()).await.expect("h3 connection");
        for _ in 0..5 {
            h3_streams.push(tokio::spawn(h3_one(c.send.clone(), c.base.clone(), chat_body("m", true, 150))));
        }
        h3_conns.push(c);
    }
    // 200 token streams and 50 requests held for the cold pool, all on the
    // first process when the upgrades begin.
    let streams: Vec<_> = (0..200).map(|_| tokio::spawn(one(http, chat_body("m", true, 150), true))).collect();
    let held: Vec<_> = (0..50).map(|_| tokio::spawn(one(http, chat_body("cold", false, 2), false))).collect();
    eventually(Duration::from_secs(10), "the streams and holds have reached the first process", || async {
        let state = send(admin, Req::get("/state")).await.json();
        let pools = state["pools"].as_array().cloned().unwrap_or_default();
        let field =
            |id: &str, key: &str| pools.iter().find(|p| p["id"] == id).and_then(|p| p[key].as_u64()).unwrap_or(0);
        (field("fra-warm", "in_flight") >= 200 && field("fra-cold", "queue") >= 50).then_some(())
    })
    .await;

    let mut pids = vec![first.id()];
    for n in 2..=21u64 {
        let up = upgrade(&file).await;
        assert!(up.ok, "upgrade to generation {n} failed: {}\n{}", up.stdout, up.stderr);
        let pid = up.pid();
        assert_eq!(serving(admin).await, (n, pid), "the new process answers on the admin socket");
        pids.push(pid);
    }
    // The load runs on the last process a moment, then stops.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.expect("load task");
    }
    let mut cut = Vec::new();
    for s in streams {
        if let Err(e) = s.await.expect("stream task") {
            cut.push(e);
        }
    }
    let mut unanswered = Vec::new();
    for h in held {
        if let Err(e) = h.await.expect("held task") {
            unanswered.push(e);
        }
    }
    for s in h3_streams {
        if let Err(e) = s.await.expect("h3 stream task") {
            cut.push(format!("h3: {e}"));
        }
    }
    drop(h3_conns);
    let failures = seen.failures.lock().clone();
    assert!(
        failures.is_empty() && cut.is_empty() && unanswered.is_empty(),
        "failures: {failures:?}\nstreams cut: {cut:?}\nheld unanswered: {unanswered:?}"
    );
    assert!(seen.ok.load(Ordering::Relaxed) > 100, "the load ran: {} answers", seen.ok.load(Ordering::Relaxed));
    // HTTP/3: at least 99.9 % of requests complete (a handshake under way
    // at the moment of a handover may be lost, and is not resent).
    let (h3_ok, h3_failed) = (seen_h3.ok.load(Ordering::Relaxed), seen_h3.failures.lock().clone());
    assert!(h3_ok > 50, "the HTTP/3 load ran: {h3_ok} answers");
    assert!(
        h3_failed.len() as f64 <= 0.001 * (h3_ok + h3_failed.len() as u64) as f64,
        "{h3_ok} HTTP/3 answers, {} failed: {h3_failed:?}",
        h3_failed.len()
    );

    // Every process but the last drains and exits on its own.
    let last = *pids.last().expect("pids");
    eventually(Duration::from_secs(30), "every previous process has exited", || async {
        pids[..pids.len() - 1].iter().all(|p| !running(*p)).then_some(())
    })
    .await;
    let state = send(admin, Req::get("/state")).await.json();
    assert_eq!(state["process"]["previous"]["generation"], 20);
    assert_eq!(state["process"]["previous"]["state"], "exited", "{}", state["process"]);
    let metrics = send(admin, Req::get("/metrics")).await.text();
    assert!(metrics.contains("stoke_process_generation 21"), "{metrics}");
    terminate(last);
    eventually(Duration::from_secs(10), "the last process stops on SIGTERM", || async {
        (!running(last)).then_some(())
    })
    .await;
    let _ = first.wait();
    assert!(tokio::net::TcpStream::connect(http).await.is_err(), "nothing listens after the last process stopped");
    orchestrator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upgrade_leaves_the_running_process_serving() {
    let rep = replica_with("fra-1", |o| o.tokens_per_sec = 20.0).await;
    let text = format!("{UPGRADE_EDGE}{LOCATIONS}{}{BODY_ROUTE}", pool("fra-a", "fra", &["m", FAST], &[rep.addr], ""));
    let file = ConfigFile::new(&text);
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut child = serve(&file);
    let Listeners { http, admin, .. } = listening(child.stderr.take().expect("stderr"), log.clone());
    let (stop, seen) = (Arc::new(AtomicBool::new(false)), Arc::new(Seen::default()));
    let load = tokio::spawn(h1_load(http, stop.clone(), seen.clone()));
    let stream = tokio::spawn(one(http, chat_body("m", true, 40), true));

    // A config that does not parse: the new process never takes the sockets.
    file.rewrite(&text.replace("[[route]]", "[[route]\n"));
    let up = upgrade(&file).await;
    assert!(!up.ok, "a broken config is refused: {}", up.stdout);
    let config = file.path.display().to_string();
    assert!(
        up.stderr.lines().any(|l| l.starts_with(&format!("{config}:"))),
        "the problem with its place: {}",
        up.stderr
    );

    // A config whose new listener cannot be bound: the new process takes
    // the sockets, fails to start, and the running one serves on.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = taken.local_addr().expect("addr");
    file.rewrite(&text.replace("http = \"127.0.0.1:0\"", &format!("http = \"{busy}\"")));
    let up = upgrade(&file).await;
    assert!(!up.ok, "an unbindable listener fails the upgrade: {}", up.stdout);
    assert!(up.stderr.contains("cannot listen on"), "{}", up.stderr);
    assert_eq!(serving(admin).await, (1, child.id()), "the first process still serves");
    let state = send(admin, Req::get("/state")).await.json();
    assert_eq!(state["process"]["failed_upgrades"], 1, "{}", state["process"]);

    // Fixed: the upgrade goes through.
    file.rewrite(&text);
    let up = upgrade(&file).await;
    assert!(up.ok, "{}\n{}", up.stdout, up.stderr);
    assert_eq!(serving(admin).await, (2, up.pid()));

    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.expect("load");
    assert_eq!(stream.await.expect("stream"), Ok(()), "the stream open all along is whole");
    let failures = seen.failures.lock().clone();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(seen.ok.load(Ordering::Relaxed) > 0);
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait");
    assert!(exit.success(), "the first process drained and exited: {exit:?}");
    let new = up.pid();
    terminate(new);
    eventually(Duration::from_secs(10), "the new process stops", || async { (!running(new)).then_some(()) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_on_the_same_upgrade_socket_is_refused() {
    let rep = replica("fra-1").await;
    let file = ConfigFile::new(&format!(
        "{UPGRADE_EDGE}{LOCATIONS}{}{BODY_ROUTE}",
        pool("fra-a", "fra", &["m"], &[rep.addr], "")
    ));
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut first = serve(&file);
    let Listeners { http, .. } = listening(first.stderr.take().expect("stderr"), log);
    let second = tokio::task::spawn_blocking({
        let path = file.path.clone();
        move || Command::new(STOKE).args(["serve", "--config"]).arg(path).output().expect("runs")
    })
    .await
    .expect("join");
    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("another stoke is running") && stderr.contains("stoke upgrade"), "{stderr}");
    assert_eq!(send(http, Req::chat("m")).await.status, 200, "the first serves on");
    terminate(first.id());
    let exit = tokio::task::spawn_blocking(move || first.wait()).await.expect("join").expect("wait");
    assert!(exit.success());
    assert!(!file.dir.path().join("upgrade.sock").exists(), "the socket file is removed at exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http3_stream_outlives_the_process_that_took_its_socket() {
    let rep = replica_with("fra-1", |o| o.tokens_per_sec = 100.0).await;
    let (pem, key, root) = certificate(&["localhost"]);
    let file = ConfigFile::new(&format!(
        "{UPGRADE_EDGE}https = \"127.0.0.1:0\"\nh3 = \"127.0.0.1:0\"\n\
         [[tls]]\nhosts = [\"localhost\"]\ncert = \"c.crt\"\nkey = \"c.key\"\n{LOCATIONS}{}{BODY_ROUTE}",
        pool("fra-a", "fra", &["m"], &[rep.addr], "")
    ));
    file.write("c.crt", pem.as_bytes());
    file.write("c.key", key.as_bytes());
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut first = serve(&file);
    let Listeners { admin, https, h3, .. } = listening(first.stderr.take().expect("stderr"), log.clone());
    let (https, h3) = (https.expect("an HTTPS listener"), h3.expect("an HTTP/3 listener"));
    let c = try_h3_client(h3, root.clone()).await.expect("h3 connection");
    // About 5 s of tokens, on a connection of the first process: more
    // than the sender may have unacknowledged, so that the client's
    // acknowledgements must reach it through the new process.
    let stream = tokio::spawn(h3_one(c.send.clone(), c.base.clone(), chat_body("m", true, 500)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let up = upgrade(&file).await;
    assert!(up.ok, "{}\n{}", up.stdout, up.stderr);
    assert_eq!(serving(admin).await.0, 2);
    // The TLS listener was handed over too: HTTP/2 by ALPN on the same port.
    let tls = send_tls(https, std::slice::from_ref(&root), "localhost", &[b"h2"], Req::chat("m")).await;
    assert_eq!((tls.resp.status.as_u16(), tls.alpn.as_deref()), (200, Some(&b"h2"[..])));
    // A new connection is the new process's.
    let fresh = try_h3_client(h3, root).await.expect("a new h3 connection");
    let mut send = fresh.send.clone();
    assert_eq!(h3_post(&mut send, &fresh.base, chat_body("m", false, 2), false).await, Ok(()));
    let streamed = stream.await.expect("join");
    assert_eq!(streamed, Ok(()), "first process's log:\n{}\nupgrades:\n{}", log.lock().join("\n"), up.stderr);
    drop((c, fresh.conn.clone()));
    fresh.conn.close(0u32.into(), b"done");
    let _ = first.wait();
    terminate(up.pid());
}
