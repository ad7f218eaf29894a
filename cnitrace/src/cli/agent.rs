//! `cnitrace agent`: probes attached once, the REST API, Prometheus metrics and the page.

use std::sync::Arc;

use cnitrace::{
    agent::{Agent, DEFAULT_MAX_OVERHEAD_PCT, DEFAULT_SAMPLE_COST_NS, Limits},
    doctor,
    probe::{
        AttachMode, Backend, BackendKind, KernelProbes,
        sampling::{DEFAULT_CONTINUOUS_HZ, validate_frequency},
    },
    server::{AppState, Auth, ServeLimits, router, serve, tls_acceptor},
};

use super::interrupted;

#[derive(clap::Args)]
pub struct AgentArgs {
    /// Address to listen on. The default serves this host only; pass 0.0.0.0:9560 (with
    /// --token-file) to serve the cluster.
    #[arg(long, default_value = "127.0.0.1:9560")]
    pub listen: std::net::SocketAddr,
    /// File holding the operator's bearer token (at least 16 bytes): every request except
    /// /healthz and / must carry it or the read-only one. Read again when the file changes.
    #[arg(long)]
    pub token_file: Option<std::path::PathBuf>,
    /// File holding a read-only token (GET only: /metrics, breakdowns, results; no
    /// sessions), for scrapers. Read again when the file changes.
    #[arg(long, requires = "token_file")]
    pub read_only_token_file: Option<std::path::PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM; with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Serve a non-loopback address without a token: anyone who can reach it can read this
    /// node's data and open sessions. Refused unless given.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// Seconds a client has to send a request's headers; idle keep-alive connections are
    /// closed after the same time.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub header_timeout: u64,
    /// Also keep the reserved connection slots (the last 8) for this client address, as for
    /// loopback and the node's own: where the kubelet probes from a bridge or gateway address
    /// rather than the node's (repeatable).
    #[arg(long = "reserve-for", value_name = "IP")]
    pub reserve_for: Vec<std::net::IpAddr>,
    /// Connections open at once (a client address gets at most an eighth of them).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(8..=65536))]
    pub max_connections: u64,
    #[command(flatten)]
    pub probes: super::ProbeArgs,
    /// Sampling rate per CPU while only scrapes and rolling windows read (sessions run at
    /// --frequency); 0 samples only during sessions. With no reader at all the sampler is
    /// detached.
    #[arg(long, default_value_t = DEFAULT_CONTINUOUS_HZ, value_parser = continuous_rate)]
    pub continuous_frequency: u64,
    /// The most of the node's CPU time the agent may take, percent: the sampler's estimated
    /// cost (rate x --sample-cost-us) plus the agent's own CPU. Rates are lowered to fit,
    /// and every Breakdown says so.
    #[arg(long, default_value_t = DEFAULT_MAX_OVERHEAD_PCT, value_parser = percent)]
    pub max_overhead: f64,
    /// What one sample costs the CPU it interrupts, in microseconds (the program and the timer
    /// interrupt; `cargo xtask bench --target-gbps` measures it). Raised to the sampler's
    /// run time when BPF statistics measure more.
    #[arg(long, default_value_t = DEFAULT_SAMPLE_COST_NS / 1e3, value_parser = sample_cost)]
    pub sample_cost_us: f64,
    /// auto is sampling; tracing puts a probe pair on every call of each component's entry
    /// points (fixed for the agent's life).
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,
    /// Tracing: fentry/fexit where possible else kprobes (auto), or force one.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub attach: AttachMode,
    /// Most sessions running at once.
    #[arg(long, default_value_t = 8)]
    pub max_sessions: usize,
    /// Longest session, in seconds: longer durations are refused, and a session opened
    /// without one is stopped after this long.
    #[arg(long, default_value_t = 3600.0)]
    pub max_duration: f64,
}

fn percent(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 100.0 => Ok(p),
        _ => Err(format!("`{text}` is not a percentage in (0, 100]")),
    }
}

fn sample_cost(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(us) if us > 0.0 && us <= 10_000.0 => Ok(us),
        _ => Err(format!("`{text}` is not a cost in (0, 10000] microseconds")),
    }
}

fn continuous_rate(text: &str) -> Result<u64, String> {
    let hz: u64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a whole number of Hz"))?;
    if hz != 0 {
        validate_frequency(hz).map_err(|e| e.to_string())?;
    }
    Ok(hz)
}

/// Gives memory freed by the last second's windows back to the system: their symbolized
/// stacks are large and short-lived, and glibc would otherwise keep the pages.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    if !(args.max_duration.is_finite() && args.max_duration > 0.0) {
        anyhow::bail!(
            "--max-duration {} must be a positive number of seconds",
            args.max_duration
        );
    }
    if args.max_sessions == 0 {
        anyhow::bail!("--max-sessions must be at least 1");
    }
    let auth = args
        .token_file
        .as_deref()
        .map(|operator| Auth::from_files(operator, args.read_only_token_file.as_deref()))
        .transpose()?;
    if auth.is_none() && !args.listen.ip().is_loopback() {
        if !args.insecure_no_auth {
            anyhow::bail!(
                "refusing to serve {} without a token: pass --token-file FILE (or \
                 --insecure-no-auth to let anyone who can reach it read this node's data and \
                 open sessions)",
                args.listen
            );
        }
        tracing::warn!(
            "INSECURE: serving {} without a token (--insecure-no-auth): anyone who can reach it \
             can read this node's data and open sessions",
            args.listen
        );
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    // Before loading anything: a limit too small for this node is said now, not found by
    // the OOM killer later.
    cnitrace::probe::memory::check_limit()?;
    let probes = KernelProbes::start(
        Backend::requested(args.backend, args.attach)?,
        &args.probes.config(),
    )?;
    let limits = Limits {
        max_sessions: args.max_sessions,
        max_duration_s: args.max_duration,
        session_hz: args.probes.frequency,
        continuous_hz: args.continuous_frequency,
        max_overhead_pct: args.max_overhead,
        sample_cost_ns: args.sample_cost_us * 1e3,
        ..Limits::default()
    };
    let loopback_only = auth.is_none() && args.listen.ip().is_loopback();
    let agent = Agent::new(Box::new(probes), limits);
    // Attached at start to prove it can be; detached until someone reads (before the slow
    // doctor report, so an agent nobody reads samples for no longer than it takes to attach).
    agent.apply_rate();
    let state = Arc::new(AppState::new(agent, doctor::report(), auth, loopback_only));
    // Once a second: a snapshot for rolling windows, map maintenance, and stop sessions whose
    // time is up.
    let ticker = {
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                interval.tick().await;
                let state = Arc::clone(&state);
                // Expiry first and apart: each due session is stopped on its own worker, so a
                // slow ruleset read in one stop delays neither the others nor the upkeep.
                for id in state.agent.due_sessions() {
                    let state = Arc::clone(&state);
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = state.agent.stop_session(id) {
                            tracing::debug!("session {id}: {e}");
                        }
                    });
                }
                let state = Arc::clone(&state);
                let _ = tokio::task::spawn_blocking(move || {
                    if let Err(e) = state.agent.tick() {
                        tracing::warn!("snapshot failed: {e}");
                    }
                    state.metrics.forget_if_unscraped(&state.agent);
                    state.agent.keep_budget();
                    if let Err(e) = state.agent.maintain(state.metrics.baseline_taken()) {
                        tracing::warn!("map maintenance failed: {e}");
                    }
                    release_freed_memory();
                    state.upkeep_done();
                })
                .await;
            }
        })
    };
    eprintln!(
        "cnitrace agent: listening on {}://{} (SIGTERM or Ctrl-C stops it)",
        if tls.is_some() { "https" } else { "http" },
        args.listen
    );
    let max_connections = usize::try_from(args.max_connections)?;
    let limits = ServeLimits {
        header_read_timeout: std::time::Duration::from_secs(args.header_timeout),
        max_connections,
        max_connections_per_client: (max_connections / 8).max(1),
        // Loopback, and the addresses the kubelet probes from where that is not the node's
        // own (which is always reserved): leaked once, they live as long as the agent.
        reserved_clients: Vec::leak(
            [
                std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
                std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            ]
            .into_iter()
            .chain(args.reserve_for.iter().copied())
            .collect(),
        ),
        ..ServeLimits::default()
    };
    serve(
        listener,
        router(Arc::clone(&state)),
        limits,
        tls,
        interrupted(),
    )
    .await?;
    ticker.abort();
    let _ = ticker.await;
    // The last reference to the sampler goes here: its programs are detached and unloaded.
    drop(state);
    eprintln!("cnitrace agent: stopped, probes detached");
    Ok(())
}
