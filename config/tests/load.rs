//! Loading real files: the examples load, and every kind of problem is
//! reported with its line and column, all in one run.

use std::path::{Path, PathBuf};

use stoke_config::{load, load_str, ConfigError, Problem, ServiceSource};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// Problems of `text`, as (line, column, message); panics if it loads.
fn problems(text: &str) -> Vec<Problem> {
    // Relative TLS paths resolve against the examples dir.
    match load_str(text, &examples_dir().join("test.toml")) {
        Ok(_) => panic!("expected problems, the file loaded:\n{text}"),
        Err(ConfigError::Invalid { problems, .. }) => problems,
        Err(other) => panic!("expected problems, got {other}"),
    }
}

fn assert_problem(problems: &[Problem], line: usize, needle: &str) {
    assert!(
        problems.iter().any(|p| p.line == line && p.message.contains(needle)),
        "no problem on line {line} containing {needle:?}; got:\n{}",
        problems.iter().map(|p| format!("{}:{}: {}", p.line, p.column, p.message)).collect::<Vec<_>>().join("\n")
    );
}

const BASE: &str = r#"
[edge]
location = "fra"
http = "127.0.0.1:8080"

[[location]]
id = "fra"
lat = 50.11
lon = 8.68

[[location]]
id = "par"
lat = 48.86
lon = 2.35

[[pool]]
id = "fra-a"
location = "fra"
serves = ["m"]
replicas = ["127.0.0.1:9000"]

[[route]]
service = "m"
"#;

#[test]
fn every_example_loads() {
    let mut seen = 0;
    for entry in std::fs::read_dir(examples_dir()).expect("examples dir") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let network = load(&path).unwrap_or_else(|e| panic!("{} failed:\n{e}", path.display()));
            assert!(!network.pools.is_empty(), "{}", path.display());
            for id in network.edge_locations() {
                let loc = network.location(id).id.clone();
                let net = load(&path).expect("loads twice");
                net.for_edge(Some(&loc)).expect("every edge location compiles");
            }
            seen += 1;
        }
    }
    assert!(seen >= 2, "expected at least two example files");
}

#[test]
fn the_network_example_is_the_ten_city_network() {
    let network = load(&examples_dir().join("network.toml")).expect("loads");
    let ids: Vec<&str> = network.locations.iter().map(|l| l.id.as_str()).collect();
    assert_eq!(ids, ["fra", "par", "lon", "iad", "nyc", "sfo", "gru", "sin", "nrt", "syd"]);
    assert!(network.pools.iter().any(|p| p.scale.is_some()));
    assert!(network.pools.iter().any(|p| p.scale.is_none()));
    assert!(network.routes.iter().any(|r| matches!(r.service, ServiceSource::BodyField(_))));
    assert!(network.services.len() >= 2);
    // Paris's nearest pool for llama-3.1-8b is its own; Sydney's is Singapore.
    let llama = network.service_id("llama-3.1-8b").expect("service");
    let par = load(&examples_dir().join("network.toml")).expect("loads").for_edge(Some("par")).expect("par");
    assert_eq!(par.network.pool(par.candidates(llama)[0].pool).id, "par-l40s");
    let syd = network.for_edge(Some("syd")).expect("syd");
    assert_eq!(syd.network.pool(syd.candidates(llama)[0].pool).id, "sin-l4");
}

#[test]
fn base_file_loads_with_defaults() {
    let network = load_str(BASE, Path::new("base.toml")).expect("loads");
    let pool = &network.pools[0];
    assert_eq!(pool.max_concurrency, stoke_config::defaults::MAX_CONCURRENCY);
    assert_eq!(pool.max_queue, stoke_config::defaults::MAX_QUEUE);
    assert_eq!(pool.health.path, "/health");
    assert_eq!(network.routes[0].path_prefix, "/");
    assert_eq!(network.routes[0].name, "*/");
    assert_eq!(network.edge.admin, "127.0.0.1:9901".parse().expect("addr"));
    let snap = network.for_edge(None).expect("edge location from the file");
    assert_eq!(snap.edge_location().id, "fra");
}

#[test]
fn unknown_key_and_unknown_location_are_both_reported() {
    let text = BASE
        .replace("replicas = [\"127.0.0.1:9000\"]", "replicas = [\"127.0.0.1:9000\"]\nreplica = 3")
        .replace("location = \"fra\"\nserves", "location = \"ber\"\nserves");
    let p = problems(&text);
    assert_problem(&p, 21, "unknown key \"replica\"");
    assert_problem(&p, 21, "did you mean \"replicas\"");
    assert_problem(&p, 18, "\"ber\" is not a location");
    // Columns point at the key or value at fault.
    let unknown = p.iter().find(|p| p.message.contains("replica\"")).expect("unknown key");
    assert_eq!(unknown.column, 1);
    let loc = p.iter().find(|p| p.message.contains("ber")).expect("location");
    assert_eq!(loc.column, 12);
}

#[test]
fn rendered_errors_are_file_line_col_message() {
    let err = load_str(&BASE.replace("lat = 50.11", "lat = 95.0"), Path::new("conf/stoke.toml")).expect_err("invalid");
    let lines = err.lines();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("conf/stoke.toml:8:7: lat 95 is out of range"), "{}", lines[0]);
}

#[test]
fn each_kind_of_problem() {
    let cases: &[(&str, &str, usize, &str)] = &[
        ("wrong type", "lat = 50.11", 8, "lat in [[location]] must be a number"),
        ("duplicate location", "id = \"par\"", 12, "location id \"fra\" is used twice"),
        ("edge location unknown", "location = \"fra\"\nhttp", 3, "[edge].location \"zzz\" is not a location"),
        ("bad address", "http = \"127.0.0.1:8080\"", 4, "is not an address"),
        ("lon range", "lon = 2.35", 14, "lon 200 is out of range"),
        ("max_concurrency zero", "replicas = [\"127.0.0.1:9000\"]", 21, "max_concurrency = 0"),
        ("max_queue zero", "replicas = [\"127.0.0.1:9000\"]", 21, "max_queue = 0"),
        ("service no pool serves", "service = \"m\"", 23, "no pool serves \"nope\""),
        ("both service and service_from", "service = \"m\"", 24, "not both"),
        ("malformed service_from", "service = \"m\"", 23, "service_from \"query:model\" is not understood"),
        ("bad replica", "replicas = [\"127.0.0.1:9000\"]", 20, "replica \"somewhere\" is not an address"),
        ("duplicate pool", "[[route]]", 23, "pool id \"fra-a\" is used twice"),
        ("h3 without tls", "http = \"127.0.0.1:8080\"", 5, "[edge].h3 needs a certificate"),
        ("address used twice", "http = \"127.0.0.1:8080\"", 5, "already uses"),
        ("bad duration", "service = \"m\"", 24, "is not a duration"),
    ];
    let replacements: &[&str] = &[
        "lat = \"north\"",
        "id = \"fra\"",
        "location = \"zzz\"\nhttp",
        "http = \"localhost:8080\"",
        "lon = 200",
        "replicas = [\"127.0.0.1:9000\"]\nmax_concurrency = 0",
        "replicas = [\"127.0.0.1:9000\"]\nmax_queue = 0",
        "service = \"nope\"",
        "service = \"m\"\nservice_from = \"body:model\"",
        "service_from = \"query:model\"",
        "replicas = [\"somewhere\"]",
        "[[pool]]\nid = \"fra-a\"\nlocation = \"fra\"\nserves = [\"m\"]\nreplicas = [\"127.0.0.1:9001\"]\n\n[[route]]",
        "http = \"127.0.0.1:8080\"\nh3 = \"127.0.0.1:8443\"",
        "http = \"127.0.0.1:8080\"\nadmin = \"127.0.0.1:8080\"",
        "service = \"m\"\nmax_wait = \"soon\"",
    ];
    assert_eq!(cases.len(), replacements.len());
    for ((name, from, line, needle), to) in cases.iter().zip(replacements) {
        assert!(BASE.contains(from), "{name}: base lacks {from:?}");
        let text = BASE.replacen(from, to, 1);
        let p = problems(&text);
        assert!(
            p.iter().any(|p| p.line == *line && p.message.contains(needle)),
            "{name}: no problem on line {line} containing {needle:?}; got {p:#?}"
        );
    }
}

#[test]
fn rtt_naming_unknown_locations() {
    let text = format!("{BASE}\n[[rtt]]\nbetween = [\"fra\", \"xyz\"]\nms = 9\n");
    assert_problem(&problems(&text), 26, "[[rtt]] names \"xyz\" is not a location");
}

#[test]
fn tls_files_missing_or_not_pem() {
    let text = format!(
        "{BASE}\n[[tls]]\nhosts = [\"a.example.com\"]\ncert = \"certs/missing.crt\"\nkey = \"certs/README.md\"\n"
    );
    let p = problems(&text);
    assert_problem(&p, 27, "cert");
    assert_problem(&p, 27, "cannot be read");
    assert_problem(&p, 28, "is not a PEM private key");
}

#[test]
fn tls_files_that_exist_load() {
    let text = format!(
        "{BASE}\n[[tls]]\nhosts = [\"*.example.com\"]\ncert = \"certs/example.crt\"\nkey = \"certs/example.key\"\n"
    )
    .replace("http = \"127.0.0.1:8080\"", "https = \"127.0.0.1:8443\"\nh3 = \"127.0.0.1:8443\"");
    let network = load_str(&text, &examples_dir().join("t.toml")).expect("loads");
    assert_eq!(network.tls.len(), 1);
    assert!(!network.tls[0].chain.is_empty());
}

#[test]
fn syntax_errors_are_located() {
    let p = problems("[edge]\nhttp = \"127.0.0.1:8080\n");
    assert_eq!(p[0].line, 2, "{p:?}");
    assert!(p[0].message.starts_with("TOML syntax"), "{p:?}");
}

#[test]
fn many_problems_in_one_run() {
    let text = r#"
[edge]
locaton = "fra"
http = "nowhere"

[[location]]
id = "fra"
lat = 100
lon = 8

[[pool]]
id = "p"
location = "mars"
serves = []
replicas = ["1.2.3.4"]
max_concurrency = 0

[[route]]
service = "ghost"
service_from = "header:"
"#;
    let p = problems(text);
    for (line, needle) in [
        (3, "unknown key \"locaton\""),
        (4, "not an address"),
        (8, "lat 100 is out of range"),
        (13, "\"mars\" is not a location"),
        (14, "serves must name at least one"),
        (15, "is not an address"),
        (16, "max_concurrency = 0"),
        (20, "not both"),
    ] {
        assert_problem(&p, line, needle);
    }
}

#[test]
fn missing_location_on_the_command_line_is_explained() {
    let text = BASE.replace("location = \"fra\"\nhttp", "http");
    let network = load_str(&text, Path::new("x.toml")).expect("valid without a location");
    let err = network.for_edge(None).expect_err("no location");
    assert!(err.to_string().contains("--location"), "{err}");
    let network = load_str(&text, Path::new("x.toml")).expect("valid");
    let err = network.for_edge(Some("ber")).expect_err("unknown location");
    assert!(err.to_string().contains("fra, par"), "{err}");
}

#[test]
fn values_that_would_overflow_at_run_time_are_rejected_with_their_place() {
    // Each would once pass `stoke check` and panic an edge: a deadline past
    // the end of time, a probe interval too long to jitter, a rate whose
    // Retry-After cannot be said.
    let cases: &[(&str, &str, usize, &str)] = &[
        ("service = \"m\"", "service = \"m\"\nmax_wait = \"18446744073709551615s\"", 24, "longer than any duration"),
        ("service = \"m\"", "service = \"m\"\nmax_wait = \"169h\"", 24, "(168h)"),
        (
            "replicas = [\"127.0.0.1:9000\"]",
            "replicas = [\"127.0.0.1:9000\"]\nhealth = { path = \"/health\", interval = \"9999999h\", timeout = \"1s\" }",
            21,
            "interval in",
        ),
        (
            "service = \"m\"",
            "service = \"m\"\nrate_limit = { per_ip = 1e-300 }",
            24,
            "per_ip = 0.000000",
        ),
    ];
    for (from, to, line, needle) in cases {
        let p = problems(&BASE.replacen(from, to, 1));
        assert!(
            p.iter().any(|p| p.line == *line && p.message.contains(needle)),
            "{to}: no problem on line {line} containing {needle:?}; got {p:#?}"
        );
    }
    // The longest accepted duration loads.
    load_str(&BASE.replacen("service = \"m\"", "service = \"m\"\nmax_wait = \"168h\"", 1), Path::new("t.toml"))
        .expect("a week is accepted");
}

#[test]
fn pool_affinity_is_checked() {
    let with = |table: &str| {
        BASE.replacen(
            "replicas = [\"127.0.0.1:9000\"]",
            &format!("replicas = [\"127.0.0.1:9000\"]\n[pool.affinity]\n{table}"),
            1,
        )
    };
    let net = load_str(&with("key = \"prefix\""), Path::new("t.toml")).expect("loads");
    let a = net.pools[0].affinity.as_ref().expect("affinity");
    assert_eq!((a.key.clone(), a.prefix_bytes, a.max_load), (stoke_config::AffinityKey::Prefix, 4096, 1.1));
    let net = load_str(&with("key = \"header:X-Session-Id\"\nmax_load = 2"), Path::new("t.toml")).expect("loads");
    assert_eq!(
        net.pools[0].affinity.as_ref().map(|a| a.key.clone()),
        Some(stoke_config::AffinityKey::Header("x-session-id".into()))
    );
    for (table, needle) in [
        ("key = \"cookie:x\"", "is not understood"),
        ("prefix_bytes = 4096", "needs key"),
        ("key = \"prefix\"\nmax_load = 0.5", "max_load = 0.5 is out of range"),
        ("key = \"prefix\"\nprefix_bytes = 8", "prefix_bytes = 8 is out of range"),
        ("key = \"prefix\"\nsticky = true", "unknown key \"sticky\""),
    ] {
        let p = problems(&with(table));
        assert!(p.iter().any(|p| p.message.contains(needle)), "{table}: {p:#?}");
    }
}

#[test]
fn idle_timeout_may_be_auto_within_bounds() {
    let with = |scale: &str| {
        BASE.replacen(
            "replicas = [\"127.0.0.1:9000\"]",
            &format!(
                "replicas = [\"127.0.0.1:9000\"]\nload = {{}}\n[pool.scale]\nwake = {{ url = \"http://127.0.0.1:7000/w\" }}\n{scale}"
            ),
            1,
        )
    };
    let idle = |scale: &str| {
        let net = load_str(&with(scale), Path::new("t.toml")).unwrap_or_else(|e| panic!("{scale}: {e}"));
        net.pools[0].scale.as_ref().expect("scale").idle_timeout
    };
    use std::time::Duration;
    use stoke_config::IdleTimeout;
    assert_eq!(idle(""), IdleTimeout::Fixed(Duration::from_secs(300)));
    assert_eq!(idle("idle_timeout = \"30s\""), IdleTimeout::Fixed(Duration::from_secs(30)));
    assert_eq!(
        idle("idle_timeout = \"auto\""),
        IdleTimeout::Auto { min: Duration::from_secs(10), max: Duration::from_secs(1800) }
    );
    assert_eq!(
        idle("idle_timeout = \"auto\"\nmin_idle = \"1s\"\nmax_idle = \"10m\""),
        IdleTimeout::Auto { min: Duration::from_secs(1), max: Duration::from_secs(600) }
    );
    for (scale, needle) in [
        ("idle_timeout = \"5m\"\nmin_idle = \"1s\"", "bound idle_timeout = \"auto\" only"),
        ("max_idle = \"1h\"", "bound idle_timeout = \"auto\" only"),
        ("idle_timeout = \"auto\"\nmin_idle = \"2h\"\nmax_idle = \"1h\"", "is longer than max_idle"),
        ("idle_timeout = \"automatic\"", "is not"),
        ("idle_timeout = \"auto\"\nmax_idle = \"0s\"", "max_idle"),
    ] {
        let p = problems(&with(scale));
        assert!(p.iter().any(|p| p.message.contains(needle)), "{scale}: {p:#?}");
    }
    // Without the replicas' load, the home edge would not see other edges' gaps.
    let p = problems(&with("idle_timeout = \"auto\"").replace("load = {}\n", ""));
    assert!(p.iter().any(|p| p.message.contains("needs load = {")), "{p:#?}");
}

#[test]
fn cluster_settings_load_with_defaults_and_bad_ones_are_named() {
    let net = load_str(&format!("{BASE}\n[cluster]\nnats = [\"nats://127.0.0.1:4222\"]\n"), Path::new("t.toml"))
        .expect("loads");
    let c = net.cluster.expect("[cluster]");
    assert_eq!(c.nats, ["nats://127.0.0.1:4222"]);
    assert_eq!((c.name.as_str(), c.timeout, c.domain), ("stoke", std::time::Duration::from_millis(250), None));
    assert!(load_str(BASE, Path::new("t.toml")).expect("loads").cluster.is_none(), "alone without it");

    let text = format!(
        "{BASE}\n[cluster]\nnats = [\"nats://127.0.0.1\", \"http://x/y:1\"]\nname = \"a.b\"\ntimeout = \"30s\"\ndomain = \"hub one\"\nport = 1\n"
    );
    let p = problems(&text);
    let line = BASE.lines().count() + 2;
    assert_problem(&p, line + 1, "is not a NATS server address");
    assert_problem(&p, line + 2, "prefixes NATS subjects");
    assert_problem(&p, line + 3, "out of range");
    assert_problem(&p, line + 4, "JetStream domain");
    assert_problem(&p, line + 5, "port");
    assert_problem(&problems(&format!("{BASE}\n[cluster]\nname = \"x\"\n")), line, "nats");
}

#[test]
fn measured_rtts_are_on_unless_turned_off() {
    assert!(load_str(BASE, Path::new("t.toml")).expect("loads").edge.measure_rtt);
    let off = BASE.replace("[edge]\n", "[edge]\nmeasure_rtt = false\n");
    assert!(!load_str(&off, Path::new("t.toml")).expect("loads").edge.measure_rtt);
}
