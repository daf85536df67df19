//! Live reload and the admin API: reloads never drop a request, a bad file
//! never goes live, changes apply on the next request, state carries over,
//! certificates swap for new handshakes, and mutating calls need the token.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use stoke_router::sim::OrchestratorOptions;
use support::*;

fn two_pools(a: std::net::SocketAddr, b: std::net::SocketAddr, route_service: &str, max_wait: &str) -> String {
    format!(
        "{EDGE}{LOCATIONS}{}{}\n[[route]]\npath_prefix = \"/v1/\"\nservice_from = \"body:model\"\nmax_wait = \"{max_wait}\"\n\
         \n[[route]]\npath_prefix = \"/fixed/\"\nservice = \"{route_service}\"\nstrip_prefix = true\n",
        pool("fra-a", "fra", &["m", "x"], &[a], ""),
        pool("sin-a", "sin", &["m", "y"], &[b], ""),
    )
}

async fn reload(edge: &stoke_router::edge::Edge, token: Option<&str>) -> Resp {
    let mut req = Req::post("/reload", "");
    if let Some(t) = token {
        req = req.header("authorization", &format!("Bearer {t}"));
    }
    send(edge.bound.admin, req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_reloads_under_load_lose_no_request() {
    logs();
    let (a, b) = (replica("fra-1").await, replica("sin-1").await);
    let variants = [two_pools(a.addr, b.addr, "x", "30s"), two_pools(a.addr, b.addr, "y", "20s")];
    let file = ConfigFile::new(&variants[0]);
    let edge = edge_from(&file, "fra").await;
    let addr = edge.bound.http.expect("http");

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            // Bounded: at most 5,000 requests per worker.
            for i in 0..5_000u32 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let req = if (i + w) % 3 == 0 {
                    Req::post("/v1/chat/completions", chat_body("m", (i % 2) == 0, 2))
                } else {
                    Req::get("/fixed/v1/models")
                };
                let r = send(addr, req).await;
                if r.status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("failed: {} {}", r.status, r.text());
                }
            }
        }));
    }
    for i in 0..100 {
        // Every reload lands under load: at least one request is answered
        // between two reloads (however fast reloads are on this machine).
        let before = ok.load(Ordering::Relaxed);
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            while ok.load(Ordering::Relaxed) == before && failed.load(Ordering::Relaxed) == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        assert!(waited.await.is_ok(), "no request was answered for 10 s before reload {i}");
        file.rewrite(&variants[i % 2]);
        let r = reload(&edge, None).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["result"], "ok");
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed across reloads");
    assert!(ok.load(Ordering::Relaxed) >= 100, "the load ran: {} requests", ok.load(Ordering::Relaxed));
    assert!(edge.router.live().version >= 101);
    let metrics = send(edge.bound.admin, Req::get("/metrics")).await.text();
    let ok_reloads = metrics
        .lines()
        .find(|l| l.starts_with("stoke_config_reloads_total{result=\"ok\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .expect("reload counter");
    assert!(ok_reloads >= 100.0, "{ok_reloads} reloads counted");
    assert!(metrics.contains("stoke_config_snapshot_version"));
    assert_drained(&edge).await;
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_is_reported_and_the_old_config_keeps_serving() {
    logs();
    let (a, b) = (replica("fra-1").await, replica("sin-1").await);
    let good = two_pools(a.addr, b.addr, "x", "30s");
    let file = ConfigFile::new(&good);
    let edge = edge_from(&file, "fra").await;
    let addr = edge.bound.http.expect("http");

    // An unknown key and a bad value, on known lines.
    let broken = good.replacen("max_wait = \"30s\"", "max_wait = \"soon\"\nmax_waitt = 1", 1);
    let line = broken.lines().position(|l| l.contains("\"soon\"")).expect("line") + 1;
    file.rewrite(&broken);
    let r = reload(&edge, None).await;
    assert_eq!(r.status, 422, "{}", r.text());
    let v = r.json();
    assert_eq!(v["result"], "error");
    let errors: Vec<String> =
        v["errors"].as_array().expect("errors").iter().map(|e| e.as_str().unwrap_or("").to_owned()).collect();
    let path = file.path.display().to_string();
    assert!(
        errors.iter().any(|e| e.starts_with(&format!("{path}:{line}:12: ")) && e.contains("not a duration")),
        "{errors:?}"
    );
    assert!(
        errors.iter().any(|e| e.starts_with(&format!("{path}:{}:1: ", line + 1)) && e.contains("max_waitt")),
        "{errors:?}"
    );

    // Still serving the old config, at the old version.
    assert_eq!(edge.router.live().version, 1);
    assert_eq!(send(addr, Req::get("/fixed/v1/models")).await.header("stoke-pool"), Some("fra-a"));
    let state = admin_json(&edge, "/state").await;
    assert_eq!(state["last_reload"]["result"], "error");
    assert_eq!(state["version"], 1);
    let metrics = send(edge.bound.admin, Req::get("/metrics")).await.text();
    assert!(metrics.contains("stoke_config_reloads_total{result=\"error\"}"), "{metrics}");

    // A half-written file never goes live either.
    file.rewrite(&good[..good.len() / 2]);
    assert_eq!(reload(&edge, None).await.status, 422);
    assert_eq!(edge.router.live().version, 1);

    // And a deleted one: keep serving.
    std::fs::remove_file(&file.path).expect("delete");
    let r = reload(&edge, None).await;
    assert_eq!(r.status, 422);
    assert!(r.text().contains("cannot read"), "{}", r.text());
    assert_eq!(send(addr, Req::get("/fixed/v1/models")).await.status, 200);
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_and_pool_changes_apply_to_the_next_request() {
    logs();
    let (a, b) = (replica("fra-1").await, replica("sin-1").await);
    let file = ConfigFile::new(&two_pools(a.addr, b.addr, "x", "30s"));
    let edge = edge_from(&file, "fra").await;
    let addr = edge.bound.http.expect("http");
    assert_eq!(send(addr, Req::get("/fixed/v1/models")).await.header("stoke-pool"), Some("fra-a"));

    // The fixed route now names a service only Singapore serves.
    file.rewrite(&two_pools(a.addr, b.addr, "y", "30s"));
    assert_eq!(reload(&edge, None).await.status, 200);
    assert_eq!(send(addr, Req::get("/fixed/v1/models")).await.header("stoke-pool"), Some("sin-a"));

    // Frankfurt's pool leaves; "m" now goes to Singapore.
    let text = format!(
        "{EDGE}{LOCATIONS}{}\n[[route]]\npath_prefix = \"/v1/\"\nservice_from = \"body:model\"\n",
        pool("sin-a", "sin", &["m", "y"], &[b.addr], "")
    );
    file.rewrite(&text);
    assert_eq!(reload(&edge, None).await.status, 200);
    assert_eq!(send(addr, Req::chat("m")).await.header("stoke-pool"), Some("sin-a"));
    assert_eq!(send(addr, Req::get("/fixed/v1/models")).await.status, 404, "the route is gone");
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_carries_over_and_streams_finish_on_their_snapshot() {
    logs();
    let a = replica_with("fra-1", |o| o.tokens_per_sec = 20.0).await;
    let b = replica("sin-1").await;
    let file = ConfigFile::new(&two_pools(a.addr, b.addr, "x", "30s"));
    let edge = edge_from(&file, "fra").await;
    let addr = edge.bound.http.expect("http");
    let stream = open(addr, &Req::post("/v1/chat/completions", chat_body("x", true, 20))).await;
    file.rewrite(&two_pools(a.addr, b.addr, "y", "25s"));
    assert_eq!(reload(&edge, None).await.status, 200);
    // The in-flight count is visible in the new snapshot's view.
    assert_eq!(pool_state(&edge, "fra-a").await["in_flight"], 1);
    let done = collect(stream).await;
    assert!(done.text().ends_with("data: [DONE]\n\n"));
    assert_drained(&edge).await;
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_of_a_removed_pool_are_answered() {
    logs();
    std::env::set_var("STOKE_TEST_ORCH_TOKEN", "orch-secret");
    let (listener, orch_addr) = orchestrator_listener().await;
    let sin = replica("sin-1").await;
    let cold = free_addr();
    let route = "\n[[route]]\nservice_from = \"body:model\"\nmax_wait = \"20s\"\n";
    let with = format!(
        "{EDGE}{LOCATIONS}{}{}{route}",
        scaled_pool("fra-a", "fra", &["m"], &[cold], orch_addr, "wake_time = \"1s\""),
        pool("sin-a", "sin", &["other"], &[sin.addr], "")
    );
    let file = ConfigFile::new(&with);
    let opts = OrchestratorOptions { ignore_wakes: true, start_always_on: false, ..Default::default() };
    let orch = start_orchestrator(listener, &file, opts).await;
    let edge = edge_from(&file, "fra").await;
    let held = tokio::spawn(send(edge.bound.http.expect("http"), Req::chat("m")));
    eventually(Duration::from_secs(5), "held", || async {
        (pool_state(&edge, "fra-a").await["queue"] == 1).then_some(())
    })
    .await;

    file.rewrite(&format!("{EDGE}{LOCATIONS}{}{route}", pool("sin-a", "sin", &["other"], &[sin.addr], "")));
    assert_eq!(reload(&edge, None).await.status, 200);
    let r = tokio::time::timeout(Duration::from_secs(3), held).await.expect("answered promptly").expect("task");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "pool_removed");
    edge.shutdown().await;
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_watch_reloads_after_rewrites_and_renames() {
    logs();
    let (a, b) = (replica("fra-1").await, replica("sin-1").await);
    let file = ConfigFile::new(&two_pools(a.addr, b.addr, "x", "30s"));
    let edge = edge_from(&file, "fra").await;
    let addr = edge.bound.http.expect("http");

    // Truncate and rewrite in place.
    file.rewrite(&two_pools(a.addr, b.addr, "y", "30s"));
    eventually(Duration::from_secs(5), "reload on rewrite", || async {
        (send(addr, Req::get("/fixed/v1/models")).await.header("stoke-pool") == Some("sin-a")).then_some(())
    })
    .await;
    // Write a temporary file and rename it over the config, as editors do.
    let tmp = file.dir.path().join(".stoke.toml.swp");
    std::fs::write(&tmp, two_pools(a.addr, b.addr, "x", "30s")).expect("write");
    std::fs::rename(&tmp, &file.path).expect("rename");
    eventually(Duration::from_secs(5), "reload on rename", || async {
        (send(addr, Req::get("/fixed/v1/models")).await.header("stoke-pool") == Some("fra-a")).then_some(())
    })
    .await;
    let state = admin_json(&edge, "/state").await;
    assert_eq!(state["last_reload"]["trigger"], "file");
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_admin_calls_need_the_token() {
    logs();
    std::env::set_var("STOKE_TEST_ADMIN_TOKEN", "s3cret-token");
    let a = replica("fra-1").await;
    let text = format!(
        "{}{LOCATIONS}{}\n[[route]]\nservice = \"m\"\n",
        EDGE.replace("debug_headers", "admin_token_env = \"STOKE_TEST_ADMIN_TOKEN\"\ndebug_headers"),
        pool("fra-a", "fra", &["m"], &[a.addr], "")
    );
    let file = ConfigFile::new(&text);
    let edge = edge_from(&file, "fra").await;
    assert_eq!(reload(&edge, None).await.status, 401);
    assert_eq!(reload(&edge, Some("wrong")).await.status, 401);
    assert_eq!(reload(&edge, Some("s3cret-token")).await.status, 200);
    let ready = |t: Option<&str>| {
        let mut r = Req::post("/pools/fra-a/ready", "");
        if let Some(t) = t {
            r = r.header("authorization", &format!("Bearer {t}"));
        }
        send(edge.bound.admin, r)
    };
    assert_eq!(ready(None).await.status, 401);
    assert_eq!(ready(Some("s3cret-token")).await.status, 202);
    assert_eq!(
        send(edge.bound.admin, Req::post("/pools/nope/ready", "").header("authorization", "Bearer s3cret-token"))
            .await
            .status,
        404
    );
    // Reads need no token.
    for path in ["/healthz", "/readyz", "/state", "/metrics"] {
        assert_eq!(send(edge.bound.admin, Req::get(path)).await.status, 200, "{path}");
    }
    let state = admin_json(&edge, "/state").await;
    assert_eq!(state["edge"], "fra");
    assert_eq!(state["locations"].as_array().map(Vec::len), Some(4));
    assert_eq!(state["pools"][0]["replicas"][0]["ready"], true);
    assert!(state["config"]["hash"].as_str().is_some_and(|h| h.len() == 16));
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposed_admin_listener_without_a_token_refuses_to_start() {
    let text = format!(
        "[edge]\nhttp = \"127.0.0.1:0\"\nadmin = \"0.0.0.0:0\"\n{LOCATIONS}{}\n[[route]]\nservice = \"m\"\n",
        pool("fra-a", "fra", &["m"], &["127.0.0.1:9".parse().expect("addr")], "")
    );
    let file = ConfigFile::new(&text);
    let source = stoke_router::reload::ConfigSource { path: file.path.clone(), location: Some("fra".into()) };
    let err = stoke_router::edge::Edge::start_from(source).await.err().expect("refused");
    assert!(err.to_string().contains("not on loopback and no token"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_swap_is_seen_by_new_handshakes_and_open_connections_stay() {
    logs();
    let rep = replica("fra-1").await;
    let (a_pem, a_key, a_der) = certificate(&["api.example.com"]);
    let (b_pem, b_key, b_der) = certificate(&["api.example.com"]);
    let text = format!(
        "[edge]\nhttps = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[[tls]]\nhosts = [\"api.example.com\"]\ncert = \"c.crt\"\nkey = \"c.key\"\n\
         {LOCATIONS}{}\n[[route]]\nservice = \"m\"\n",
        pool("fra-a", "fra", &["m"], &[rep.addr], "")
    );
    let file = ConfigFile::new(&text);
    file.write("c.crt", a_pem.as_bytes());
    file.write("c.key", a_key.as_bytes());
    let edge = edge_from(&file, "fra").await;
    let addr = edge.bound.https.expect("https");
    let roots = [a_der.clone(), b_der.clone()];

    let mut open_conn = TlsConn::connect(addr, &roots, "api.example.com").await;
    assert_eq!(open_conn.peer_cert, a_der);
    assert_eq!(open_conn.get("/v1/models").await, 200);

    file.write("c.crt", b_pem.as_bytes());
    file.write("c.key", b_key.as_bytes());
    assert_eq!(reload(&edge, None).await.status, 200);

    let fresh =
        send_tls(addr, &roots, "api.example.com", &[b"http/1.1"], Req::get("/v1/models").host("api.example.com")).await;
    assert_eq!(fresh.peer_cert.as_ref(), Some(&b_der), "a new handshake gets the new certificate");
    assert_eq!(open_conn.get("/v1/models").await, 200, "the open connection still works");
    edge.shutdown().await;
}

/// A kept-open HTTP/1.1 connection over TLS.
struct TlsConn {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    peer_cert: rustls::pki_types::CertificateDer<'static>,
}

impl TlsConn {
    async fn connect(
        addr: std::net::SocketAddr,
        roots: &[rustls::pki_types::CertificateDer<'static>],
        sni: &str,
    ) -> Self {
        let config = tls_client_config(roots, &[b"http/1.1"]);
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).expect("name");
        let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.expect("handshake");
        let peer_cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).expect("cert").clone().into_owned();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.expect("h1");
        tokio::spawn(conn);
        TlsConn { sender, peer_cert }
    }

    async fn get(&mut self, path: &str) -> u16 {
        let req = http::Request::builder()
            .uri(path)
            .header("host", "api.example.com")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("req");
        let resp = self.sender.send_request(req).await.expect("response");
        let status = resp.status().as_u16();
        let _ = collect(resp).await;
        status
    }
}
