//! Why: a reload (parse, validate, compile, per-edge ranking, swap) runs on
//! every config change at every edge, and the goal is under 50 ms for a
//! network of 10 locations, 1,000 pools and 10,000 routes.
//!
//! Run: `cargo bench -p stoke-benches --bench config_compile`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use mimalloc::MiMalloc;
use stoke_benches::{generate_network, load, mark_ready};
use stoke_router::state::Router;

// Loading allocates a great deal (the parse tree, then the network), so
// the allocator matters: use the one the `stoke` binary uses.
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

const LOCATIONS: usize = 10;
const POOLS: usize = 1_000;
const ROUTES: usize = 10_000;

fn config_compile(c: &mut Criterion) {
    let text = generate_network(LOCATIONS, POOLS, ROUTES);
    let mut group = c.benchmark_group("config_compile");
    // Each iteration takes milliseconds: fewer, longer samples.
    group.sample_size(20).measurement_time(Duration::from_secs(10));

    // Stages 1 to 3: TOML parse, decode with spans, validate and compile.
    group.bench_function("load_str/10loc-1000pools-10000routes", |b| {
        b.iter(|| load(black_box(&text)).expect("generated network loads"))
    });

    // Stage 4 alone: rank, for the edge's location, the pools of every
    // service. It consumes the network, so each iteration gets a fresh one
    // (built outside the timing).
    group.bench_function("for_edge/10loc-1000pools-10000routes", |b| {
        b.iter_batched(
            || load(&text).expect("generated network loads"),
            |network| network.for_edge(None).expect("edge location is set"),
            BatchSize::PerIteration,
        )
    });

    // The whole reload as the edge does it: load, specialise for the edge,
    // bind pool states and swap the live snapshot (the old one is dropped
    // here, as no request holds it).
    let router =
        Router::new(load(&text).expect("generated network loads").for_edge(None).expect("edge location is set"));
    mark_ready(&router.live());
    group.bench_function("reload/10loc-1000pools-10000routes", |b| {
        b.iter(|| {
            let snapshot =
                load(black_box(&text)).expect("generated network loads").for_edge(None).expect("edge location is set");
            router.swap(snapshot)
        })
    });
    group.finish();
}

criterion_group!(benches, config_compile);
criterion_main!(benches);
