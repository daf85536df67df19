//! stoke's config file: one TOML file describes the whole network, and every
//! edge reads the same file.
//!
//! Loading goes in stages (as sozu's `FileConfig → Config` does):
//!
//! 1. **parse**: TOML text into a tree that keeps the span of every key and value;
//! 2. **decode** ([`file`]): the tree into raw structs, reporting unknown keys,
//!    missing keys and wrong types, and carrying on;
//! 3. **compile** ([`compile`]): cross-references and limits checked, ids interned,
//!    defaults filled in, routes indexed: a [`Network`];
//! 4. **per edge**: [`Snapshot::new`] ranks, for the edge's location, the pools
//!    of every service by round-trip time.
//!
//! Every problem of stages 2 and 3 is reported, each with its line and column.

#![forbid(unsafe_code)]

mod compile;
pub mod decode;
pub mod defaults;
mod diag;
pub mod duration;
mod file;
pub mod routes;
mod snapshot;

use std::path::Path;

pub use compile::{light_bounds, vllm_light_hooks};
pub use diag::{ConfigError, Problem};
pub use routes::{HostPattern, RouteTable};
pub use snapshot::{
    Affinity, AffinityKey, Auth, AuthHeader, Candidate, ClusterSettings, EdgeSettings, HealthCheck, Hook, HookStep,
    HookToken, HookUrl, HookVar, HttpStep, IdleTimeout, LightSleep, LoadFormat, LoadReport, Location, LocationId,
    Network, Pool, PoolId, RateLimit, Route, RouteId, Scale, Service, ServiceId, ServiceSource, Snapshot, Source,
    Template, TlsCert, TracingSettings,
};

use diag::Diagnostics;

/// Read and compile the file at `path`.
pub fn load(path: &Path) -> Result<Network, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    let text = String::from_utf8(bytes).map_err(|e| ConfigError::Invalid {
        path: path.to_owned(),
        problems: vec![problem_at(
            std::str::from_utf8(&e.as_bytes()[..e.utf8_error().valid_up_to()]).unwrap_or(""),
            e.utf8_error().valid_up_to(),
            "the file is not valid UTF-8".to_owned(),
        )],
    })?;
    load_str(&text, path)
}

/// Compile config `text` as if read from `path` (used for messages and to
/// resolve relative paths).
pub fn load_str(text: &str, path: &Path) -> Result<Network, ConfigError> {
    let invalid = |problems| ConfigError::Invalid { path: path.to_owned(), problems };
    let (root, syntax) = toml::de::DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        // A syntax error leaves the rest of the tree unreliable: report
        // only the syntax errors, all of them.
        let problems = syntax
            .iter()
            .map(|e| {
                let at = e.span().map_or(0, |s| s.start);
                problem_at(text, at, format!("TOML syntax: {}", e.message().trim()))
            })
            .collect();
        return Err(invalid(problems));
    }
    let mut diags = Diagnostics::default();
    let span = root.span();
    let file = file::decode(&mut diags, root.get_ref(), span);
    let source = Source { path: path.to_owned(), hash: format!("{:016x}", fnv1a(text.as_bytes())) };
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    let network = compile::compile(&mut diags, file, source, base);
    match network {
        Some(n) if diags.is_empty() => Ok(n),
        _ => Err(invalid(diags.into_problems(text))),
    }
}

/// Read, compile and specialise the file for one edge. `location` (from
/// `--location`) overrides `[edge].location`.
pub fn load_snapshot(path: &Path, location: Option<&str>) -> Result<Snapshot, ConfigError> {
    load(path)?.for_edge(location)
}

impl Network {
    /// The snapshot for the edge at `location`, or at `[edge].location` if
    /// `None`.
    pub fn for_edge(self, location: Option<&str>) -> Result<Snapshot, ConfigError> {
        let wanted = location.map(str::to_owned).or_else(|| self.edge.location.clone());
        let Some(wanted) = wanted else {
            return Err(ConfigError::NoLocation { path: self.source.path.clone() });
        };
        match self.location_id(&wanted) {
            Some(id) => Ok(Snapshot::new(self, id)),
            None => Err(ConfigError::UnknownLocation {
                path: self.source.path.clone(),
                known: self.locations.iter().map(|l| l.id.as_str()).collect::<Vec<_>>().join(", "),
                given: wanted,
            }),
        }
    }
}

fn problem_at(text: &str, offset: usize, message: String) -> Problem {
    let mut d = Diagnostics::default();
    d.error(offset..offset, message);
    d.into_problems(text).remove(0)
}

/// FNV-1a, 64 bit: a stable, dependency-free fingerprint of the file.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
