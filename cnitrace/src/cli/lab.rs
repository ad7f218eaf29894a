//! `cnitrace lab`: datapath models from network namespaces, their benchmark and the netfilter
//! rule sweep, and the tc program with a known cost per packet.

use cnitrace::{
    lab::{
        bench,
        services::{self, ProxyMode},
        sweep,
        tc_work::Direction,
        topology::{self, Model, Scenario},
    },
    netfilter::hooks::Hook,
    probe::{
        AttachMode, Backend, BackendKind,
        sampling::{DEFAULT_FREQUENCY_HZ, ProbeConfig},
    },
};

use clap::{Subcommand, ValueEnum};

use super::{Format, interrupted};

#[derive(Subcommand)]
pub enum LabCommand {
    /// Attach the project's tc program doing LOOPS iterations of work per packet to IFACE and
    /// keep it attached until interrupted (Ctrl-C / SIGTERM detach it).
    TcWork {
        /// The interface to attach to.
        #[arg(long)]
        iface: String,
        /// Named network namespace (`ip netns`) of the interface.
        #[arg(long)]
        netns: Option<String>,
        /// tc ingress or egress of the interface.
        #[arg(long, value_enum, default_value_t = Direction::Ingress)]
        direction: Direction,
        /// Iterations of work per packet.
        #[arg(long, default_value_t = 1000)]
        loops: u32,
    },
    /// Build a CNI datapath model from network namespaces (two hosts, three pods).
    Up {
        /// The model to build.
        #[arg(value_enum, required_unless_present = "cni_conf")]
        model: Option<Model>,
        /// Build two pods on one host with this CNI configuration (a .conf/.conflist file, or
        /// a directory such as /etc/cni/net.d: its first file by name) and the plugins
        /// installed here (CNI_PATH, else /opt/cni/bin then /usr/lib/cni).
        #[arg(long, value_name = "PATH", conflicts_with_all = ["model", "services"])]
        cni_conf: Option<std::path::PathBuf>,
        /// ClusterIP Services to install on both hosts in kube-proxy's shape (the last one
        /// leads to pod b's port 5300).
        #[arg(long, default_value_t = 0)]
        services: u32,
        /// How the Services are implemented.
        #[arg(long, value_enum, default_value_t = ProxyMode::Iptables)]
        proxy_mode: ProxyMode,
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
pub struct LabSweepArgs {
    /// Rule counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,250,500,1000,2000")]
    pub rules: Vec<u32>,
    /// The hook whose chain gets the rules.
    #[arg(long, value_enum, default_value_t = Hook::Forward)]
    pub hook: Hook,
    /// The lab model to sweep (built for the sweep and removed afterwards).
    #[arg(long, value_enum, default_value_t = Model::Flannel)]
    pub model: Model,
    /// Pods on one host (intra) or across the two hosts (inter).
    #[arg(long, value_enum, default_value_t = Scenario::Intra)]
    pub scenario: Scenario,
    /// Profiled seconds per rule count.
    #[arg(long, default_value_t = 3.0)]
    pub duration: f64,
    /// Sampling frequency per CPU, in Hz.
    #[arg(long, default_value_t = DEFAULT_FREQUENCY_HZ)]
    pub frequency: u64,
    /// The sweep as a table or as JSON.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Write a flame graph of each rule count's window into this directory.
    #[arg(long, value_name = "DIR")]
    pub flamegraphs: Option<std::path::PathBuf>,
    /// Sweep Services instead of rules: numbers of ClusterIP Services, comma-separated
    /// (connect-request-response to the last one, per --proxy-mode).
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["rules", "hook"])]
    pub services: Option<Vec<u32>>,
    /// With --services: also write the chart (set-up latency and netfilter cycles per
    /// connection against the number of Services) as SVG here.
    #[arg(long, requires = "services")]
    pub svg: Option<std::path::PathBuf>,
    /// With --services: kube-proxy's modes to compare.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "iptables,nftables",
        requires = "services"
    )]
    pub proxy_mode: Vec<ProxyMode>,
}

#[derive(clap::Args)]
pub struct LabBenchArgs {
    /// Models to benchmark (default: all).
    #[arg(value_enum)]
    pub models: Vec<Model>,
    /// Scenario(s): pods on one host, or across the two hosts (default: both).
    #[arg(long, value_enum)]
    pub scenario: Vec<Scenario>,
    /// Profiled seconds of each stream.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Runs per model and scenario (mean and 95% CI over them).
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    /// Sampling frequency per CPU, in Hz.
    #[arg(long, default_value_t = DEFAULT_FREQUENCY_HZ)]
    pub frequency: u64,
    /// auto is sampling; tracing puts a probe pair on each component's entry points.
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,
    /// Tracing: fentry/fexit where possible else kprobes (auto), or force one.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub attach: AttachMode,
    /// Results as a table, JSON, or a markdown table.
    #[arg(long, value_enum, default_value_t = LabFormat::Table)]
    pub format: LabFormat,
    /// Also write the stacked-bar chart as SVG to this file.
    #[arg(long)]
    pub svg: Option<std::path::PathBuf>,
    /// Write a flame graph of each model, scenario and repeat into this directory.
    #[arg(long, value_name = "DIR")]
    pub flamegraphs: Option<std::path::PathBuf>,
    /// Also benchmark this CNI configuration (a .conf/.conflist file, or a directory such as
    /// /etc/cni/net.d: its first file by name) as the model `cni-conf`, run by the plugins
    /// installed here; pods on one host (intra) only.
    #[arg(long, value_name = "PATH")]
    pub cni_conf: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LabFormat {
    Table,
    Json,
    Markdown,
}

/// Attaches, then waits for a signal. Runs before any runtime thread exists, because entering
/// the namespace affects only the calling thread and the threads it starts afterwards.
pub fn run_tc_work(command: LabCommand) -> anyhow::Result<()> {
    let LabCommand::TcWork {
        iface,
        netns,
        direction,
        loops,
    } = command
    else {
        unreachable!("only tc-work runs before the runtime");
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

/// The lab's sampler: the default probes at the frequency asked for.
fn sampler_at(frequency_hz: u64) -> ProbeConfig {
    ProbeConfig {
        frequency_hz,
        ..ProbeConfig::default()
    }
}

/// A spinner for long lab work: transient lines replace each other, others are kept.
pub fn lab_progress() -> (indicatif::ProgressBar, impl Fn(&str, bool)) {
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
pub async fn until_interrupted<T>(
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

pub async fn run(command: LabCommand) -> anyhow::Result<()> {
    match command {
        LabCommand::Sweep(args) if args.services.is_some() => {
            let options = services::ServiceSweepOptions {
                services: args.services.unwrap_or_default(),
                modes: args.proxy_mode,
                model: args.model,
                scenario: args.scenario,
                duration_s: args.duration,
                sampler: sampler_at(args.frequency),
                flamegraphs: args.flamegraphs,
            };
            services::validate_sweep(&options)?;
            cnitrace::probe::privileges::check()?;
            let (bar, progress) = lab_progress();
            let result = until_interrupted(services::sweep(&options, progress), &bar).await?;
            if let Some(path) = &args.svg {
                std::fs::write(path, services::svg(&result))
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
                eprintln!("cnitrace: chart written to {}", path.display());
            }
            super::print(args.format, &result, services::render_sweep)
        }
        LabCommand::Sweep(args) => {
            let options = sweep::SweepOptions {
                rules: args.rules,
                hook: args.hook,
                model: args.model,
                scenario: args.scenario,
                duration_s: args.duration,
                sampler: sampler_at(args.frequency),
                flamegraphs: args.flamegraphs,
            };
            sweep::validate(&options)?;
            cnitrace::probe::privileges::check()?;
            let (bar, progress) = lab_progress();
            let result = until_interrupted(sweep::run(&options, progress), &bar).await?;
            super::print(args.format, &result, sweep::render)
        }
        LabCommand::TcWork { .. } => unreachable!("runs before the runtime"),
        LabCommand::Up {
            model,
            cni_conf,
            services: count,
            proxy_mode,
        } => {
            let loaded = cni_conf
                .as_deref()
                .map(cnitrace::cni_config::load)
                .transpose()?;
            cnitrace::probe::privileges::check()?;
            let lab = match (&loaded, model) {
                (Some(loaded), _) => {
                    eprintln!(
                        "cnitrace: {} ({}): plugins {}",
                        loaded.file.display(),
                        loaded.name(),
                        cnitrace::cni_config::chain(&loaded.conflist).join(" -> ")
                    );
                    topology::up_with_conf(loaded).await?
                }
                (None, Some(model)) => topology::up(model).await?,
                (None, None) => unreachable!("clap requires a model or --cni-conf"),
            };
            let model = lab.model;
            if count > 0 {
                let target = lab.pods[1].ip;
                let installed = services::install(
                    &lab,
                    proxy_mode,
                    count,
                    target,
                    cnitrace::lab::traffic::CRR_PORT,
                );
                match installed {
                    Ok(i) => eprintln!(
                        "cnitrace: {count} Services in kube-proxy's {} shape: {} rules per host (installed in {:.2} s); the last, {}:{}, leads to {target}:{}",
                        proxy_mode.name(),
                        i.rules,
                        i.seconds,
                        i.target,
                        services::SERVICE_PORT,
                        cnitrace::lab::traffic::CRR_PORT
                    ),
                    Err(e) => {
                        topology::down().await?;
                        return Err(e.into());
                    }
                }
            }
            eprintln!("cnitrace: lab {} is up:", model.name());
            for host in [1, 2] {
                let netns = lab.host_netns(host);
                if let Ok(rules) = cnitrace::lab::node_rules::count(&netns) {
                    eprintln!(
                        "  host {host} ({netns}): {rules} iptables rules (iptables-save, every table)"
                    );
                }
            }
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
            let cni_conf = args
                .cni_conf
                .as_deref()
                .map(cnitrace::cni_config::load)
                .transpose()?;
            let mut models = args.models;
            if cni_conf.is_some() {
                models.push(Model::CniConf);
            } else if models.is_empty() {
                models = Model::ALL.to_vec();
            }
            let options = bench::BenchOptions {
                models,
                scenarios: if args.scenario.is_empty() {
                    vec![Scenario::Intra, Scenario::Inter]
                } else {
                    args.scenario
                },
                duration_s: args.duration,
                repeats: args.repeat,
                backend: Backend::requested(args.backend, args.attach)?,
                flamegraphs: args.flamegraphs,
                sampler: sampler_at(args.frequency),
                cni_conf,
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
