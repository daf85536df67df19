//! `stoke simulate`: replay a trace through the decision core of every
//! edge on a virtual clock, once per idle policy, and compare what each
//! costs (GPU-seconds, wakes) with what users get (answers, holds, time to
//! first token). See [`engine`] for what runs and what is modelled.

pub mod day;
pub mod engine;
pub mod report;
pub mod trace;

use std::io::IsTerminal;
use std::path::Path;

use serde_json::json;

pub use engine::{Policy, Rates, Replay, ReplicaModel};
pub use report::{Figures, PolicyReport, Report};
pub use trace::{Trace, TraceRequest};

/// The policies run when none is named.
pub const DEFAULT_POLICIES: &[&str] = &["always-on", "fixed:5m", "config", "auto"];

/// What to replay.
#[derive(Debug)]
pub struct Options<'a> {
    /// The network's config text.
    pub config: &'a str,
    /// Where it was read from (relative paths in it are resolved from there).
    pub config_path: &'a Path,
    /// Policies, in the order to report them.
    pub policies: Vec<String>,
    /// How the replicas work.
    pub replicas: ReplicaModel,
    /// Seed of every draw (replica picks, probe phases).
    pub seed: u64,
    /// Show progress on standard error (when it is a terminal).
    pub progress: bool,
    /// Replay at least this many seconds (a live run to compare with may
    /// have gone on after its last request).
    pub until: Option<f64>,
}

/// Why a replay failed.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    /// A policy is not known.
    #[error("--policy: {0}")]
    Policy(String),
    /// The config did not load.
    #[error(transparent)]
    Replay(#[from] engine::ReplayError),
}

/// Replay `trace` under every policy of `opts`.
pub fn run(opts: &Options<'_>, trace: &Trace) -> Result<Report, SimulateError> {
    let policies: Vec<(String, Policy)> = opts
        .policies
        .iter()
        .map(|p| Policy::parse(p).map(|parsed| (p.clone(), parsed)).map_err(SimulateError::Policy))
        .collect::<Result<_, _>>()?;
    let show = opts.progress && std::io::stderr().is_terminal();
    let mut reports = Vec::new();
    for (name, policy) in &policies {
        let replay = Replay::new(opts.config, opts.config_path, policy, trace, &opts.replicas, opts.seed)?;
        let report = replay.run(name, opts.until, |done| {
            if show {
                eprint!("\r{name}: {:>3.0} %", done * 100.0);
            }
        });
        if show {
            eprint!("\r{:width$}\r", "", width = name.len() + 8);
        }
        reports.push(report);
    }
    let edges: std::collections::BTreeMap<&str, usize> = trace.requests.iter().fold(Default::default(), |mut m, r| {
        *m.entry(r.edge.as_str()).or_default() += 1;
        m
    });
    let info = json!({
        "source": trace.source,
        "format": trace.format,
        "assign": trace.assign,
        "requests": trace.requests.len(),
        "span_s": (trace.span() * 10.0).round() / 10.0,
        "edges": edges,
    });
    Ok(Report { trace: info, policies: reports })
}

/// Parse a `--rate POOL=PREFILL/DECODE` value (tokens per second).
pub fn parse_rate(s: &str) -> Result<(String, Rates), String> {
    let (pool, rates) = s.split_once('=').ok_or_else(|| format!("\"{s}\" is not POOL=PREFILL/DECODE"))?;
    let (p, d) = rates.split_once('/').ok_or_else(|| format!("\"{rates}\" is not PREFILL/DECODE"))?;
    let num = |x: &str| x.trim().parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0);
    match (num(p), num(d)) {
        (Some(prefill_tps), Some(decode_tps)) if decode_tps > 0.0 => {
            Ok((pool.to_owned(), Rates { prefill_tps, decode_tps }))
        }
        _ => Err(format!("\"{rates}\": prefill ≥ 0 and decode > 0 tokens per second")),
    }
}
