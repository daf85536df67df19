//! A real `nats-server` for the tests (JetStream on, in a temp dir, on a
//! free port), killed when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{eventually, free_addr};

/// Where `nats-server` is (the demo looks for it the same way).
pub fn nats_binary() -> PathBuf {
    stoke_router::demo::nats::binary()
        .expect("nats-server is not installed: apt-get install nats-server (the cluster tests run a real one)")
}

/// One `nats-server` process, killed when dropped.
pub struct Nats {
    child: Option<Child>,
    args: Vec<String>,
    pub port: u16,
    /// A server alone (not a hub member or a leaf), with JetStream.
    single: bool,
    _dir: tempfile::TempDir,
}

impl Nats {
    /// A single server with JetStream, on a free port outside the ephemeral range.
    pub async fn start() -> Nats {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_addr().port();
        let args = ["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"]
            .iter()
            .map(|s| s.to_string())
            .chain([dir.path().display().to_string()])
            .collect();
        Self::run(args, port, dir, true).await
    }

    /// A server from a config file's text (written into its own temp dir,
    /// where `{dir}` points).
    pub async fn from_conf(conf: &str, port: u16) -> Nats {
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = conf.replace("{dir}", &dir.path().display().to_string());
        let path = dir.path().join("nats-server.conf");
        std::fs::write(&path, conf).expect("write conf");
        Self::run(vec!["-c".to_owned(), path.display().to_string()], port, dir, false).await
    }

    async fn run(args: Vec<String>, port: u16, dir: tempfile::TempDir, single: bool) -> Nats {
        let mut n = Nats { child: None, args, port, single, _dir: dir };
        n.restart().await;
        n
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Start (again) with the same port and store.
    pub async fn restart(&mut self) {
        let child = Command::new(nats_binary())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        // Accepting is not serving: wait until a client is let in and, on
        // a single server, JetStream answers (a server that accepts a
        // moment before it is ready resets the connection). A hub member
        // answers once its cluster has formed, a leaf once it reaches the
        // hub, so those are only waited for to let a client in.
        let (url, single) = (self.url(), self.single);
        eventually(Duration::from_secs(10), "nats-server serving", || async {
            let client = async_nats::connect(&url).await.ok()?;
            if !single {
                return Some(());
            }
            let info = client.request("$JS.API.INFO", "".into());
            tokio::time::timeout(Duration::from_secs(1), info).await.ok()?.ok().map(|_| ())
        })
        .await;
    }

    /// Kill it (SIGKILL: an outage, not a goodbye).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}
