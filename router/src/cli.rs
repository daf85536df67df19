//! The command line: `stoke serve | upgrade | check | push | demo | sim | simulate`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::edge::Edge;
use crate::logging::{self, LogFormat};
use crate::reload::ConfigSource;
use crate::signals::stop_signal;
use crate::sim::{Orchestrator, OrchestratorOptions, Replica, ReplicaOptions};

/// stoke: an edge load balancer and request router for AI inference.
///
/// Every edge location runs the same binary with the same config file; each
/// request goes to the pool that gives the fastest first byte from here,
/// waking pools that have scaled to zero when that is best.
#[derive(Debug, Parser)]
#[command(name = "stoke", version, propagate_version = true)]
pub struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one edge.
    Serve(ServeArgs),
    /// Replace the running edge with a new process of this binary without
    /// refusing a connection: the new one takes the listening sockets and
    /// serves, the old one drains and exits. Returns once the new process
    /// serves (exit 0), or when it failed to start (exit 1; the old one
    /// serves on). `systemctl reload` runs this.
    Upgrade(UpgradeArgs),
    /// Validate a config file: exit 0 with a summary, or 1 with every
    /// problem as FILE:LINE:COL: message.
    Check(CheckArgs),
    /// Roll a config file out to every edge of the cluster: check it,
    /// publish it as a new version, apply it on the canary edges first and,
    /// if their health holds for the bake time, on every edge; if it does
    /// not, the canaries go back and the rollout stops. Exit 0 once every
    /// edge runs it, 1 if it rolled back or stopped (with the reason).
    Push(PushArgs),
    /// Run a whole local world on loopback: ten edges, simulated GPU pools
    /// that sleep and wake, and a load that follows the sun.
    Demo(DemoArgs),
    /// Simulated GPU replicas and orchestrator, for trying configs without GPUs.
    #[command(subcommand)]
    Sim(SimCommand),
    /// Replay a trace through every edge's decisions on a virtual clock (no
    /// sockets), once per idle policy, and compare GPU-seconds, wakes,
    /// answers, holds and time to first token.
    Simulate(SimulateArgs),
}

#[derive(Debug, Args)]
struct SimulateArgs {
    /// The network's config file.
    #[arg(long, short, required_unless_present = "demo", conflicts_with = "demo")]
    config: Option<PathBuf>,
    /// Replay against the demo's network (as `stoke demo` runs it, with its
    /// replicas' rates) instead of a config file.
    #[arg(long)]
    demo: bool,
    /// The trace: JSON lines (as `stoke demo --record` writes) or the Azure
    /// LLM inference CSV (TIMESTAMP,ContextTokens,GeneratedTokens).
    #[arg(long, short)]
    trace: PathBuf,
    /// An idle policy: always-on, fixed:DURATION, config or auto
    /// (repeatable; default: always-on, fixed:5m, config, auto).
    #[arg(long = "policy", short)]
    policies: Vec<String>,
    /// How Azure CSV rows get an edge and a model, e.g.
    /// "edges=sun,models=zipf:1,stretch=24,start=0,seed=1".
    #[arg(long)]
    assign: Option<String>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Prompt tokens a replica prefills per second (0: prefill is instant).
    #[arg(long)]
    prefill_tokens_per_sec: Option<f64>,
    /// Tokens a replica generates per second, per request.
    #[arg(long)]
    decode_tokens_per_sec: Option<f64>,
    /// One pool's rates, POOL=PREFILL/DECODE tokens per second (repeatable).
    #[arg(long = "rate", value_parser = crate::simulate::parse_rate)]
    rates: Vec<(String, crate::simulate::Rates)>,
    /// Each replica's prefix cache in tokens (an LRU of 16-token blocks, as
    /// `stoke sim replica`'s): a session's turns find their conversation
    /// so far cached on the replica that served it last.
    #[arg(long, default_value_t = crate::sim::cache::DEFAULT_CACHE_TOKENS)]
    cache_tokens: usize,
    /// Seed of every random draw: the same seed replays the same way.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The network's config file.
    #[arg(long, short)]
    config: PathBuf,
    /// This edge's location id (overrides [edge].location).
    #[arg(long, short)]
    location: Option<String>,
    /// Take the listening sockets of the stoke running on the config's
    /// [edge].upgrade_socket, serve on them, then let it drain and exit
    /// (`stoke upgrade` runs this in the background and waits for it).
    #[arg(long)]
    upgrade: bool,
}

#[derive(Debug, Args)]
struct UpgradeArgs {
    /// The network's config file (the new process's; its
    /// [edge].upgrade_socket names the running process).
    #[arg(long, short)]
    config: PathBuf,
    /// This edge's location id (overrides [edge].location).
    #[arg(long, short)]
    location: Option<String>,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The config file to validate.
    #[arg(long, short)]
    config: PathBuf,
    /// Also check that this location id exists (as `serve --location` would).
    #[arg(long, short)]
    location: Option<String>,
}

#[derive(Debug, Args)]
struct PushArgs {
    /// The network's config file to roll out (its [cluster] says where the
    /// cluster is); with --status, only read for its [cluster].
    #[arg(long, short, required_unless_present = "nats")]
    config: Option<PathBuf>,
    /// Edges (location ids) that apply it first, comma separated; without
    /// any, every edge applies it at once.
    #[arg(long, value_delimiter = ',')]
    canary: Vec<String>,
    /// How long the canaries run it before their health is judged.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    bake: Duration,
    /// A note kept with the version (what changed, and why).
    #[arg(long, default_value = "")]
    note: String,
    /// NATS server(s) to reach the cluster through (default: the file's
    /// [cluster].nats).
    #[arg(long)]
    nats: Vec<String>,
    /// The cluster's name (default: the file's [cluster].name, else "stoke").
    #[arg(long)]
    name: Option<String>,
    /// Print where the rollout and every edge are, and exit.
    #[arg(long)]
    status: bool,
    /// Publish and exit, without following the rollout.
    #[arg(long)]
    no_wait: bool,
    /// Follow the rollout for at most this long (default: the bake time
    /// and two minutes).
    #[arg(long, value_parser = parse_duration)]
    wait: Option<Duration>,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Run for this long, then print a summary and exit (e.g. "2m"); without
    /// it, run until Ctrl-C.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Real time one simulated day takes.
    #[arg(long, value_parser = parse_duration, default_value = "4m")]
    day: Duration,
    /// Address of the status page.
    #[arg(long, default_value = "127.0.0.1:8080")]
    status: SocketAddr,
    /// Write every request the simulated users send to FILE (JSON lines),
    /// a trace that `stoke simulate --demo --trace FILE` replays.
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,
    /// Run every edge alone, without the local NATS server the demo
    /// otherwise starts (when `nats-server` is installed).
    #[arg(long)]
    no_cluster: bool,
    /// Give the pools that scale one depth of sleep (scale to zero) instead
    /// of a light sleep (vLLM's sleep mode) before it.
    #[arg(long)]
    one_depth: bool,
}

#[derive(Debug, Subcommand)]
enum SimCommand {
    /// A simulated GPU replica with an OpenAI-compatible API.
    Replica(ReplicaArgs),
    /// A simulated orchestrator: answers the wake and sleep hooks of the
    /// config's pools (POST /pools/{id}/wake|sleep) by starting and stopping
    /// simulated replicas at their addresses; GET /calls lists the calls.
    Orchestrator(OrchestratorArgs),
}

#[derive(Debug, Args)]
struct OrchestratorArgs {
    /// Address to listen on, IP:PORT (the hooks' URLs must point here).
    #[arg(long)]
    listen: SocketAddr,
    /// The network's config file: which pools exist and where their replicas listen.
    #[arg(long, short)]
    config: PathBuf,
    /// Boot time of every woken replica (default: each pool's wake_time).
    #[arg(long, value_parser = parse_duration)]
    boot_time: Option<Duration>,
    /// Tokens per second of the simulated replicas.
    #[arg(long, default_value_t = 200.0)]
    tokens_per_sec: f64,
    /// Do not start the replicas of always-on pools (those without [pool.scale]).
    #[arg(long)]
    only_scaled: bool,
}

#[derive(Debug, Args)]
struct ReplicaArgs {
    /// Address to listen on, IP:PORT.
    #[arg(long)]
    listen: SocketAddr,
    /// Name sent in the x-sim-replica response header.
    #[arg(long, default_value = "sim")]
    name: String,
    /// Time until /health answers 200, e.g. "20s".
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    boot_time: Duration,
    /// Requests generated at once; more wait in a queue.
    #[arg(long, default_value_t = 16)]
    max_concurrency: usize,
    /// Tokens per second per request.
    #[arg(long, default_value_t = 200.0)]
    tokens_per_sec: f64,
    /// Model names listed by /v1/models (repeatable); any name is served.
    #[arg(long = "model", default_value = "llama-3.1-8b")]
    models: Vec<String>,
    /// Prompt tokens prefilled per second, counting only those not in the
    /// prefix cache (4 bytes of prompt text a token); 0: prefill is instant.
    #[arg(long, default_value_t = 0.0)]
    prefill_tokens_per_sec: f64,
    /// Capacity of the prefix cache in tokens (an LRU of 16-token blocks).
    #[arg(long, default_value_t = crate::sim::cache::DEFAULT_CACHE_TOKENS)]
    cache_tokens: usize,
    /// Time POST /wake_up takes to bring the weights back after POST
    /// /sleep (vLLM's sleep mode), e.g. "500ms".
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    light_wake_time: Duration,
    /// Time reload_weights (POST /collective_rpc) takes after a level 2
    /// sleep, e.g. "2s".
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    reload_time: Duration,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    stoke_config::duration::parse_duration(s)
        .ok_or_else(|| format!("\"{s}\" is not {}", stoke_config::duration::DURATION_HELP))
}

/// Parse the command line and run.
pub fn main() -> ExitCode {
    // Before anything else: no signal may find its default action later.
    crate::signals::install();
    let cli = Cli::parse();
    // The demo runs ten edges in one process: their routine logs would
    // drown its own output, so it shows warnings only unless RUST_LOG says more.
    // Replicas of pools put to sleep go down at every edge, many times a
    // demo day: that is the demo working, not news for its terminal.
    let default_filter = match cli.command {
        Command::Demo(_) => "warn,stoke_router::control::probe=error",
        Command::Simulate(_) => "warn",
        // The push prints its own progress; the NATS client's connection
        // events are not news for its terminal.
        Command::Push(_) => "info,async_nats=warn",
        _ => "info",
    };
    logging::init(cli.log_format, default_filter);
    let code = match cli.command {
        Command::Check(args) => check(&args),
        Command::Push(args) => push(args),
        Command::Serve(args) => serve(&args),
        Command::Upgrade(args) => upgrade(&args, cli.log_format),
        Command::Demo(args) => demo(args),
        Command::Sim(SimCommand::Replica(args)) => sim_replica(args),
        Command::Sim(SimCommand::Orchestrator(args)) => sim_orchestrator(args),
        Command::Simulate(args) => simulate(args),
    };
    logging::flush();
    code
}

fn simulate(args: SimulateArgs) -> ExitCode {
    use crate::simulate::{self, Rates};
    let fail = |what: &dyn std::fmt::Display| {
        for line in what.to_string().lines() {
            eprintln!("stoke simulate: {line}");
        }
        ExitCode::from(1)
    };
    let (text, path, mut defaults) = match &args.config {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) => (t, path.clone(), Rates::default()),
            Err(e) => return fail(&format!("{}: {e}", path.display())),
        },
        None => (crate::demo::world::replay_config(), PathBuf::from("demo.toml"), crate::demo::world::replica_rates()),
    };
    if let Some(p) = args.prefill_tokens_per_sec {
        defaults.prefill_tps = p;
    }
    if let Some(d) = args.decode_tokens_per_sec {
        defaults.decode_tps = d;
    }
    let network = match stoke_config::load_str(&text, &path) {
        Ok(n) => n,
        Err(e) => {
            for line in e.lines() {
                eprintln!("{line}");
            }
            return ExitCode::from(1);
        }
    };
    let policies: Vec<String> = if args.policies.is_empty() {
        simulate::DEFAULT_POLICIES.iter().map(|p| p.to_string()).collect()
    } else {
        args.policies
    };
    // Say what is wrong with the command line before reading a long trace.
    if let Some(e) = policies.iter().find_map(|p| simulate::Policy::parse(p).err()) {
        return fail(&format!("--policy: {e}"));
    }
    let trace = match simulate::trace::read(&args.trace, args.assign.as_deref(), &network) {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    let opts = simulate::Options {
        config: &text,
        config_path: &path,
        policies,
        replicas: simulate::ReplicaModel {
            rates: args.rates.into_iter().collect(),
            default_rates: defaults,
            cache_tokens: args.cache_tokens,
        },
        seed: args.seed,
        progress: !args.json,
        until: None,
    };
    match simulate::run(&opts, &trace) {
        Ok(mut report) => {
            if args.json {
                println!("{}", report.json());
            } else {
                println!(
                    "stoke simulate: {} requests over {:.0} s from {} ({})",
                    trace.requests.len(),
                    trace.span(),
                    trace.source,
                    trace.assign.as_deref().unwrap_or(trace.format)
                );
                print!("{}", report.table());
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn check(args: &CheckArgs) -> ExitCode {
    let loaded = stoke_config::load(&args.config).and_then(|n| match &args.location {
        Some(loc) => n.for_edge(Some(loc)).map(|s| s.network),
        None => Ok(n),
    });
    match loaded {
        Ok(network) => {
            println!("{}: ok: {}", args.config.display(), network.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            for line in e.lines() {
                eprintln!("{line}");
            }
            ExitCode::from(1)
        }
    }
}

fn push(args: PushArgs) -> ExitCode {
    let fail = |lines: &[String]| {
        for line in lines {
            eprintln!("stoke push: {line}");
        }
        ExitCode::from(1)
    };
    let prepared = match (&args.config, args.status) {
        (Some(path), false) => match crate::push::prepare(path, args.canary.clone(), args.bake, args.note.clone()) {
            Ok((push, cluster)) => (Some(push), cluster),
            Err(errors) => return fail(&errors),
        },
        (Some(path), true) => match stoke_config::load(path) {
            Ok(network) => (None, network.cluster),
            Err(e) => return fail(&e.lines()),
        },
        (None, _) => (None, None),
    };
    let (push, cluster) = prepared;
    let target = match crate::push::Target::new(cluster.as_ref(), &args.nats, args.name.as_deref()) {
        Ok(t) => t,
        Err(e) => return fail(&[e]),
    };
    if !args.status && push.is_none() {
        return fail(&["--config FILE is needed to push (or give --status)".into()]);
    }
    let wait = (!args.no_wait).then(|| args.wait.unwrap_or(args.bake + Duration::from_secs(120)));
    run_on_runtime(1, "push", async move {
        let done = match push {
            Some(p) => crate::push::push(&target, p, wait).await,
            None => crate::push::status(&target).await,
        };
        match done {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&[e]),
        }
    })
}

fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        b.worker_threads(threads);
    }
    // Tasks past a worker's local run queue (256 of them: an edge under load
    // has thousands of streams ready) wait in the shared queue, which tokio
    // looks at only every few dozen polls; those tasks then wait far longer
    // than the rest. Looking at it on every poll keeps the order fair: with
    // 640 HTTP/2 streams in flight on one worker, p99 17 ms instead of 100
    // (benches/README.md, "HTTP/2 tail").
    b.global_queue_interval(1);
    b.enable_all().thread_name("stoke").build()
}

/// Run `main` on a runtime of `threads` workers (0: one per core); `what`
/// names the command in the error if the runtime cannot start.
fn run_on_runtime<F>(threads: usize, what: &str, main: F) -> ExitCode
where
    F: std::future::Future<Output = ExitCode>,
{
    match runtime(threads) {
        Ok(rt) => rt.block_on(main),
        Err(e) => {
            eprintln!("stoke {what}: cannot start the runtime: {e}");
            ExitCode::from(1)
        }
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    tracing::info!(config = %args.config.display(), location = args.location.as_deref(), "starting edge");
    // Validate before starting anything, and size the runtime from the file.
    let snapshot = match stoke_config::load_snapshot(&args.config, args.location.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            for line in e.lines() {
                eprintln!("{line}");
            }
            return ExitCode::from(1);
        }
    };
    // An upgrade takes the running process's sockets before anything else.
    let inherited = if args.upgrade {
        let taken = match &snapshot.network.edge.upgrade_socket {
            Some(path) => crate::upgrade::Inherited::receive(path),
            None => Err(crate::upgrade::UpgradeError::NotConfigured),
        };
        match taken {
            Ok(i) => Some(i),
            Err(e) => {
                eprintln!("stoke: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        None
    };
    let rt = match runtime(snapshot.network.edge.threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stoke: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    drop(snapshot);
    let source = ConfigSource { path: args.config.clone(), location: args.location.clone() };
    rt.block_on(async move {
        // Signals have been caught since the process began: a SIGTERM while
        // the edge starts stops it as soon as it serves, a SIGHUP reloads.
        let stop = stop_signal();
        let hup = crate::signals::hangups();
        let edge = match Edge::start_upgrade(source, inherited).await {
            Ok(e) => e,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("stoke: {e}");
                return ExitCode::from(1);
            }
        };
        crate::upgrade::notify_systemd(&format!("MAINPID={}\nREADY=1", std::process::id()));
        let (stop_hup, hup_rx) = tokio::sync::watch::channel(false);
        let hup = edge.reloader().map(|r| tokio::spawn(crate::reload::watch::on_sighup(r.clone(), hup, hup_rx)));
        tokio::select! {
            _ = stop => tracing::info!("stopping: draining in-flight requests and open streams"),
            _ = edge.taken_over() => tracing::info!("upgraded: draining in-flight requests and open streams"),
        }
        let _ = stop_hup.send(true);
        if let Some(h) = hup {
            h.abort();
        }
        tokio::select! {
            _ = edge.shutdown() => tracing::info!("stopped"),
            _ = crate::signals::second_stop_signal() => tracing::warn!("stopped at a second signal, not drained"),
        }
        ExitCode::SUCCESS
    })
}

/// `stoke upgrade`: start `stoke serve --upgrade` in the background and wait
/// until it has taken over (the upgrade socket is then its own) or ended.
fn upgrade(args: &UpgradeArgs, log_format: LogFormat) -> ExitCode {
    let snapshot = match stoke_config::load_snapshot(&args.config, args.location.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            for line in e.lines() {
                eprintln!("{line}");
            }
            eprintln!("stoke upgrade: the running process serves on");
            return ExitCode::from(1);
        }
    };
    let Some(path) = snapshot.network.edge.upgrade_socket.clone() else {
        eprintln!("stoke upgrade: {}", crate::upgrade::UpgradeError::NotConfigured);
        return ExitCode::from(1);
    };
    match crate::upgrade::run_upgrade(&path, &args.config, args.location.as_deref(), log_format) {
        Ok(taken) => {
            println!("stoke upgrade: {}", taken.said);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("stoke upgrade: {e}; the running process serves on");
            ExitCode::from(1)
        }
    }
}

fn sim_replica(args: ReplicaArgs) -> ExitCode {
    run_on_runtime(0, "sim replica", async move {
        let stop = stop_signal();
        let opts = ReplicaOptions {
            listen: args.listen,
            name: args.name,
            boot_time: args.boot_time,
            max_concurrency: args.max_concurrency,
            tokens_per_sec: args.tokens_per_sec,
            models: args.models,
            prefill_tokens_per_sec: args.prefill_tokens_per_sec,
            cache_tokens: args.cache_tokens,
            light_wake_time: args.light_wake_time,
            reload_time: args.reload_time,
        };
        let replica = match Replica::start(opts).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("stoke sim replica: cannot listen on {}: {e}", args.listen);
                return ExitCode::from(1);
            }
        };
        tracing::info!(addr = %replica.addr, "simulated replica listening");
        stop.await;
        replica.kill().await;
        ExitCode::SUCCESS
    })
}

fn sim_orchestrator(args: OrchestratorArgs) -> ExitCode {
    let network = match stoke_config::load(&args.config) {
        Ok(n) => n,
        Err(e) => {
            for line in e.lines() {
                eprintln!("{line}");
            }
            return ExitCode::from(1);
        }
    };
    run_on_runtime(0, "sim orchestrator", async move {
        let stop = stop_signal();
        let opts = OrchestratorOptions {
            listen: args.listen,
            boot_time: args.boot_time,
            tokens_per_sec: args.tokens_per_sec,
            start_always_on: !args.only_scaled,
            ..OrchestratorOptions::default()
        };
        let orch = match Orchestrator::start(network, opts).await {
            Ok(o) => o,
            Err(e) => {
                eprintln!("stoke sim orchestrator: cannot start: {e}");
                return ExitCode::from(1);
            }
        };
        tracing::info!(addr = %orch.addr, "simulated orchestrator listening");
        stop.await;
        orch.shutdown().await;
        ExitCode::SUCCESS
    })
}

fn demo(args: DemoArgs) -> ExitCode {
    let rt = match runtime(0) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stoke demo: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // The demo's own log is its summary and status page; edges log warnings only.
    let opts = crate::demo::DemoOptions {
        day: args.day,
        status: args.status,
        record: args.record,
        cluster: !args.no_cluster,
        light: !args.one_depth,
        ..Default::default()
    };
    let result = rt.block_on(async move {
        match crate::demo::run(opts.clone(), args.duration).await {
            // The status port is taken: any free one will do.
            Err(crate::demo::DemoError::Io(e)) if e.kind() == std::io::ErrorKind::AddrInUse => {
                let opts = crate::demo::DemoOptions { status: SocketAddr::from(([127, 0, 0, 1], 0)), ..opts };
                crate::demo::run(opts, args.duration).await
            }
            other => other,
        }
    });
    // Give runtime tasks (connections, probes) a bounded time to end.
    rt.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stoke demo: {e}");
            ExitCode::from(1)
        }
    }
}
