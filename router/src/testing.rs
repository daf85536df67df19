//! Helpers for unit tests: a small network compiled from text, bound to
//! state, with no sockets.

use std::sync::{Arc, Mutex};

use crate::state::Router;

/// The `[edge]` table (at Frankfurt) and two locations, Frankfurt and
/// Paris, of the small test networks.
pub const FRA_PAR: &str = r#"
[edge]
location = "fra"
admin = "127.0.0.1:0"

[[location]]
id = "fra"
lat = 50.1
lon = 8.7

[[location]]
id = "par"
lat = 48.9
lon = 2.4
"#;

/// Two locations, Frankfurt (this edge) and Paris, each with a pool of
/// one replica that scales to zero (`[pool.scale]` as given by `scale`),
/// serving the model `m`; hooks point at a closed port.
pub fn two_pools(max_concurrency: u32, scale: &str) -> Arc<Router> {
    Router::new(snapshot(&two_pools_text(max_concurrency, scale)))
}

/// The config text of [`two_pools`].
pub fn two_pools_text(max_concurrency: u32, scale: &str) -> String {
    let pool = |id: &str, loc: &str, port: u16| {
        format!(
            r#"
[[pool]]
id = "{id}"
location = "{loc}"
serves = ["m"]
replicas = ["127.0.0.1:{port}"]
max_concurrency = {max_concurrency}
[pool.scale]
{scale}
wake = {{ url = "http://127.0.0.1:9/wake" }}
sleep = {{ url = "http://127.0.0.1:9/sleep" }}
"#
        )
    };
    format!(
        r#"{FRA_PAR}{}{}
[[route]]
service = "m"
"#,
        pool("fra-gpu", "fra", 9),
        pool("par-gpu", "par", 10)
    )
}

/// The snapshot of `text` at its `[edge].location`.
pub fn snapshot(text: &str) -> stoke_config::Snapshot {
    let net = stoke_config::load_str(text, std::path::Path::new("test.toml")).expect("test config loads");
    net.for_edge(None).expect("edge location")
}

/// A writer whose output a test reads (`text`), for log tests.
#[derive(Clone, Default)]
pub struct Written(Arc<Mutex<Vec<u8>>>);

impl Written {
    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().expect("lock").clone()).expect("utf-8")
    }
}

impl std::io::Write for Written {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
