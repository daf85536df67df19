//! Traces for `stoke simulate`: stoke's own JSON lines (which `stoke demo
//! --record` writes), and the Azure LLM inference CSV mapped to edges and
//! models by an `--assign` spec.
//!
//! JSON lines, one request each:
//! `{"t": 12.5, "edge": "fra", "model": "llama-3.1-8b", "prompt_tokens": 812, "output_tokens": 120, "session": "c42"}`
//! (`t` in seconds from the trace's start; `session` optional).
//!
//! The Azure CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`) has neither
//! edge nor model; `--assign` says how each row gets them:
//!
//! | key | means | default |
//! | --- | --- | --- |
//! | `edges=sun` | an edge drawn in proportion to its local daylight at the row's time (the demo's day curve, [`super::day`]), so that traffic follows the sun | `sun` |
//! | `edges=uniform` | every edge alike | |
//! | `edges=fra:3+par:1` | fixed weights | |
//! | `models=zipf:S` | the config's services in file order, the k-th drawn with weight 1/k^S | `zipf:1` |
//! | `models=a:4+b:1` | fixed weights | |
//! | `stretch=K` | every time × K (the hour-long Azure trace × 24 is a day, at a 24th of its rate) | `1` |
//! | `start=H` | UTC hour at the trace's start, for `edges=sun` | `0` |
//! | `seed=N` | the draws' seed | `1` |
//!
//! Keys are separated by commas: `--assign edges=sun,models=zipf:1.2,stretch=24,start=6`.

use std::path::Path;

use serde::Deserialize;
use stoke_config::Network;

use super::day::{daylight, local_hour};

/// One request of a trace.
#[derive(Clone, Debug, PartialEq, Deserialize, serde::Serialize)]
pub struct TraceRequest {
    /// Seconds from the trace's start.
    pub t: f64,
    /// Edge location id it arrives at.
    pub edge: String,
    /// Model (service) asked for.
    pub model: String,
    /// Prompt tokens.
    #[serde(default)]
    pub prompt_tokens: u32,
    /// Tokens generated.
    #[serde(default)]
    pub output_tokens: u32,
    /// Session (conversation) id, the affinity key where the pool has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// A trace: requests in time order.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// The requests.
    pub requests: Vec<TraceRequest>,
    /// What it was read from, for the report.
    pub source: String,
    /// The format.
    pub format: &'static str,
    /// The `--assign` spec applied (Azure CSV only).
    pub assign: Option<String>,
}

impl Trace {
    /// Seconds from the first request to the last.
    pub fn span(&self) -> f64 {
        self.requests.last().map_or(0.0, |r| r.t)
    }
}

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be read.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// A line is not a request.
    #[error("{path}:{line}: {why}")]
    Line {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// The `--assign` spec is wrong.
    #[error("--assign: {0}")]
    Assign(String),
}

/// Read a trace, telling the format by its content: a first line starting
/// with `{` is JSON lines, one starting with `TIMESTAMP` the Azure CSV.
/// Edges and models are checked against `network`.
pub fn read(path: &Path, assign: Option<&str>, network: &Network) -> Result<Trace, TraceError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| TraceError::Io { path: name.clone(), error })?;
    parse(&text, &name, assign, network)
}

/// [`read`] from text.
pub fn parse(text: &str, name: &str, assign: Option<&str>, network: &Network) -> Result<Trace, TraceError> {
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim_start();
    let mut trace = if first.starts_with('{') {
        if assign.is_some() {
            return Err(TraceError::Assign("a JSON-lines trace says its own edges and models".into()));
        }
        json_lines(text, name)?
    } else if first.starts_with("TIMESTAMP") {
        let spec = Assign::parse(assign.unwrap_or(""), network)?;
        let mut t = azure(text, name, &spec)?;
        t.assign = Some(assign.unwrap_or("edges=sun,models=zipf:1").to_owned());
        t
    } else {
        return Err(TraceError::Line {
            path: name.into(),
            line: 1,
            why: "not a trace: expected JSON lines ({\"t\": …}) or the Azure CSV header TIMESTAMP,ContextTokens,GeneratedTokens".into(),
        });
    };
    trace.source = name.to_owned();
    for (i, r) in trace.requests.iter().enumerate() {
        let bad = |why: String| TraceError::Line { path: name.into(), line: i + 1, why };
        if network.location_id(&r.edge).is_none_or(|l| !network.location(l).edge) {
            return Err(bad(format!("edge \"{}\" is not an edge location of the config", r.edge)));
        }
        if !r.t.is_finite() || r.t < 0.0 {
            return Err(bad(format!("t = {} is not a time from the trace's start", r.t)));
        }
    }
    trace.requests.sort_by(|a, b| a.t.total_cmp(&b.t));
    Ok(trace)
}

fn json_lines(text: &str, name: &str) -> Result<Trace, TraceError> {
    let mut requests = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let r: TraceRequest = serde_json::from_str(line).map_err(|e| TraceError::Line {
            path: name.into(),
            line: i + 1,
            why: format!("not a request: {e}"),
        })?;
        requests.push(r);
    }
    Ok(Trace { requests, format: "jsonl", ..Trace::default() })
}

/// How Azure rows get an edge and a model.
#[derive(Clone, Debug)]
pub struct Assign {
    edges: EdgeWeights,
    /// (service name, weight).
    models: Vec<(String, f64)>,
    stretch: f64,
    start_hour: f64,
    seed: u64,
}

#[derive(Clone, Debug)]
enum EdgeWeights {
    Sun(Vec<(String, f64)>),
    Fixed(Vec<(String, f64)>),
}

fn weights(spec: &str, what: &str) -> Result<Vec<(String, f64)>, TraceError> {
    spec.split('+')
        .map(|part| {
            let (name, w) = part.rsplit_once(':').unwrap_or((part, "1"));
            let w: f64 = w.parse().map_err(|_| TraceError::Assign(format!("{what} weight \"{w}\" is not a number")))?;
            if !(w.is_finite() && w >= 0.0) {
                return Err(TraceError::Assign(format!("{what} weight {w} must be ≥ 0")));
            }
            Ok((name.to_owned(), w))
        })
        .collect()
}

impl Assign {
    /// Parse a spec (see the module's table) against the config's edges and services.
    pub fn parse(spec: &str, network: &Network) -> Result<Assign, TraceError> {
        let edges: Vec<&stoke_config::Location> = network.locations.iter().filter(|l| l.edge).collect();
        let sun = || EdgeWeights::Sun(edges.iter().map(|l| (l.id.clone(), l.coord.lon)).collect());
        let zipf = |s: f64| -> Vec<(String, f64)> {
            network
                .services
                .iter()
                .enumerate()
                .map(|(k, svc)| (svc.name.clone(), 1.0 / ((k + 1) as f64).powf(s)))
                .collect()
        };
        let mut a = Assign { edges: sun(), models: zipf(1.0), stretch: 1.0, start_hour: 0.0, seed: 1 };
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) =
                part.split_once('=').ok_or_else(|| TraceError::Assign(format!("\"{part}\" is not key=value")))?;
            let number = |v: &str| -> Result<f64, TraceError> {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| TraceError::Assign(format!("{key}: \"{v}\" is not a number")))
            };
            match key {
                "edges" => {
                    a.edges = match value {
                        "sun" => sun(),
                        "uniform" => EdgeWeights::Fixed(edges.iter().map(|l| (l.id.clone(), 1.0)).collect()),
                        list => {
                            let w = weights(list, "edge")?;
                            for (id, _) in &w {
                                if !edges.iter().any(|l| &l.id == id) {
                                    return Err(TraceError::Assign(format!("edge \"{id}\" is not in the config")));
                                }
                            }
                            EdgeWeights::Fixed(w)
                        }
                    }
                }
                "models" => {
                    a.models = match value.strip_prefix("zipf:") {
                        Some(s) => zipf(number(s)?),
                        None => {
                            let w = weights(value, "model")?;
                            for (m, _) in &w {
                                if network.service_id(m).is_none() {
                                    return Err(TraceError::Assign(format!("model \"{m}\" is served by no pool")));
                                }
                            }
                            w
                        }
                    }
                }
                "stretch" => {
                    a.stretch = number(value)?;
                    if a.stretch <= 0.0 {
                        return Err(TraceError::Assign("stretch must be > 0".into()));
                    }
                }
                "start" => a.start_hour = number(value)?.rem_euclid(24.0),
                "seed" => a.seed = number(value)? as u64,
                other => {
                    return Err(TraceError::Assign(format!(
                        "unknown key \"{other}\"; expected edges, models, stretch, start or seed"
                    )))
                }
            }
        }
        if a.models.iter().all(|(_, w)| *w == 0.0) {
            return Err(TraceError::Assign("every model weighs 0".into()));
        }
        Ok(a)
    }

    /// The UTC hour `t` seconds (after stretching) into the trace.
    fn utc_hour(&self, t: f64) -> f64 {
        (self.start_hour + t / 3600.0).rem_euclid(24.0)
    }
}

/// Draw an index with probability proportional to `w`; `None` if all are 0.
fn draw(rng: &mut fastrand::Rng, w: impl Iterator<Item = f64> + Clone) -> Option<usize> {
    let total: f64 = w.clone().sum();
    if total <= 0.0 {
        return None;
    }
    let mut x = rng.f64() * total;
    let mut last = None;
    for (i, wi) in w.enumerate() {
        if wi > 0.0 {
            last = Some(i);
            if x < wi {
                return Some(i);
            }
            x -= wi;
        }
    }
    last
}

fn azure(text: &str, name: &str, a: &Assign) -> Result<Trace, TraceError> {
    let mut rng = fastrand::Rng::with_seed(a.seed);
    let mut first: Option<f64> = None;
    let mut requests = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: &str| TraceError::Line { path: name.into(), line: i + 1, why: why.to_owned() };
        let mut cols = line.split(',');
        let (Some(ts), Some(ctx), Some(gen)) = (cols.next(), cols.next(), cols.next()) else {
            return Err(bad("expected TIMESTAMP,ContextTokens,GeneratedTokens"));
        };
        let secs = timestamp_secs(ts.trim()).ok_or_else(|| bad("TIMESTAMP is not \"YYYY-MM-DD HH:MM:SS.fffffff\""))?;
        let prompt_tokens: u32 = ctx.trim().parse().map_err(|_| bad("ContextTokens is not a count"))?;
        let output_tokens: u32 = gen.trim().parse().map_err(|_| bad("GeneratedTokens is not a count"))?;
        let t = (secs - *first.get_or_insert(secs)).max(0.0) * a.stretch;
        let edge = match &a.edges {
            EdgeWeights::Fixed(w) => draw(&mut rng, w.iter().map(|(_, x)| *x)).map(|k| w[k].0.clone()),
            EdgeWeights::Sun(lons) => {
                let utc = a.utc_hour(t);
                let w = lons.iter().map(move |(_, lon)| daylight(local_hour(utc, *lon)));
                draw(&mut rng, w).map(|k| lons[k].0.clone())
            }
        };
        // Nowhere is it day (only with odd fixed weights): the row is dropped.
        let Some(edge) = edge else { continue };
        let Some(m) = draw(&mut rng, a.models.iter().map(|(_, w)| *w)) else { continue };
        requests.push(TraceRequest {
            t,
            edge,
            model: a.models[m].0.clone(),
            prompt_tokens,
            output_tokens,
            session: None,
        });
    }
    Ok(Trace { requests, format: "azure-csv", ..Trace::default() })
}

/// Seconds since an arbitrary epoch of `2023-11-16 18:15:46.6805900`
/// (days are counted from the month's start; a trace spans days at most).
fn timestamp_secs(ts: &str) -> Option<f64> {
    let (date, time) = ts.split_once(' ')?;
    let mut d = date.split('-');
    let (y, mo, day): (i64, i64, i64) = (d.next()?.parse().ok()?, d.next()?.parse().ok()?, d.next()?.parse().ok()?);
    let mut t = time.split(':');
    let (h, mi, s): (f64, f64, f64) = (t.next()?.parse().ok()?, t.next()?.parse().ok()?, t.next()?.parse().ok()?);
    // Days from a civil date (Howard Hinnant's algorithm).
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe;
    Some(days as f64 * 86_400.0 + h * 3600.0 + mi * 60.0 + s)
}

/// Write requests as JSON lines (what `stoke demo --record` writes).
pub fn write_line(out: &mut impl std::io::Write, r: &TraceRequest) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, r)?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network() -> Network {
        let text = crate::testing::two_pools_text(1, "idle_timeout = \"5m\"\nwake_time = \"20s\"");
        stoke_config::load_str(&text, Path::new("t.toml")).expect("config")
    }

    #[test]
    fn json_lines_are_read_sorted_and_checked() {
        let n = network();
        let text = "{\"t\": 2.5, \"edge\": \"par\", \"model\": \"m\", \"prompt_tokens\": 10, \"output_tokens\": 5}\n\n\
                    {\"t\": 1, \"edge\": \"fra\", \"model\": \"m\", \"session\": \"s1\"}\n";
        let t = parse(text, "x.jsonl", None, &n).expect("trace");
        assert_eq!(t.requests.len(), 2);
        assert_eq!((t.requests[0].edge.as_str(), t.requests[0].session.as_deref()), ("fra", Some("s1")));
        assert_eq!(t.span(), 2.5);
        let e = parse("{\"t\": 1, \"edge\": \"mars\", \"model\": \"m\"}", "x.jsonl", None, &n).expect_err("edge");
        assert!(e.to_string().contains("x.jsonl:1: edge \"mars\""), "{e}");
        let e = parse("{\"t\": 1}\n", "x.jsonl", None, &n).expect_err("fields");
        assert!(e.to_string().starts_with("x.jsonl:1: not a request"), "{e}");
        assert!(parse("hello", "x", None, &n).is_err());
    }

    #[test]
    fn azure_rows_get_edges_models_and_stretched_times() {
        let n = network();
        let text = "TIMESTAMP,ContextTokens,GeneratedTokens\n\
                    2023-11-16 23:59:59.5000000,374,44\n\
                    2023-11-17 00:00:00.5000000,396,109\n";
        let t = parse(text, "a.csv", Some("edges=par:1,stretch=10"), &n).expect("trace");
        assert_eq!(t.requests.len(), 2);
        assert!((t.requests[1].t - 10.0).abs() < 1e-6, "one second across midnight, stretched: {}", t.requests[1].t);
        assert_eq!((t.requests[1].prompt_tokens, t.requests[1].output_tokens), (396, 109));
        assert!(t.requests.iter().all(|r| r.edge == "par" && r.model == "m"));
        for bad in ["edges=mars", "stretch=0", "models=nope:1", "colour=red", "seed"] {
            assert!(parse(text, "a.csv", Some(bad), &n).is_err(), "{bad}");
        }
    }

    #[test]
    fn sun_weights_follow_local_daylight() {
        let n = network();
        // 12:00 UTC: day in Frankfurt and Paris alike; both get rows.
        let mut text = String::from("TIMESTAMP,ContextTokens,GeneratedTokens\n");
        for i in 0..400 {
            text.push_str(&format!("2023-11-16 12:00:{:02}.0000000,10,10\n", i % 60));
        }
        let t = parse(&text, "a.csv", Some("edges=sun,start=12"), &n).expect("trace");
        let fra = t.requests.iter().filter(|r| r.edge == "fra").count();
        assert!((100..300).contains(&fra), "{fra}");
        // 02:00 UTC: night in both; no row can be placed.
        let t = parse(&text, "a.csv", Some("edges=sun,start=2"), &n).expect("trace");
        assert!(t.requests.is_empty());
    }
}
