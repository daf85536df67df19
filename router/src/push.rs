//! `stoke push`: check a config file, publish it to the cluster as a new
//! version and follow its rollout (canaries, bake, the rest, or the
//! rollback) until it settles; `stoke push --status` prints where the
//! rollout and every edge are.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use stoke_config::ClusterSettings;

use crate::control::cluster::rollout::{self, Phase, Push, Report, Rollout};

/// How to reach the cluster and what to push.
#[derive(Debug, Clone)]
pub struct Target {
    /// NATS servers (from `--nats`, else the file's `[cluster].nats`).
    pub nats: Vec<String>,
    /// The cluster's name.
    pub name: String,
    /// Its JetStream domain, if any.
    pub domain: Option<String>,
}

impl Target {
    /// The cluster of `settings`, with `nats` and `name` overriding it.
    pub fn new(settings: Option<&ClusterSettings>, nats: &[String], name: Option<&str>) -> Result<Target, String> {
        let nats = if nats.is_empty() { settings.map(|s| s.nats.clone()).unwrap_or_default() } else { nats.to_vec() };
        if nats.is_empty() {
            return Err("no cluster to push to: the file has no [cluster] and no --nats was given".into());
        }
        Ok(Target {
            nats,
            name: name
                .map(str::to_owned)
                .or_else(|| settings.map(|s| s.name.clone()))
                .unwrap_or_else(|| "stoke".into()),
            domain: settings.and_then(|s| s.domain.clone()),
        })
    }

    async fn store(&self) -> Result<jetstream::kv::Store, String> {
        let options = async_nats::ConnectOptions::new().name("stoke push").connection_timeout(Duration::from_secs(5));
        let client = options
            .connect(self.nats.clone())
            .await
            .map_err(|e| format!("cannot reach NATS at {}: {e}", self.nats.join(", ")))?;
        let js = match &self.domain {
            Some(d) => jetstream::with_domain(client, d),
            None => jetstream::new(client),
        };
        rollout::open_bucket(&js, &self.name).await
    }
}

/// Check `path` as `stoke check` does and make the push of it: its text,
/// hash, and the canaries checked against its locations.
pub fn prepare(
    path: &Path,
    canary: Vec<String>,
    bake: Duration,
    note: String,
) -> Result<(Push, Option<ClusterSettings>), Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
    let network = stoke_config::load_str(&text, path).map_err(|e| e.lines())?;
    let unknown: Vec<&String> = canary.iter().filter(|c| network.location_id(c).is_none()).collect();
    if !unknown.is_empty() {
        return Err(vec![format!(
            "--canary names {} that the file has no [[location]] for",
            unknown.iter().map(|c| format!("\"{c}\"")).collect::<Vec<_>>().join(", ")
        )]);
    }
    let author = format!(
        "{}@{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into()),
        std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "unknown".into())
    );
    let push = Push { text, hash: network.source.hash.clone(), canary, bake, note, author };
    Ok((push, network.cluster.clone()))
}

/// Publish `push` and, unless `wait` is `None`, follow its rollout for at
/// most that long, printing each step. `Ok` once every edge runs it.
pub async fn push(target: &Target, push: Push, wait: Option<Duration>) -> Result<(), String> {
    let store = target.store().await?;
    let bake = push.bake;
    let r = rollout::publish(&store, push).await?;
    println!(
        "version {} published to cluster \"{}\" ({}; previous: {})",
        r.version,
        target.name,
        if r.canary.is_empty() {
            "to every edge at once".to_owned()
        } else {
            format!("canary {} for {}", r.canary.join(", "), stoke_config::duration::format_duration(bake))
        },
        r.previous.map_or("each edge's local file".to_owned(), |p| format!("version {p}"))
    );
    let Some(wait) = wait else { return Ok(()) };
    follow(&store, r, wait).await
}

/// Print the rollout and every edge.
pub async fn status(target: &Target) -> Result<(), String> {
    let store = target.store().await?;
    let Some((r, _)) = rollout::read_rollout(&store).await? else {
        println!("cluster \"{}\": nothing pushed yet; every edge runs its local file", target.name);
        return Ok(());
    };
    println!("{}", describe(&r));
    let now = unix_ms();
    for (edge, rep) in rollout::read_reports(&store).await? {
        println!("  {}", edge_line(&edge, &rep, now));
    }
    Ok(())
}

fn describe(r: &Rollout) -> String {
    let mut s = format!(
        "version {} ({}): {}{}",
        r.version,
        r.hash,
        r.phase.as_str(),
        match r.phase {
            Phase::Canary => format!(" on {}, baking {} ms", r.canary.join(", "), r.bake_ms),
            _ => String::new(),
        }
    );
    if let Some(why) = &r.reason {
        s.push_str(&format!(": {why}"));
    }
    if !r.note.is_empty() {
        s.push_str(&format!(" — \"{}\"", r.note));
    }
    s
}

fn edge_line(edge: &str, rep: &Report, now_ms: u64) -> String {
    let mut s = format!("{edge}: {}", rep.version.map_or("its local file".to_owned(), |v| format!("version {v}")),);
    if !rollout::is_fresh(rep, now_ms) {
        s.push_str(&format!(" (not heard from for {} s)", now_ms.saturating_sub(rep.at_ms) / 1000));
    }
    if let Some((v, until)) = rep.baking {
        s.push_str(&format!(", baking version {v} for {} ms more", until.saturating_sub(now_ms)));
    }
    if let Some(v) = &rep.verdict {
        s.push_str(&format!(
            ", gate on version {}: {} ({})",
            v.version,
            if v.pass { "passed" } else { "failed" },
            v.reasons.join("; ")
        ));
    }
    if let Some((v, errors)) = &rep.failed {
        s.push_str(&format!(", cannot apply version {v}: {}", errors.join("; ")));
    }
    s
}

/// Follow the rollout of `r` until it settles or `wait` passes.
async fn follow(store: &jetstream::kv::Store, r: Rollout, wait: Duration) -> Result<(), String> {
    let started = Instant::now();
    // A canary that does not take the version within this is taken as lost.
    let canary_deadline = Duration::from_millis(r.bake_ms) + Duration::from_secs(30);
    let mut printed: BTreeMap<String, String> = BTreeMap::new();
    let mut last_phase = r.phase;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (rollout, reports) = match (rollout::read_rollout(store).await, rollout::read_reports(store).await) {
            (Ok(Some((r, _))), Ok(reps)) => (r, reps),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("stoke push: {e}; retrying");
                continue;
            }
            (Ok(None), _) => return Err("the rollout record is gone".into()),
        };
        if rollout.version != r.version {
            return Err(format!("version {} was pushed meanwhile; this rollout is over", rollout.version));
        }
        let now = unix_ms();
        for (edge, rep) in &reports {
            let line = edge_line(edge, rep, now);
            // The baking countdown changes every poll: print on other changes.
            let key = line.split(", baking").next().unwrap_or(&line).to_owned()
                + &rep.baking.map(|(v, _)| format!("baking {v}")).unwrap_or_default();
            if printed.get(edge) != Some(&key) {
                println!("  {line}");
                printed.insert(edge.clone(), key);
            }
        }
        if rollout.phase != last_phase {
            println!("{}", describe(&rollout));
            last_phase = rollout.phase;
        }
        let present: Vec<&Report> = reports.values().filter(|rep| rollout::is_fresh(rep, now)).collect();
        match rollout.phase {
            Phase::RolledBack | Phase::Stopped => {
                return Err(format!(
                    "version {} {}: {}",
                    rollout.version,
                    if rollout.phase == Phase::RolledBack { "rolled back" } else { "stopped" },
                    rollout.reason.unwrap_or_default()
                ));
            }
            Phase::All => {
                if !present.is_empty() && present.iter().all(|rep| rep.version == Some(rollout.version)) {
                    println!("version {} runs on every edge ({})", rollout.version, present.len());
                    return Ok(());
                }
            }
            Phase::Canary => {
                let missing: Vec<&String> = rollout
                    .canary
                    .iter()
                    .filter(|c| {
                        reports.get(*c).is_none_or(|rep| {
                            rep.version != Some(rollout.version) && rep.baking.is_none() && rep.verdict.is_none()
                        })
                    })
                    .collect();
                if !missing.is_empty() && started.elapsed() > canary_deadline {
                    let why = format!(
                        "canary {} did not apply version {} within {} s",
                        missing.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", "),
                        rollout.version,
                        canary_deadline.as_secs()
                    );
                    rollout::advance(store, rollout.version, &[Phase::Canary], Phase::Stopped, Some(why.clone()))
                        .await?;
                    return Err(format!("version {} stopped: {why}", rollout.version));
                }
            }
        }
        if started.elapsed() > wait {
            return Err(format!(
                "version {} is still {} after {} s; follow it with stoke push --status",
                rollout.version,
                rollout.phase.as_str(),
                wait.as_secs()
            ));
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
