//! `stoke simulate` as a user runs it: a config and a trace in, a table or
//! the JSON of the contract out, every policy compared; bad input gets a
//! clear error and exit code 1.

mod support;

use std::process::Command;

use serde_json::Value;
use support::*;

const STOKE: &str = env!("CARGO_BIN_EXE_stoke");

/// The test locations; Frankfurt always on, Paris scales to zero.
fn config() -> String {
    format!("[edge]\nadmin = \"127.0.0.1:0\"\n{LOCATIONS}{POOLS}")
}

const POOLS: &str = r#"
[[pool]]
id = "fra-a"
location = "fra"
serves = ["m"]
replicas = ["127.0.0.1:9000"]
max_concurrency = 4

[[pool]]
id = "par-a"
location = "par"
serves = ["m"]
replicas = ["127.0.0.1:9001", "127.0.0.1:9002"]
max_concurrency = 4
load = {}
[pool.scale]
idle_timeout = "auto"
min_idle = "1s"
wake_time = "3s"
wake = { url = "http://127.0.0.1:7000/wake" }
sleep = { url = "http://127.0.0.1:7000/sleep" }

[[route]]
service = "m"
max_wait = "10s"
"#;

/// Paris busy for two stretches an hour apart, a request every second.
fn trace() -> String {
    let mut s = String::new();
    for start in [0u32, 3600] {
        for i in 0..120 {
            s.push_str(&format!(
                "{{\"t\": {}, \"edge\": \"par\", \"model\": \"m\", \"prompt_tokens\": 500, \"output_tokens\": 50}}\n",
                start + i
            ));
        }
    }
    s
}

fn simulate(file: &ConfigFile, args: &[&str]) -> std::process::Output {
    Command::new(STOKE).args(["simulate", "--config"]).arg(&file.path).args(args).output().expect("runs")
}

#[test]
fn every_policy_is_compared_in_one_run() {
    let file = ConfigFile::new(&config());
    file.write("day.jsonl", trace().as_bytes());
    let t = file.dir.path().join("day.jsonl");
    let out = simulate(&file, &["--json", "--trace", t.to_str().expect("path")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["trace"]["requests"], 240);
    let policies = v["policies"].as_array().expect("policies");
    let names: Vec<&str> = policies.iter().filter_map(|p| p["policy"].as_str()).collect();
    assert_eq!(names, ["always-on", "fixed:5m", "config", "auto"]);
    let by = |name: &str| policies.iter().find(|p| p["policy"] == name).expect("policy");
    for p in policies {
        for key in ["gpu_seconds", "wakes", "requests", "ok", "refused"] {
            assert!(p[key].is_number(), "{key} in {p}");
        }
        for key in ["p50", "p99", "max"] {
            assert!(p["hold_ms"][key].is_number(), "hold_ms.{key}");
        }
        assert!(p["ttft_ms"]["p99"].is_number());
        assert!(p["pools"]["par-a"]["gpu_seconds"].is_number(), "per pool figures");
        assert_eq!(p["requests"], 240);
        assert_eq!(p["ok"], 240, "{}", p["policy"]);
    }
    let gpu = |name: &str| by(name)["gpu_seconds"].as_f64().expect("number");
    // Always on: three replicas through the whole trace, never a wake.
    assert_eq!(by("always-on")["wakes"], 0);
    assert!(gpu("always-on") > 3.0 * 3700.0);
    // Five minutes bridges nothing of the hour between the two stretches;
    // auto sleeps sooner after each, and uses less.
    assert_eq!(by("fixed:5m")["pools"]["par-a"]["wakes"], 2);
    assert!(gpu("auto") < gpu("fixed:5m"), "{} vs {}", gpu("auto"), gpu("fixed:5m"));
    assert!(gpu("fixed:5m") < gpu("always-on"));
    // The first requests of each stretch wait for the wake (or go to Frankfurt).
    assert!(by("config")["pools"]["par-a"]["wakes"].as_u64().is_some_and(|w| w >= 2));
}

#[test]
fn the_table_names_each_policy_and_pool() {
    let file = ConfigFile::new(&config());
    file.write("day.jsonl", trace().as_bytes());
    let t = file.dir.path().join("day.jsonl");
    let out =
        simulate(&file, &["--trace", t.to_str().expect("path"), "--policy", "always-on", "--policy", "fixed:30s"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    for needle in ["GPU-s", "hold p99", "ttft p99", "always-on", "fixed:30s", "  par-a", "  fra-a", "240 requests"] {
        assert!(stdout.contains(needle), "{needle} missing:\n{stdout}");
    }
}

#[test]
fn the_azure_csv_is_mapped_to_edges_and_models() {
    let file = ConfigFile::new(&config());
    let mut csv = String::from("TIMESTAMP,ContextTokens,GeneratedTokens\n");
    for i in 0..200 {
        csv.push_str(&format!("2023-11-16 12:{:02}:{:02}.1000000,{},{}\n", i / 60, i % 60, 300 + i, 40));
    }
    file.write("azure.csv", csv.as_bytes());
    let t = file.dir.path().join("azure.csv");
    let out =
        simulate(&file, &["--json", "--trace", t.to_str().expect("path"), "--assign", "edges=fra:1+par:3,stretch=2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["trace"]["format"], "azure-csv");
    assert_eq!(v["trace"]["requests"], 200);
    // Stretched twice: 199 s of rows span 398 s.
    assert_eq!(v["trace"]["span_s"], 398.0);
    let par = v["trace"]["edges"]["par"].as_u64().expect("par rows");
    assert!((110..190).contains(&par), "about three quarters at Paris: {par}");
}

#[test]
fn bad_input_is_explained() {
    let file = ConfigFile::new(&config());
    file.write(
        "bad.jsonl",
        b"{\"t\": 1, \"edge\": \"par\", \"model\": \"m\"}\n{\"t\": 2, \"edge\": \"ber\", \"model\": \"m\"}\n",
    );
    let bad = file.dir.path().join("bad.jsonl");
    let bad = bad.to_str().expect("path");
    for (args, needle) in [
        (vec!["--trace", bad], "bad.jsonl:2: edge \"ber\" is not an edge location"),
        (vec!["--trace", "/nonexistent/trace.jsonl"], "/nonexistent/trace.jsonl"),
        (vec!["--trace", bad, "--policy", "sometimes"], "unknown policy \"sometimes\""),
    ] {
        let out = simulate(&file, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{needle} missing:\n{stderr}");
    }
}

#[test]
fn the_demo_network_replays_without_a_config_file() {
    let dir = tempfile::tempdir().expect("dir");
    let t = dir.path().join("t.jsonl");
    std::fs::write(&t, "{\"t\": 0.5, \"edge\": \"syd\", \"model\": \"llama-3.1-8b\", \"output_tokens\": 20}\n")
        .expect("write");
    let out = Command::new(STOKE)
        .args(["simulate", "--demo", "--json", "--policy", "config", "--trace"])
        .arg(&t)
        .output()
        .expect("runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["policies"][0]["ok"], 1);
    assert!(v["policies"][0]["pools"]["fra-h100"].is_object());
}
