//! The demo's cluster: a `nats-server` with JetStream on a free loopback
//! port, its store in a temp directory, stopped with the demo. Without the
//! binary (Debian's `nats-server` package) the demo runs its edges alone.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `nats-server`, killed and its store removed on drop.
pub struct NatsServer {
    child: Child,
    /// Where clients connect.
    pub url: String,
    dir: PathBuf,
}

/// Where `nats-server` is installed, if it is.
pub fn binary() -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/local/sbin", "/usr/local/bin"])
        .map(|d| PathBuf::from(d).join("nats-server"))
        .find(|p| p.is_file());
    found
}

impl NatsServer {
    /// Start one on a free port outside the ephemeral range; `Err` says why
    /// not (not installed, did not start).
    pub fn start() -> Result<NatsServer, String> {
        let bin = binary().ok_or("nats-server is not installed (apt-get install nats-server)")?;
        let port = crate::sim::ports::replica_addr().map_err(|e| e.to_string())?.port();
        let dir =
            std::env::temp_dir().join(format!("stoke-demo-nats-{}-{:08x}", std::process::id(), fastrand::u32(..)));
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        let child = Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        let server = NatsServer { child, url: format!("nats://127.0.0.1:{port}"), dir };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                return Err(format!("nats-server did not listen on {addr} within 5 s"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
