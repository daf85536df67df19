//! Prompt-cache affinity (`[pool.affinity]`): the same conversation reaches
//! the same replica from every edge, a hot key spills under load and comes
//! back, bodies are forwarded intact, and requests without a key are served.

mod support;

use std::time::Duration;

use support::*;

/// Two edges (Frankfurt, Paris) and one pool of four replicas at Frankfurt
/// with affinity on the prompt prefix.
async fn world(affinity: &str, replicas: &[std::net::SocketAddr]) -> (Vec<stoke_router::edge::Edge>, ConfigFile) {
    let text = format!(
        "{EDGE}{LOCATIONS}{}[pool.affinity]\n{affinity}\n{BODY_ROUTE}",
        pool("fra-a", "fra", &["m"], replicas, "max_concurrency = 8"),
    );
    let file = ConfigFile::new(&text);
    let fra = edge_from(&file, "fra").await;
    let par = edge_from(&file, "par").await;
    (vec![fra, par], file)
}

fn conversation(system: &str, turns: &[&str]) -> String {
    let mut messages = vec![serde_json::json!({"role": "system", "content": system})];
    for (i, t) in turns.iter().enumerate() {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        messages.push(serde_json::json!({"role": role, "content": t}));
    }
    serde_json::json!({"model": "m", "messages": messages, "max_tokens": 2}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_reaches_the_same_replica_from_every_edge() {
    logs();
    let reps = [replica("r0").await, replica("r1").await, replica("r2").await, replica("r3").await];
    let addrs: Vec<_> = reps.iter().map(|r| r.addr).collect();
    let (edges, _file) = world("key = \"prefix\"", &addrs).await;
    let (fra, par) = (edges[0].bound.http.expect("http"), edges[1].bound.http.expect("http"));
    let mut owners = std::collections::HashSet::new();
    for c in 0..12 {
        let system = format!("You are assistant number {c}.");
        let first = send(fra, Req::post("/v1/chat/completions", conversation(&system, &["hi"]))).await;
        assert_eq!(first.status, 200, "{}", first.text());
        let owner = first.header("stoke-replica").expect("replica header").to_owned();
        // Later turns, from the other edge, keep the conversation's replica.
        let turns = ["hi", "Hello!", "tell me more"];
        let later = send(par, Req::post("/v1/chat/completions", conversation(&system, &turns))).await;
        assert_eq!(later.status, 200, "{}", later.text());
        assert_eq!(later.header("stoke-edge"), Some("par"));
        assert_eq!(later.header("stoke-replica"), Some(owner.as_str()), "conversation {c} moved");
        owners.insert(owner);
    }
    assert!(owners.len() >= 2, "conversations spread over the replicas: {owners:?}");
    let metrics = send(edges[0].bound.admin, Req::get("/metrics")).await.text();
    assert!(metrics.contains("stoke_affinity_total{pool=\"fra-a\",result=\"owner\"}"), "{metrics}");
    for e in edges {
        e.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_spills_under_load_and_returns_when_it_drops() {
    logs();
    let mut reps = Vec::new();
    for i in 0..4 {
        reps.push(replica_with(&format!("r{i}"), |o| o.tokens_per_sec = 20.0).await);
    }
    let addrs: Vec<_> = reps.iter().map(|r| r.addr).collect();
    let (edges, _file) = world("key = \"header:x-session-id\"", &addrs).await;
    let addr = edges[0].bound.http.expect("http");
    let req = |tokens: u32| {
        Req::post("/v1/chat/completions", chat_body("m", true, tokens)).header("x-session-id", "hot-session")
    };
    // The owner, while idle.
    let owner = send(addr, req(1)).await.header("stoke-replica").expect("replica").to_owned();
    // A long stream holds the owner: the next request with the key is over
    // the load bound there (max_load × mean + 1, with the default 1.1) and
    // goes to another replica.
    let long = open(addr, &req(200)).await;
    assert_eq!(long.headers().get("stoke-replica").and_then(|v| v.to_str().ok()), Some(owner.as_str()));
    let spilled = send(addr, req(1)).await;
    assert_ne!(spilled.header("stoke-replica"), Some(owner.as_str()), "the hot key did not spill");
    drop(long);
    assert_drained(&edges[0]).await;
    // Load even again: back to the owner.
    eventually(Duration::from_secs(5), "the key returns to its replica", || async {
        (send(addr, req(1)).await.header("stoke-replica") == Some(owner.as_str())).then_some(())
    })
    .await;
    let metrics = send(edges[0].bound.admin, Req::get("/metrics")).await.text();
    assert!(metrics.contains("stoke_affinity_total{pool=\"fra-a\",result=\"spilled\"}"), "{metrics}");
    for e in edges {
        e.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_forwarded_whole_and_requests_without_a_key_are_served() {
    logs();
    let (echo, _task) = echo_upstream(false).await;
    let (edges, _file) = world("key = \"prefix\"\nprefix_bytes = 64", &[echo]).await;
    let addr = edges[0].bound.http.expect("http");
    // A body far larger than prefix_bytes reaches the replica byte for byte.
    let body = conversation(&"long system prompt ".repeat(1000), &["hi"]);
    let r = send(addr, Req::post("/v1/chat/completions", body.clone())).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body_len"], body.len());
    // No messages and no prompt: no key, served all the same.
    let r = send(addr, Req::post("/v1/embeddings", "{\"model\":\"m\",\"input\":\"x\"}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let metrics = send(edges[0].bound.admin, Req::get("/metrics")).await.text();
    assert!(metrics.contains("stoke_affinity_total{pool=\"fra-a\",result=\"none\"}"), "{metrics}");
    for e in edges {
        e.shutdown().await;
    }
}

/// Time to the first SSE frame of a streamed chat.
async fn ttft(addr: std::net::SocketAddr, body: String) -> (Duration, Option<String>) {
    use http_body_util::BodyExt;
    let started = std::time::Instant::now();
    let resp = open(addr, &Req::post("/v1/chat/completions", body)).await;
    let replica = resp.headers().get("stoke-replica").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut body = resp.into_body();
    let _ = body.frame().await;
    let took = started.elapsed();
    while let Some(Ok(_)) = body.frame().await {}
    (took, replica)
}

fn counter(metrics: &str, name: &str) -> f64 {
    metrics.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replica_holding_a_prefix_answers_sooner() {
    logs();
    // Prefill of 2,000 tokens a second: a 2,000-token opening costs a
    // second uncached, nothing once cached.
    let mut reps = Vec::new();
    for i in 0..3 {
        reps.push(replica_with(&format!("r{i}"), |o| o.prefill_tokens_per_sec = 2000.0).await);
    }
    let addrs: Vec<_> = reps.iter().map(|r| r.addr).collect();
    let (edges, _file) = world("key = \"prefix\"", &addrs).await;
    let (fra, par) = (edges[0].bound.http.expect("http"), edges[1].bound.http.expect("http"));
    let system = "You answer questions about the network. ".repeat(200);
    let stream = |turns: &[&str]| {
        let mut v: serde_json::Value = serde_json::from_str(&conversation(&system, turns)).expect("json");
        v["stream"] = serde_json::Value::Bool(true);
        v.to_string()
    };
    let (cold, first) = ttft(fra, stream(&["hi"])).await;
    let (warm, second) = ttft(par, stream(&["hi", "Hello.", "and then?"])).await;
    assert_eq!(first, second, "the second turn, from the other edge, went to the replica with the cache");
    assert!(cold >= Duration::from_millis(900), "an uncached opening is prefilled: {cold:?}");
    assert!(warm * 3 < cold, "the cached opening is not prefilled again: {warm:?} vs {cold:?}");
    // The replicas say so in vLLM's metric names.
    let owner = reps.iter().find(|r| first.as_deref() == Some(r.addr.to_string().as_str())).expect("the owner");
    let metrics = send(owner.addr, Req::get("/metrics")).await.text();
    let (queries, hits) =
        (counter(&metrics, "vllm:prefix_cache_queries_total"), counter(&metrics, "vllm:prefix_cache_hits_total"));
    assert!(queries > 4000.0 && hits > 1900.0, "queries {queries}, hits {hits}:\n{metrics}");
    for e in edges {
        e.shutdown().await;
    }
}
