//! The cnitrace command line: `profile`, `doctor` (and, as they land, `agent`, `lab`, `bench`).

use std::{io::IsTerminal as _, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use cnitrace::{
    breakdown::PacketUnit,
    doctor,
    lab::topology::{Model, Scenario},
    probe::sampling::{ClockChoice, DEFAULT_FREQUENCY_HZ, SamplerConfig},
    profile::{self, Backend, Ending, ProfileOptions},
    render,
};

#[derive(Parser)]
#[command(
    name = "cnitrace",
    version,
    about = "CPU cycles per packet for each kernel component of the container datapath"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Profile one window and print the cycles-per-packet breakdown.
    Profile(ProfileArgs),
    /// Profile one window and report netfilter per hook: cost, chains, rules walked per packet
    /// and cycles per rule (adds a temporary nftables table counting hook entries).
    Netfilter(NetfilterArgs),
    /// Run the agent: probes attached once, the REST API, Prometheus metrics and a live page.
    Agent(AgentArgs),
    /// One window across several agents (e.g. sender and receiver), optionally around a
    /// benchmark command run here: per-node columns and their sum.
    Collect(CollectArgs),
    /// Apply cnitrace's taxonomy to a perf recording: reads `perf script -F
    /// comm,pid,tid,cpu,period,event,ip,sym,dso` output (from `perf record -a -g -e cpu-clock`).
    ImportPerf(ImportPerfArgs),
    /// Datapath lab helpers.
    #[command(subcommand)]
    Lab(LabCommand),
    /// Report what this node supports: backends, hooks, PMU, BTF, components, CNI.
    Doctor {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
}

#[derive(clap::Args)]
struct AgentArgs {
    /// Address to listen on. The default serves this host only; pass 0.0.0.0:9560 (with
    /// --token-file) to serve the cluster.
    #[arg(long, default_value = "127.0.0.1:9560")]
    listen: std::net::SocketAddr,
    /// File holding the bearer token every request (except /healthz and /) must carry.
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
    /// Sampling frequency per CPU, in Hz.
    #[arg(long, default_value_t = DEFAULT_FREQUENCY_HZ)]
    frequency: u64,
    /// auto: tracing where the kernel has kprobes, else sampling (fixed for the agent's life).
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,
    #[arg(long, value_enum, default_value_t = AttachArg::Auto)]
    attach: AttachArg,
    /// Most sessions running at once.
    #[arg(long, default_value_t = 8)]
    max_sessions: usize,
    /// Longest session duration accepted, in seconds.
    #[arg(long, default_value_t = 3600.0)]
    max_duration: f64,
}

#[derive(clap::Args)]
struct CollectArgs {
    /// Agents: http://HOST:PORT, or dns+http://NAME:PORT for every address NAME resolves to
    /// (a headless Service: one agent per node).
    #[arg(required = true)]
    urls: Vec<String>,
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
    /// Window length when no command is given (Ctrl-C ends it early).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// The benchmark to run while the window is open, after `--`.
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(clap::Args)]
struct ImportPerfArgs {
    /// The `perf script` output; `-` reads standard input.
    input: std::path::PathBuf,
    /// Length of the recording in seconds.
    #[arg(long)]
    duration: f64,
    /// The `-F` frequency of the recording.
    #[arg(long, default_value_t = DEFAULT_FREQUENCY_HZ)]
    frequency: u64,
    /// Packets in the recording (the paper's N_packet), for CPP.
    #[arg(long, default_value_t = 0)]
    packets: u64,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Attach the project's tc program doing LOOPS iterations of work per packet to IFACE and
    /// keep it attached until interrupted (Ctrl-C / SIGTERM detach it).
    TcWork {
        #[arg(long)]
        iface: String,
        /// Named network namespace (`ip netns`) of the interface.
        #[arg(long)]
        netns: Option<String>,
        #[arg(long, value_enum, default_value_t = DirectionArg::Ingress)]
        direction: DirectionArg,
        #[arg(long, default_value_t = 1000)]
        loops: u32,
    },
    /// Build a CNI datapath model from network namespaces (two hosts, three pods).
    Up {
        #[arg(value_enum)]
        model: Model,
    },
    /// Remove everything any lab made (namespaces named cnl-*), also after a crash.
    Down,
    /// Benchmark models: iperf3 stream profiled by cnitrace, request/response latency, repeated.
    Bench(LabBenchArgs),
    /// Netfilter rule-count sweep: N non-matching rules before a hook's chain, netfilter cost
    /// at each N, and the fitted cost per rule (slope, intercept, R²).
    Sweep(LabSweepArgs),
}

#[derive(clap::Args)]
struct LabSweepArgs {
    /// Rule counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,250,500,1000,2000")]
    rules: Vec<u32>,
    /// The hook whose chain gets the rules.
    #[arg(long, value_enum, default_value_t = HookArg::Forward)]
    hook: HookArg,
    /// The lab model to sweep (built for the sweep and removed afterwards).
    #[arg(long, value_enum, default_value_t = Model::Flannel)]
    model: Model,
    #[arg(long, value_enum, default_value_t = Scenario::Intra)]
    scenario: Scenario,
    /// Profiled seconds per rule count.
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    #[arg(long, default_value_t = DEFAULT_FREQUENCY_HZ)]
    frequency: u64,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(Clone, Copy, ValueEnum)]
enum HookArg {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

#[derive(clap::Args)]
struct LabBenchArgs {
    /// Models to benchmark (default: all).
    #[arg(value_enum)]
    models: Vec<Model>,
    /// Scenario(s): pods on one host, or across the two hosts (default: both).
    #[arg(long, value_enum)]
    scenario: Vec<Scenario>,
    /// Profiled seconds of each stream.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Runs per model and scenario (mean and 95% CI over them).
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    #[arg(long, default_value_t = DEFAULT_FREQUENCY_HZ)]
    frequency: u64,
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,
    #[arg(long, value_enum, default_value_t = AttachArg::Auto)]
    attach: AttachArg,
    #[arg(long, value_enum, default_value_t = LabFormat::Table)]
    format: LabFormat,
    /// Also write the stacked-bar chart (figs. 9/11 style) as SVG to this file.
    #[arg(long)]
    svg: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum LabFormat {
    Table,
    Json,
    Markdown,
}

#[derive(Clone, Copy, ValueEnum)]
enum DirectionArg {
    Ingress,
    Egress,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Table,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    Auto,
    Sampling,
    Tracing,
}

impl From<BackendArg> for Backend {
    fn from(arg: BackendArg) -> Self {
        match arg {
            BackendArg::Auto => Backend::Auto,
            BackendArg::Sampling => Backend::Sampling,
            BackendArg::Tracing => Backend::Tracing,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum AttachArg {
    Auto,
    Fentry,
    Kprobe,
}

impl From<AttachArg> for cnitrace::probe::trace::AttachMode {
    fn from(arg: AttachArg) -> Self {
        match arg {
            AttachArg::Auto => Self::Auto,
            AttachArg::Fentry => Self::Fentry,
            AttachArg::Kprobe => Self::Kprobe,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum UnitArg {
    Segment,
    Skb,
}

#[derive(Clone, Copy, ValueEnum)]
enum ClockArg {
    Auto,
    CpuClock,
}

#[derive(clap::Args)]
struct ProfileArgs {
    /// Window length in seconds. Ctrl-C ends the window early and still reports it.
    #[arg(long, default_value_t = 10.0, allow_negative_numbers = true)]
    duration: f64,
    /// auto: tracing where the kernel has kprobes (every traced function can then attach),
    /// else sampling.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,
    /// Tracing: fentry/fexit per function where possible else kprobes (auto), or force one.
    #[arg(long, value_enum, default_value_t = AttachArg::Auto)]
    attach: AttachArg,
    /// Sampling frequency per CPU, in Hz.
    #[arg(long, default_value_t = DEFAULT_FREQUENCY_HZ)]
    frequency: u64,
    /// Interface(s) whose transmitted packets are the denominator (summed). Default: the
    /// interface that transmitted the most in the window.
    #[arg(long = "iface")]
    ifaces: Vec<String>,
    /// Named network namespace(s) (`ip netns`) where --iface names are looked up.
    #[arg(long = "netns")]
    netns: Vec<String>,
    /// What a packet is: a wire-size segment (default, as the paper counts) or an skb.
    #[arg(long, value_enum, default_value_t = UnitArg::Segment)]
    packet_unit: UnitArg,
    /// Sample a hardware cycles counter when present (auto), or always cpu-clock.
    #[arg(long, value_enum, default_value_t = ClockArg::Auto)]
    clock: ClockArg,
    /// Count the packets entering each netfilter hook with a temporary nftables table (removed
    /// afterwards), so rules per packet are known for nft-based iptables too.
    #[arg(long)]
    count_hook_entries: bool,
    /// Do not read the iptables/nftables rulesets around the window.
    #[arg(long, conflicts_with = "count_hook_entries")]
    no_ruleset: bool,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(clap::Args)]
struct NetfilterArgs {
    #[command(flatten)]
    profile: ProfileArgs,
    /// Do not add the counting table: rules per packet then only for legacy iptables.
    #[arg(long)]
    no_count: bool,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves on the first SIGINT or SIGTERM.
async fn interrupted() {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Report {
    Breakdown,
    Netfilter,
}

async fn run_profile(args: ProfileArgs, report: Report) -> anyhow::Result<()> {
    let options = ProfileOptions {
        duration_s: args.duration,
        backend: args.backend.into(),
        sampler: SamplerConfig {
            frequency_hz: args.frequency,
            clock: match args.clock {
                ClockArg::Auto => ClockChoice::Auto,
                ClockArg::CpuClock => ClockChoice::CpuClock,
            },
            tracing: None,
        },
        attach: args.attach.into(),
        ifaces: args.ifaces,
        unit: match args.packet_unit {
            UnitArg::Segment => PacketUnit::Segment,
            UnitArg::Skb => PacketUnit::Skb,
        },
        netfilter: cnitrace::netfilter::Options {
            read_rules: !args.no_ruleset,
            count_entries: args.count_hook_entries,
            namespaces: args.netns.clone(),
        },
        netns: args.netns,
    };
    let tty = std::io::stderr().is_terminal();
    if !tty {
        eprintln!(
            "cnitrace: profiling for {} s (Ctrl-C ends the window early)",
            options.duration_s
        );
    }
    let progress = |elapsed: f64, total: f64| {
        if tty {
            eprint!(
                "\rcnitrace: profiling {elapsed:>5.0}/{total:.0} s (Ctrl-C ends the window early)"
            );
        }
    };
    let (breakdown, ending) = profile::run(&options, interrupted(), progress).await?;
    if tty {
        eprintln!();
    }
    if ending == Ending::Interrupted {
        eprintln!(
            "cnitrace: interrupted; reporting the {:.1} s measured",
            breakdown.window.duration_s
        );
    }
    match (args.format, report) {
        (Format::Json, _) => println!("{}", serde_json::to_string_pretty(&breakdown)?),
        (Format::Table, Report::Breakdown) => print!("{}", render::table(&breakdown)),
        (Format::Table, Report::Netfilter) => print!("{}", render::netfilter_report(&breakdown)),
    }
    Ok(())
}

/// Attaches, then waits for a signal. Runs before any runtime thread exists, because entering
/// the namespace affects only the calling thread and the threads it starts afterwards.
fn run_lab(command: LabCommand) -> anyhow::Result<()> {
    let LabCommand::TcWork {
        iface,
        netns,
        direction,
        loops,
    } = command
    else {
        unreachable!("only tc-work runs before the runtime");
    };
    let direction = match direction {
        DirectionArg::Ingress => cnitrace::lab::tc_work::Direction::Ingress,
        DirectionArg::Egress => cnitrace::lab::tc_work::Direction::Egress,
    };
    let attached = cnitrace::lab::tc_work::attach(netns.as_deref(), &iface, direction, loops)?;
    eprintln!(
        "cnitrace: lab_tc_work ({loops} loops per packet) attached to {iface}; Ctrl-C detaches"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(interrupted());
    drop(attached);
    eprintln!("cnitrace: lab_tc_work detached");
    Ok(())
}

/// A spinner for long lab work: transient lines replace each other, others are kept.
fn lab_progress() -> (indicatif::ProgressBar, impl Fn(&str, bool)) {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let handle = bar.clone();
    let progress = move |line: &str, transient: bool| {
        if transient {
            handle.set_message(line.to_owned());
        } else {
            handle.suspend(|| eprintln!("cnitrace: {line}"));
        }
    };
    (bar, progress)
}

/// Runs lab work to its end, or until Ctrl-C/SIGTERM, which removes the lab (and with it any
/// rules the work added) before failing.
async fn until_interrupted<T>(
    work: impl std::future::Future<Output = Result<T, cnitrace::Error>>,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<T> {
    let result = tokio::select! {
        result = work => result,
        () = interrupted() => {
            bar.finish_and_clear();
            cnitrace::lab::topology::down().await?;
            anyhow::bail!("interrupted; the lab and everything it added were removed");
        }
    };
    bar.finish_and_clear();
    Ok(result?)
}

async fn run_lab_async(command: LabCommand) -> anyhow::Result<()> {
    use cnitrace::{
        lab::{bench, sweep, topology},
        netfilter::hooks::Hook,
    };
    match command {
        LabCommand::Sweep(args) => {
            let options = sweep::SweepOptions {
                rules: args.rules,
                hook: match args.hook {
                    HookArg::Prerouting => Hook::Prerouting,
                    HookArg::Input => Hook::Input,
                    HookArg::Forward => Hook::Forward,
                    HookArg::Output => Hook::Output,
                    HookArg::Postrouting => Hook::Postrouting,
                },
                model: args.model,
                scenario: args.scenario,
                duration_s: args.duration,
                sampler: SamplerConfig {
                    frequency_hz: args.frequency,
                    ..SamplerConfig::default()
                },
            };
            sweep::validate(&options)?;
            cnitrace::probe::privileges::check()?;
            let (bar, progress) = lab_progress();
            let result = until_interrupted(sweep::run(&options, progress), &bar).await?;
            match args.format {
                Format::Table => print!("{}", sweep::render(&result)),
                Format::Json => println!("{}", serde_json::to_string_pretty(&result)?),
            }
            Ok(())
        }
        LabCommand::TcWork { .. } => unreachable!("runs before the runtime"),
        LabCommand::Up { model } => {
            cnitrace::probe::privileges::check()?;
            let lab = topology::up(model).await?;
            eprintln!("cnitrace: lab {} is up:", model.name());
            for pod in &lab.pods {
                eprintln!(
                    "  pod {} in netns {} (host {}), {}",
                    pod.letter,
                    pod.netns,
                    lab.host_netns(pod.host),
                    pod.ip
                );
            }
            eprintln!("  remove it with `cnitrace lab down`");
            Ok(())
        }
        LabCommand::Down => {
            let removed = topology::down().await?;
            eprintln!(
                "cnitrace: removed {} lab namespace(s){}",
                removed.len(),
                if removed.is_empty() {
                    String::new()
                } else {
                    format!(": {}", removed.join(", "))
                }
            );
            Ok(())
        }
        LabCommand::Bench(args) => {
            let options = bench::BenchOptions {
                models: if args.models.is_empty() {
                    Model::ALL.to_vec()
                } else {
                    args.models
                },
                scenarios: if args.scenario.is_empty() {
                    vec![Scenario::Intra, Scenario::Inter]
                } else {
                    args.scenario
                },
                duration_s: args.duration,
                repeats: args.repeat,
                backend: args.backend.into(),
                attach: args.attach.into(),
                sampler: SamplerConfig {
                    frequency_hz: args.frequency,
                    ..SamplerConfig::default()
                },
            };
            bench::validate(&options)?;
            cnitrace::probe::privileges::check()?;
            let (bar, progress) = lab_progress();
            let entries = until_interrupted(bench::run(&options, progress), &bar).await?;
            if let Some(path) = &args.svg {
                std::fs::write(path, bench::svg(&entries))
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
                eprintln!("cnitrace: chart written to {}", path.display());
            }
            match args.format {
                LabFormat::Table => print!("{}", bench::table(&entries)),
                LabFormat::Markdown => print!("{}", bench::markdown(&entries)),
                LabFormat::Json => println!("{}", serde_json::to_string_pretty(&entries)?),
            }
            Ok(())
        }
    }
}

fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read --token-file {}: {e}", path.display()))?
        .trim()
        .to_owned();
    if token.is_empty() {
        anyhow::bail!("--token-file {} is empty", path.display());
    }
    Ok(token)
}

async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    use std::sync::Arc;

    use cnitrace::{
        agent::{Agent, Limits},
        server::{AppState, Metrics, router},
    };

    if !(args.max_duration.is_finite() && args.max_duration > 0.0) {
        anyhow::bail!(
            "--max-duration {} must be a positive number of seconds",
            args.max_duration
        );
    }
    if args.max_sessions == 0 {
        anyhow::bail!("--max-sessions must be at least 1");
    }
    let token = args.token_file.as_deref().map(read_token).transpose()?;
    if token.is_none() && !args.listen.ip().is_loopback() {
        tracing::warn!(
            "listening on {} without --token-file: anyone who can reach it can read this node's data",
            args.listen
        );
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let sampler = cnitrace::profile::start_backend(
        args.backend.into(),
        args.attach.into(),
        &SamplerConfig {
            frequency_hz: args.frequency,
            ..SamplerConfig::default()
        },
    )?;
    let limits = Limits {
        max_sessions: args.max_sessions,
        max_duration_s: args.max_duration,
        ..Limits::default()
    };
    let state = Arc::new(AppState {
        agent: Agent::new(Box::new(sampler), limits),
        node: doctor::report(),
        token,
        metrics: Metrics::new(),
    });
    state.metrics.prime(&state.agent)?;
    // Once a second: a snapshot for rolling windows, and stop sessions whose time is up.
    let ticker = {
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                interval.tick().await;
                let state = Arc::clone(&state);
                let _ = tokio::task::spawn_blocking(move || {
                    if let Err(e) = state.agent.tick() {
                        tracing::warn!("snapshot failed: {e}");
                    }
                    for id in state.agent.due_sessions() {
                        if let Err(e) = state.agent.stop_session(id) {
                            tracing::debug!("session {id}: {e}");
                        }
                    }
                })
                .await;
            }
        })
    };
    eprintln!(
        "cnitrace agent: listening on http://{} (SIGTERM or Ctrl-C stops it)",
        args.listen
    );
    axum::serve(listener, router(Arc::clone(&state)))
        .with_graceful_shutdown(interrupted())
        .await?;
    ticker.abort();
    let _ = ticker.await;
    // The last reference to the sampler goes here: its programs are detached and unloaded.
    drop(state);
    eprintln!("cnitrace agent: stopped, probes detached");
    Ok(())
}

async fn run_collect(args: CollectArgs) -> anyhow::Result<()> {
    use cnitrace::collect::{AgentClient, Collected, discover, sum, table};

    if args.command.is_empty() {
        cnitrace::profile::validate_duration(args.duration)?;
    }
    let token = args.token_file.as_deref().map(read_token).transpose()?;
    let urls = discover(&args.urls)?;
    let clients = urls
        .iter()
        .map(|url| AgentClient::new(url, token.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let clients = std::sync::Arc::new(clients);
    let started = {
        let clients = std::sync::Arc::clone(&clients);
        tokio::task::spawn_blocking(move || {
            let mut ids = Vec::new();
            for client in clients.iter() {
                match client.start() {
                    Ok(id) => ids.push(id),
                    Err(e) => {
                        // Do not leave sessions running on the agents that did start.
                        for (client, id) in clients.iter().zip(&ids) {
                            let _ = client.stop(*id);
                        }
                        return Err(e);
                    }
                }
            }
            Ok(ids)
        })
        .await??
    };
    let mut command_status = None;
    if let Some((program, rest)) = args.command.split_first() {
        eprintln!(
            "cnitrace collect: sessions open on {} agents; running {}",
            clients.len(),
            args.command.join(" ")
        );
        let mut command = tokio::process::Command::new(program);
        command.args(rest);
        if args.format == Format::Json {
            // Keep stdout for the JSON document: the benchmark's own output goes to stderr.
            use std::os::fd::AsFd as _;
            command.stdout(std::io::stderr().as_fd().try_clone_to_owned()?);
        }
        let mut child = command.spawn();
        match &mut child {
            Ok(child) => {
                // Ctrl-C reaches the command too; wait for it, then close the windows.
                let status = tokio::select! {
                    status = child.wait() => status,
                    _ = tokio::signal::ctrl_c() => child.wait().await,
                };
                command_status = Some(status?);
            }
            Err(e) => eprintln!("cnitrace collect: cannot run {program}: {e}"),
        }
    } else {
        eprintln!(
            "cnitrace collect: sessions open on {} agents for {} s",
            clients.len(),
            args.duration
        );
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs_f64(args.duration)) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    let nodes = {
        let clients = std::sync::Arc::clone(&clients);
        tokio::task::spawn_blocking(move || {
            clients
                .iter()
                .zip(started)
                .map(|(client, id)| client.stop(id))
                .collect::<Result<Vec<_>, _>>()
        })
        .await??
    };
    let collected = Collected {
        sum: sum(&nodes),
        nodes,
    };
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&collected)?),
        Format::Table => print!("{}", table(&collected)),
    }
    match command_status {
        Some(status) if !status.success() => {
            anyhow::bail!("the benchmark command exited with {status}")
        }
        None if !args.command.is_empty() => {
            anyhow::bail!("the benchmark command could not be started")
        }
        _ => Ok(()),
    }
}

fn run_import_perf(args: &ImportPerfArgs) -> anyhow::Result<()> {
    use cnitrace::{breakdown, perf_import, probe::clock, session};
    use std::io::Read as _;

    cnitrace::profile::validate_duration(args.duration)?;
    let mut text = String::new();
    if args.input.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text)?;
    } else {
        text = std::fs::read_to_string(&args.input)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.input.display()))?;
    }
    let samples = perf_import::parse(&text)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let calibration = clock::calibrate(std::time::Duration::from_millis(100));
    let mut raw = perf_import::window(
        samples,
        args.duration,
        args.frequency,
        cpus,
        calibration.cycles_per_ns,
    );
    if args.packets > 0 {
        // The count the user measured, as a single pseudo-device.
        let mut device = cnitrace_common::IfaceCounters {
            tx_skbs: args.packets,
            tx_segments: args.packets,
            ifindex: 1,
            ..Default::default()
        };
        device.name[..6].copy_from_slice(b"import");
        raw.ifaces.push(device);
    }
    let unavailable = cnitrace::kallsyms::Kallsyms::load()
        .map(|k| session::unavailable_components(&k))
        .unwrap_or_default();
    let context = breakdown::Context {
        node: session::node_name(),
        kernel: session::kernel_release(),
        backend: "perf-import".to_owned(),
        unavailable,
    };
    let b = breakdown::compute(&raw, &context, &breakdown::PacketSelection::default());
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&b)?),
        Format::Table => print!("{}", render::table(&b)),
    }
    Ok(())
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let command = match cli.command {
        Command::Lab(lab @ LabCommand::TcWork { .. }) => return report(run_lab(lab)),
        Command::ImportPerf(args) => return report(run_import_perf(&args)),
        other => other,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command {
            Command::Profile(args) => run_profile(args, Report::Breakdown).await,
            Command::Netfilter(mut args) => {
                args.profile.count_hook_entries = !args.no_count;
                args.profile.no_ruleset = false;
                run_profile(args.profile, Report::Netfilter).await
            }
            Command::Agent(args) => run_agent(args).await,
            Command::Collect(args) => run_collect(args).await,
            Command::Doctor { format } => {
                let report = doctor::report();
                match format {
                    Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                    Format::Table => print!("{}", doctor::render(&report)),
                }
                Ok(())
            }
            Command::Lab(lab) => run_lab_async(lab).await,
            Command::ImportPerf(_) => {
                unreachable!("handled before the runtime starts")
            }
        }
    });
    report(result)
}
