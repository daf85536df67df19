//! Access control per route (API keys, rate limits) and routing that no
//! hostile input can bend: a request only ever reaches a pool that serves
//! its service.

mod support;

use std::time::Duration;

use support::*;

const KEY_A: &str = "sk-alpha-0123456789abcdef";
const KEY_B: &str = "sk-bravo-0123456789abcdef";

async fn keyed_edge(auth: &str, rate: &str) -> (stoke_router::edge::Edge, ConfigFile, stoke_router::sim::Replica) {
    let rep = replica("fra-1").await;
    let text = format!(
        "{EDGE}{LOCATIONS}{}\n[[route]]\npath_prefix = \"/v1/\"\nservice_from = \"body:model\"\nauth = {auth}\n{rate}\n",
        pool("fra-a", "fra", &["m"], &[rep.addr], "")
    );
    let file = ConfigFile::new(&text);
    file.write("keys.txt", format!("# API keys\n{KEY_A}\n\n{KEY_B}\n").as_bytes());
    let edge = edge_from(&file, "fra").await;
    (edge, file, rep)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_required_and_checked() {
    logs();
    let (edge, _file, _rep) = keyed_edge("{ keys_file = \"keys.txt\" }", "").await;
    let addr = edge.bound.http.expect("http");
    let r = send(addr, Req::chat("m")).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "missing_api_key");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = send(addr, Req::chat("m").header("authorization", "Bearer sk-wrong-0123456789abcdef")).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    assert!(!r.text().contains("sk-wrong"), "the key is not echoed");
    for key in [KEY_A, KEY_B] {
        let r = send(addr, Req::chat("m").header("authorization", &format!("Bearer {key}"))).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_guessing_keys_is_refused_with_429() {
    logs();
    let (edge, _file, _rep) = keyed_edge("{ keys_file = \"keys.txt\" }", "").await;
    let addr = edge.bound.http.expect("http");
    let guess = |i: usize| Req::chat("m").header("authorization", &format!("Bearer sk-guess-{i:020}"));
    // Ten wrong keys are told they are wrong...
    for i in 0..10 {
        let r = send(addr, guess(i)).await;
        assert_eq!(
            (r.status.as_u16(), r.json()["error"]["code"].as_str()),
            (401, Some("invalid_api_key")),
            "guess {i}"
        );
    }
    // ...then the client is slowed down, whatever it sends, a right key too.
    let r = send(addr, guess(10)).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "too_many_invalid_keys");
    let retry: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).expect("retry-after");
    assert!((1..=6).contains(&retry), "retry after {retry} s");
    assert_eq!(send(addr, Req::chat("m").header("authorization", &format!("Bearer {KEY_A}"))).await.status, 429);
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_in_a_header_of_their_own() {
    logs();
    let (edge, _file, _rep) = keyed_edge("{ keys_file = \"keys.txt\", header = \"x-api-key\" }", "").await;
    let addr = edge.bound.http.expect("http");
    assert_eq!(send(addr, Req::chat("m").header("authorization", &format!("Bearer {KEY_A}"))).await.status, 401);
    assert_eq!(send(addr, Req::chat("m").header("x-api-key", KEY_A)).await.status, 200);
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_per_key_answer_429_with_retry_after() {
    logs();
    let (edge, _file, _rep) =
        keyed_edge("{ keys_file = \"keys.txt\" }", "rate_limit = { per_key = 2.0, burst = 3 }").await;
    let addr = edge.bound.http.expect("http");
    let with = |key: &str| Req::chat("m").header("authorization", &format!("Bearer {key}"));
    for _ in 0..3 {
        assert_eq!(send(addr, with(KEY_A)).await.status, 200);
    }
    let r = send(addr, with(KEY_A)).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "rate_limited");
    assert_eq!(r.header("retry-after"), Some("1"));
    // Another key has its own bucket.
    assert_eq!(send(addr, with(KEY_B)).await.status, 200);
    // Tokens come back at the configured rate.
    eventually(Duration::from_secs(3), "a token refills", || async {
        (send(addr, with(KEY_A)).await.status == 200).then_some(())
    })
    .await;
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_per_client_ip() {
    logs();
    let rep = replica("fra-1").await;
    let text = format!(
        "{EDGE}{LOCATIONS}{}\n[[route]]\nservice = \"m\"\nrate_limit = {{ per_ip = 1.0, burst = 2 }}\n",
        pool("fra-a", "fra", &["m"], &[rep.addr], "")
    );
    let (edge, _file) = edge(&text, "fra").await;
    let addr = edge.bound.http.expect("http");
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(send(addr, Req::get("/v1/models")).await.status.as_u16());
        }
        v
    };
    assert_eq!(&statuses[..2], &[200, 200]);
    assert!(statuses[2..].iter().all(|s| *s == 429), "{statuses:?}");
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_never_reach_a_pool_that_does_not_serve_the_service() {
    logs();
    let (a, b) = (replica("a-1").await, replica("b-1").await);
    let text = format!(
        "{EDGE}{LOCATIONS}{}{}\n[[route]]\npath_prefix = \"/v1/\"\nservice_from = \"body:model\"\n\
         \n[[route]]\npath_prefix = \"/h/\"\nservice_from = \"header:x-model\"\nstrip_prefix = true\n",
        pool("fra-a", "fra", &["alpha"], &[a.addr], ""),
        pool("par-b", "par", &["bravo"], &[b.addr], ""),
    );
    let (edge, _file) = edge(&text, "fra").await;
    let addr = edge.bound.http.expect("http");
    let serves = |pool: &str| if pool == "fra-a" { "alpha" } else { "bravo" };
    let body = |s: &str| Req::post("/v1/chat/completions", s.to_owned());
    let cases: Vec<(Req, Option<&str>)> = vec![
        // The body decides on a body route, whatever the headers say.
        (body(r#"{"model":"bravo"}"#).header("x-model", "alpha").header("stoke-pool", "fra-a"), Some("bravo")),
        // A "model" key given twice is refused (the edge and a Python
        // server would read different ones); nested ones never count.
        (body(r#"{"model":"alpha","model":"bravo"}"#), None),
        (body(r#"{"meta":{"model":"bravo"},"model":"alpha"}"#), Some("alpha")),
        (body(r#"{"mod\u0065l":"bravo"}"#), Some("bravo")),
        // Pool ids, near misses, control characters and injections are not services.
        (body(r#"{"model":"fra-a"}"#), None),
        (body(r#"{"model":"alpha "}"#), None),
        (body(r#"{"model":"ALPHA"}"#), None),
        (body(r#"{"model":"alpha\u0000"}"#), None),
        (body(r#"{"model":"alpha\r\nx-model: bravo"}"#), None),
        (body(r#"{"model":["alpha"]}"#), None),
        (body(r#"{"model":{"alpha":1}}"#), None),
        (body(&format!(r#"{{"model":"{}"}}"#, "a".repeat(100_000))), None),
        (body(&"[".repeat(10_000)), None),
        (Req::get("/v1/chat/completions?model=alpha"), None),
        // Header routes: only the named header, trimmed, exact.
        (Req::get("/h/v1/models").header("x-model", "bravo"), Some("bravo")),
        (Req::get("/h/v1/models").header("x-model", " alpha "), Some("alpha")),
        (Req::get("/h/v1/models").header("x-model", "alpha, bravo"), None),
        (Req::get("/h/v1/models").header("x-models", "alpha"), None),
    ];
    for (req, expected) in cases {
        let path = req.path.clone();
        let r = send(addr, req).await;
        match expected {
            Some(service) => {
                assert_eq!(r.status, 200, "{path}: {}", r.text());
                let pool = r.header("stoke-pool").expect("pool header");
                assert_eq!(serves(pool), service, "{path} went to {pool}");
            }
            None => {
                assert!(r.status.is_client_error(), "{path}: {} {}", r.status, r.text());
                assert!(r.header("stoke-pool").is_none(), "{path}: no pool may be chosen");
            }
        }
    }
    // What the replicas received is what the client sent for their service.
    assert!(String::from_utf8_lossy(&b.last_body()).contains("bravo"));
    edge.shutdown().await;
}
