//! Headless chromium for the tests that look at the status page: load a
//! URL, dump its DOM or take a screenshot, and read tags out of the DOM.
//!
//! Needs chromium (`apt-get install chromium`, or `CHROMIUM=/path/to/it`):
//! without it a test fails, it never skips.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The longest one chromium run may take before it is killed.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(60);

/// The chromium binary: `$CHROMIUM`, else Debian's.
pub fn chromium() -> PathBuf {
    let path = std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        path.is_file(),
        "this test needs a headless browser and found none at {}: install Debian's chromium \
         (`apt-get install chromium`) or set CHROMIUM to a chromium binary",
        path.display()
    );
    path
}

/// Load `url` in headless chromium with `extra` flags and return its stdout.
/// Runs on a blocking thread, so that the edge keeps serving meanwhile.
pub async fn browse(chromium: &Path, extra: &[&str], url: &str) -> String {
    let chromium = chromium.to_owned();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || run_chromium(&chromium, &extra, &url)).await.expect("browser thread")
}

pub fn run_chromium(chromium: &Path, extra: &[String], url: &str) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let profile = dir.path().join("profile");
    // Output goes to files, not pipes: a helper process that outlives the
    // browser cannot then keep a reader waiting.
    let stdout_path = dir.path().join("stdout");
    let stderr_path = dir.path().join("stderr");
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path).expect("stdout file"))
        .stderr(File::create(&stderr_path).expect("stderr file"))
        // Its own process group, so that the renderer, zygote and GPU
        // helpers can be ended with it.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {}: {e} (install it with `apt-get install chromium`)", chromium.display())
        });
    let deadline = Instant::now() + BROWSER_TIMEOUT;
    let status: Option<ExitStatus> = loop {
        match child.try_wait().expect("wait for chromium") {
            Some(status) => break Some(status),
            None if Instant::now() >= deadline => break None,
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    kill_group(child.id());
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    match status {
        None => panic!("chromium did not finish within {BROWSER_TIMEOUT:?} loading {url}; stderr:\n{}", tail(&stderr)),
        Some(s) if !s.success() => panic!("chromium failed ({s}) loading {url}; stderr:\n{}", tail(&stderr)),
        Some(_) => stdout,
    }
}

/// End every process left in the group `pgid` (ours: chromium's helpers).
pub fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

pub fn tail(text: &str) -> &str {
    let start = text.len().saturating_sub(4000);
    let start = (start..text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
    &text[start..]
}

/// The opening tags of the elements whose class attribute is exactly `class`.
pub fn elements_with_class(dom: &str, class: &str) -> Vec<String> {
    opening_tags(dom).filter(|t| attr(t, "class").as_deref() == Some(class)).collect()
}

/// The opening tags `<tag ...>`.
pub fn elements_with_tag(dom: &str, tag: &str) -> Vec<String> {
    opening_tags(dom).filter(|t| t[1..].split([' ', '>', '/']).next() == Some(tag)).collect()
}

pub fn opening_tags(dom: &str) -> impl Iterator<Item = String> + '_ {
    dom.match_indices('<').filter_map(move |(at, _)| {
        let end = dom[at..].find('>')?;
        let tag = &dom[at..=at + end];
        tag[1..].starts_with(|c: char| c.is_ascii_alphabetic()).then(|| tag.to_owned())
    })
}

/// The value of `name="..."` in an opening tag.
pub fn attr(tag: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=\"");
    let start = tag.find(&key)? + key.len();
    let len = tag[start..].find('"')?;
    Some(tag[start..start + len].replace("&amp;", "&"))
}
