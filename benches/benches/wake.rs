//! How soon a held request leaves once a waking pool's replica is seen
//! ready. Goal: the first held request is forwarded within 10 ms.
//!
//! Two measurements:
//! - `dispatch`: in process, from a probe's "ready" (the replica marked
//!   ready and the pool's queue dispatched) to the held request holding its
//!   slot;
//! - `forward`: end to end on loopback, with a real edge and a simulated
//!   replica: from the moment the replica's `/health` first answers 200 to
//!   the moment the held request arrives at the replica. This includes the
//!   probe's round trip, the dispatch and the upstream connect.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use stoke_router::edge::Edge;
use stoke_router::sim::{Replica, ReplicaOptions};
use stoke_router::state::PoolView;

fn dispatch(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    c.bench_function("wake/dispatch: replica seen ready -> held request has its slot", |b| {
        b.to_async(&rt).iter_custom(|iters| async move {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let view = Arc::new(PoolView::detached(1, 4, 16));
                let mut ticket = view.hold(stoke_router::clock::now()).expect("held");
                let (tx, rx) = tokio::sync::oneshot::channel();
                let waiter = tokio::spawn(async move {
                    let slot = ticket.slot().await;
                    let _ = tx.send(Instant::now());
                    drop(slot);
                });
                tokio::task::yield_now().await;
                let seen = Instant::now();
                view.replicas[0].set_ready(true);
                view.dispatch(stoke_router::clock::now());
                let got = rx.await.expect("slot handed over");
                total += got.duration_since(seen);
                let _ = waiter.await;
            }
            total
        })
    });
}

/// A world: one scale-to-zero pool with one simulated replica, an
/// orchestrator stand-in that accepts wakes, and an edge.
struct World {
    edge: Edge,
    replica: Replica,
    _dir: std::path::PathBuf,
    _orch: tokio::task::JoinHandle<()>,
}

async fn world() -> World {
    // The wake hook only has to answer; readiness comes from the replica.
    let orch = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let orch_addr = orch.local_addr().expect("addr");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let orch_task = tokio::spawn(async move {
        let _keep = stop_tx;
        stoke_router::net::server::serve_http(orch, stop_rx, |_req| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Either::Left(
                http_body_util::Full::new(bytes::Bytes::from_static(b"{}")),
            )))
        })
        .await
    });
    let replica = Replica::start(ReplicaOptions { tokens_per_sec: 10_000.0, ..ReplicaOptions::default() })
        .await
        .expect("replica");
    let text = format!(
        "[edge]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nthreads = 1\n\
         [[location]]\nid = \"fra\"\nlat = 50.1\nlon = 8.7\n\
         [[pool]]\nid = \"fra-a\"\nlocation = \"fra\"\nserves = [\"m\"]\nreplicas = [\"{}\"]\n\
         health = {{ path = \"/health\", interval = \"5s\", timeout = \"1s\" }}\n\
         [pool.scale]\nwake_time = \"500ms\"\nidle_timeout = \"1h\"\nwake = {{ url = \"http://{orch_addr}/wake\" }}\n\
         [[route]]\nservice = \"m\"\nmax_wait = \"30s\"\n",
        replica.addr
    );
    let dir = std::env::temp_dir().join(format!("stoke-wake-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("stoke.toml");
    std::fs::write(&path, text).expect("config");
    let snapshot = stoke_config::load_snapshot(&path, Some("fra")).expect("config loads");
    let edge = Edge::start(snapshot).await.expect("edge");
    World { edge, replica, _dir: dir, _orch: orch_task }
}

/// One wake cycle: the replica goes down, a request is held (the pool
/// wakes), the replica comes up; returns the time from its first healthy
/// answer to the held request's arrival.
async fn cycle(w: &World, addr: SocketAddr) -> Duration {
    w.replica.set_sick(true);
    let live = w.edge.router.live();
    live.pools[0].replicas[0].set_ready(false);
    let body = bytes::Bytes::from_static(br#"{"model":"m","messages":[],"max_tokens":1}"#);
    let request = tokio::spawn(stoke_router::net::client::call(
        addr,
        http::Method::POST,
        "localhost",
        "/v1/chat/completions",
        None,
        body,
        Duration::from_secs(30),
    ));
    // Held: wait until it is in the queue, and a little more (a real boot).
    while live.pools[0].queue.is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(40)).await;
    w.replica.set_sick(false);
    let answer = request.await.expect("join").expect("answered");
    assert!(answer.status.is_success(), "{}", answer.status);
    let seen = w.replica.stats.healthy_since.lock().ok().and_then(|h| *h).expect("health seen");
    let arrived = w.replica.stats.last_request_at.lock().ok().and_then(|a| *a).expect("request arrived");
    arrived.saturating_duration_since(seen)
}

fn forward(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let w = rt.block_on(world());
    let addr = w.edge.bound.http.expect("http");
    // The distribution matters more than the mean: print it once.
    let mut samples: Vec<Duration> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..40 {
            v.push(cycle(&w, addr).await);
        }
        v
    });
    samples.sort();
    let pct = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    println!(
        "wake/forward over {} wakes: p50 {:?}, p90 {:?}, max {:?} from the replica's first healthy answer to the held request's arrival",
        samples.len(),
        pct(0.5),
        pct(0.9),
        pct(1.0)
    );
    let mut group = c.benchmark_group("wake");
    group.sample_size(10);
    group.bench_function("forward: replica healthy -> held request arrives", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let w = &w;
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += cycle(w, addr).await;
                }
                total
            }
        })
    });
    group.finish();
}

criterion_group!(benches, dispatch, forward);
criterion_main!(benches);
