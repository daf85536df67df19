//! The `stoke` binary as a user runs it: `check`, `--help`, and `serve`
//! stopping cleanly on SIGTERM with an in-flight request finishing.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use support::*;

const STOKE: &str = env!("CARGO_BIN_EXE_stoke");

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples")
}

#[test]
fn check_accepts_the_examples() {
    for name in ["network.toml", "local.toml"] {
        let out = Command::new(STOKE).args(["check", "--config"]).arg(examples().join(name)).output().expect("runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains(": ok: "), "{stdout}");
        assert!(stdout.contains("locations") && stdout.contains("pools") && stdout.contains("route"), "{stdout}");
    }
    let out = Command::new(STOKE)
        .args(["check", "--location", "syd", "--config"])
        .arg(examples().join("network.toml"))
        .output()
        .expect("runs");
    assert!(out.status.success());
}

#[test]
fn check_reports_every_problem_with_its_place() {
    let file = ConfigFile::new(
        "[edge]\nhttp = \"127.0.0.1:8080\"\nhttps = \"127.0.0.1:8080\"\n\n[[location]]\nid = \"fra\"\nlat = 50.1\nlon = 8.7\nzone = 1\n\n\
         [[pool]]\nid = \"p\"\nlocation = \"ber\"\nserves = [\"m\"]\nreplicas = [\"127.0.0.1:9000\"]\nmax_queue = 0\n\n[[route]]\nservice = \"m\"\n",
    );
    let out = Command::new(STOKE).args(["check", "--config"]).arg(&file.path).output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let path = file.path.display().to_string();
    for (line, col, needle) in [
        (3, 9, "already uses"),
        (3, 9, "[edge].https needs a certificate"),
        (9, 1, "unknown key \"zone\""),
        (13, 12, "\"ber\" is not a location"),
        (16, 13, "max_queue = 0"),
    ] {
        let prefix = format!("{path}:{line}:{col}: ");
        assert!(
            stderr.lines().any(|l| l.starts_with(&prefix) && l.contains(needle)),
            "missing {prefix}…{needle} in:\n{stderr}"
        );
    }
}

#[test]
fn check_of_a_missing_file_says_so() {
    let out = Command::new(STOKE).args(["check", "--config", "/nonexistent/stoke.toml"]).output().expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn help_describes_every_command_and_flag() {
    let out = Command::new(STOKE).arg("--help").output().expect("runs");
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["serve", "upgrade", "check", "demo", "sim"] {
        assert!(help.contains(cmd), "{cmd} missing from --help:\n{help}");
    }
    for (cmd, flags) in [
        (&["serve"][..], &["--config", "--location", "--log-format", "--upgrade"][..]),
        (&["upgrade"], &["--config", "--location"]),
        (&["check"], &["--config"]),
        (&["demo"], &["--duration"]),
        (&["sim", "replica"], &["--listen", "--name", "--boot-time", "--max-concurrency", "--tokens-per-sec"]),
    ] {
        let out = Command::new(STOKE).args(cmd).arg("--help").output().expect("runs");
        let help = String::from_utf8_lossy(&out.stdout);
        for f in flags {
            assert!(help.contains(f), "{f} missing from `stoke {} --help`:\n{help}", cmd.join(" "));
        }
    }
}

/// Read the JSON log lines of a child until the plain listener's address
/// shows; returns it and the admin listener's.
fn listening_addrs(stderr: std::process::ChildStderr) -> (SocketAddr, SocketAddr) {
    let mut lines = BufReader::new(stderr).lines();
    let (mut http, mut admin) = (None, None);
    while let Some(Ok(line)) = lines.next() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            let addr = || v["addr"].as_str().and_then(|a| a.parse().ok());
            match v["listener"].as_str() {
                Some("http") => http = addr(),
                Some("admin") => admin = addr(),
                _ => {}
            }
            if let (Some(h), Some(a)) = (http, admin) {
                // Keep draining the pipe so the child never blocks on it.
                std::thread::spawn(move || for _ in lines {});
                return (h, a);
            }
        }
    }
    panic!("the edge never reported its listeners");
}

/// `stoke serve` as the edge at fra over `config`, logging JSON to a pipe.
fn serve_fra(config: &std::path::Path) -> std::process::Child {
    Command::new(STOKE)
        .args(["--log-format", "json", "serve", "--location", "fra", "--config"])
        .arg(config)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn stoke serve")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_stops_on_sigterm_after_in_flight_requests_finish() {
    let rep = replica_with("fra-1", |o| o.tokens_per_sec = 20.0).await;
    let file = ConfigFile::new(&format!(
        "{EDGE}{LOCATIONS}{}\n[[route]]\nservice_from = \"body:model\"\n",
        pool("fra-a", "fra", &["m"], &[rep.addr], "")
    ));
    let mut child = serve_fra(&file.path);
    let (addr, _) = listening_addrs(child.stderr.take().expect("stderr"));

    let resp = open(addr, &Req::post("/v1/chat/completions", chat_body("m", true, 20))).await;
    assert_eq!(resp.status(), 200);
    let reader = tokio::spawn(collect(resp));
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());

    let done = reader.await.expect("reader");
    assert!(done.text().ends_with("data: [DONE]\n\n"), "the in-flight stream finished: {}", done.text());
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait");
    assert!(exit.success(), "exit status {exit:?}");
    // And it no longer listens.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// The first SIGTERM drains (a stream in flight runs on); a second one
/// stops the process at once, whatever is still draining.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_stops_without_waiting_for_the_drain() {
    let rep = replica_with("fra-1", |o| o.tokens_per_sec = 5.0).await;
    let file = ConfigFile::new(&format!(
        "{}{LOCATIONS}{}\n[[route]]\nservice_from = \"body:model\"\n",
        EDGE.replace("drain_timeout = \"5s\"", "drain_timeout = \"60s\""),
        pool("fra-a", "fra", &["m"], &[rep.addr], "")
    ));
    let mut child = serve_fra(&file.path);
    let (addr, _) = listening_addrs(child.stderr.take().expect("stderr"));
    // About 20 s of tokens.
    let resp = open(addr, &Req::post("/v1/chat/completions", chat_body("m", true, 100))).await;
    assert_eq!(resp.status(), 200);
    let reader = tokio::spawn(collect(resp));
    let pid = child.id();
    terminate(pid);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(running(pid), "the first SIGTERM drains: the stream runs on");
    terminate(pid);
    eventually(std::time::Duration::from_secs(5), "stopped at the second SIGTERM", || async {
        (!running(pid)).then_some(())
    })
    .await;
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait");
    assert!(exit.success(), "{exit:?}");
    reader.abort();
}

/// SIGTERM right after the listeners are up is a clean stop, not the
/// signal's default action (which would end the process at once and cut
/// every connection): the handlers are in place before anything is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_as_soon_as_serving_is_a_clean_stop() {
    let rep = replica("fra-1").await;
    let file = ConfigFile::new(&format!(
        "{EDGE}{LOCATIONS}{}\n[[route]]\nservice_from = \"body:model\"\n",
        pool("fra-a", "fra", &["m"], &[rep.addr], "")
    ));
    for _ in 0..3 {
        let mut child = serve_fra(&file.path);
        let _ = listening_addrs(child.stderr.take().expect("stderr"));
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
        assert!(status.success());
        let exit = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait");
        assert!(exit.success(), "stopped by the signal itself: {exit:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config() {
    let rep = replica("fra-1").await;
    let text = format!(
        "{EDGE}{LOCATIONS}{}\n[[route]]\nservice_from = \"body:model\"\n",
        pool("fra-a", "fra", &["m"], &[rep.addr], "")
    );
    let file = ConfigFile::new(&text);
    let mut child = serve_fra(&file.path);
    let (_, admin) = listening_addrs(child.stderr.take().expect("stderr"));
    assert_eq!(send(admin, Req::get("/state")).await.json()["version"], 1);
    let version = || async { send(admin, Req::get("/state")).await.json()["version"].as_u64() };

    // The file is untouched: only the signal can cause this reload.
    let status = Command::new("kill").args(["-HUP", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    eventually(std::time::Duration::from_secs(5), "reloaded on SIGHUP", || async {
        (version().await == Some(2)).then_some(())
    })
    .await;
    let state = send(admin, Req::get("/state")).await.json();
    assert_eq!(state["last_reload"]["trigger"], "signal");
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait");
    assert!(exit.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_while_the_edge_starts_are_caught() {
    // A replica that accepts and never answers: the edge's first probe of
    // it takes its whole timeout (500 ms) before the edge serves.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let file = ConfigFile::new(&format!(
        "{EDGE}{LOCATIONS}{}\n[[route]]\nservice_from = \"body:model\"\n",
        pool_probed("fra-a", "fra", &["m"], &[silent_addr], SLOW_PROBES, "")
    ));
    let mut child = serve_fra(&file.path);
    let pid = child.id().to_string();
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    // SIGHUP while the edge starts: once its handler was installed only
    // after the start, this ended the process.
    let mut admin = None;
    while let Some(Ok(line)) = lines.next() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        if v["fields"]["message"] == "starting edge" || v["message"] == "starting edge" {
            let status = Command::new("kill").args(["-HUP", &pid]).status().expect("kill");
            assert!(status.success());
        }
        if v["listener"] == "admin" || v["fields"]["listener"] == "admin" {
            admin = v["addr"].as_str().or(v["fields"]["addr"].as_str()).and_then(|a| a.parse::<SocketAddr>().ok());
            break;
        }
    }
    let admin = admin.expect("the edge came up despite the SIGHUP");
    std::thread::spawn(move || for _ in lines {});
    // The reload it asked for happens once the edge serves.
    eventually(std::time::Duration::from_secs(5), "reloaded for the early SIGHUP", || async {
        (send(admin, Req::get("/state")).await.json()["version"] == 2).then_some(())
    })
    .await;
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait");
    assert!(exit.success(), "{exit:?}");
    holder.abort();
}

/// `stoke serve` over HTTP/1.1: a body-routed request, a token stream,
/// the edge's own limits, and an answer that closes the connection with
/// more bytes behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_serves_whole_answers_streams_and_its_limits() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rep = replica("fra-1").await;
    let file = ConfigFile::new(&format!(
        "{EDGE}max_headers = 8\n{LOCATIONS}{}\n[[route]]\nservice_from = \"body:model\"\n",
        pool("fra-a", "fra", &["m"], &[rep.addr], "")
    ));
    let mut child = serve_fra(&file.path);
    let (http, _admin) = listening_addrs(child.stderr.take().expect("stderr"));

    let r = send(http, Req::chat("m")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("stoke-pool"), Some("fra-a"));
    assert!(r.json()["choices"].is_array(), "{}", r.text());

    let r = send(http, Req::post("/v1/chat/completions", chat_body("m", true, 5))).await;
    assert_eq!(r.status, 200);
    assert!(r.text().trim_end().ends_with("data: [DONE]"), "{}", r.text());

    let mut many = Req::chat("m");
    for i in 0..10 {
        many = many.header(&format!("x-extra-{i}"), "1");
    }
    let r = send(http, many).await;
    assert_eq!(r.status, 431, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "headers_too_large");

    // The answer to a request that closes its connection is written even
    // with a second request pipelined behind it (which is not served).
    let body = chat_body("m", false, 2);
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(http).await.expect("connect");
    s.write_all(raw.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut answer)).await;
    read.expect("answered in time").expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");

    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait");
    assert!(exit.success());
}
