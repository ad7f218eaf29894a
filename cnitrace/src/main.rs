//! The cnitrace command line: parses arguments and hands each subcommand to its module in
//! [`cli`]; errors are printed with their causes and end in a non-zero exit.

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cli::{Format, lab::LabCommand};
use cnitrace::doctor;

#[derive(Parser)]
#[command(
    name = "cnitrace",
    version,
    about = "CPU cycles per packet for each kernel component of the container datapath",
    after_help = "Examples:
  sudo cnitrace doctor                          what this node can measure
  sudo cnitrace profile -d 10                   10 s window during your traffic
  sudo cnitrace profile --flamegraph out.svg    ... and where the cycles went
  sudo cnitrace netfilter -n pod-ns             netfilter per hook and chain
  sudo cnitrace agent --listen 127.0.0.1:9560   REST API, /metrics, live page

Exit status: 0 success, 1 error (the message says what and how to fix it; nothing stays
attached), 2 bad usage. RUST_LOG=debug (or info, warn) sets the log level on stderr."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Profile one window and print the cycles-per-packet breakdown.
    #[command(after_help = "Examples:
  cnitrace profile -d 10                              10 s, the busiest device's packets
  cnitrace profile -i veth1a2b -n pod-ns             packets of one device in a named netns
  cnitrace profile -f json --stacks > before.json     input of `cnitrace diff`
  cnitrace profile --flamegraph out.svg               SVG coloured by component
  cnitrace profile -f pprof > profile.pb.gz           go tool pprof, Pyroscope, Parca
  cnitrace profile --backend tracing                  entry/exit probes (kprobes or fentry)")]
    Profile(cli::profile::ProfileArgs),
    /// Profile one window and report netfilter per hook: cost, chains, rules walked per packet
    /// and cycles per rule.
    #[command(after_help = "Examples:
  cnitrace netfilter -d 10 -n pod-ns                 this namespace's and pod-ns's rulesets
  cnitrace netfilter --count-hook-entries            rules per packet for nft-based iptables
                                                     (adds a temporary nftables table)")]
    Netfilter(cli::profile::NetfilterArgs),
    /// Run the agent: probes attached once, the REST API, Prometheus metrics and a live page.
    #[command(after_help = "Examples:
  cnitrace agent                                      127.0.0.1:9560, no token (loopback only)
  cnitrace agent --listen 0.0.0.0:9560 --token-file /etc/cnitrace/token
  curl -H \"Authorization: Bearer $(cat token)\" -X POST -H 'Content-Type: application/json' \\
       -d '{\"duration_s\": 10}' http://NODE:9560/api/v1/sessions")]
    Agent(cli::agent::AgentArgs),
    /// One window across several agents (e.g. sender and receiver), optionally around a
    /// benchmark command run here: per-node columns and their sum.
    #[command(after_help = "Examples:
  cnitrace collect http://node-a:9560 http://node-b:9560 --token-file token -- iperf3 -c 10.0.1.5 -t 30
  cnitrace collect dns+http://cnitrace.cnitrace.svc:9560 --token-file token --duration 30")]
    Collect(cli::collect::CollectArgs),
    /// What changed per packet between two windows (breakdown files or an agent's sessions):
    /// components, sub-components, innermost functions, and a differential flame graph.
    #[command(after_help = "Examples:
  cnitrace profile -f json --stacks > before.json    (change something)    ... > after.json
  cnitrace diff before.json after.json --flamegraph diff.svg
  cnitrace diff --agent http://node-a:9560 3 4 --token-file token")]
    Diff(cli::diff::DiffArgs),
    /// Apply cnitrace's taxonomy to a perf recording: reads `perf script -F
    /// comm,pid,tid,cpu,period,event,ip,sym,dso` output (from `perf record -a -g -e cpu-clock`).
    ImportPerf(cli::import_perf::ImportPerfArgs),
    /// CNI datapaths built on this machine: up, down, bench, rule and Service sweeps.
    #[command(
        subcommand,
        after_help = "Examples:
  cnitrace lab up flannel && cnitrace lab down
  cnitrace lab bench flannel calico-np cni-bridge --duration 3
  cnitrace lab sweep --rules 0,500,1000,2000
  cnitrace lab sweep --services 0,1,1000,5000 --proxy-mode iptables,nftables --svg services.svg"
    )]
    Lab(LabCommand),
    /// Report what this node supports: backends, hooks, PMU, BTF, components, CNI.
    Doctor {
        /// The report as a table or as JSON.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Put back what a killed cnitrace left on this node (the bpf_stats sysctl,
        /// nftables counting tables, lab namespaces and their processes), then report.
        #[arg(long)]
        repair: bool,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
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

/// Two malloc arenas instead of eight per CPU: window computations run on several blocking
/// threads, and glibc would keep a mostly free arena per thread, tripling the agent's RSS.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    init_logging();
    // These run without the multi-threaded runtime: tc-work enters a namespace, which affects
    // only the calling thread and the threads it starts afterwards.
    let command = match cli.command {
        Command::Lab(lab @ LabCommand::TcWork { .. }) => return report(cli::lab::run_tc_work(lab)),
        Command::ImportPerf(args) => return report(cli::import_perf::run(&args)),
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
            Command::Profile(args) => cli::profile::run_profile(args).await,
            Command::Netfilter(args) => cli::profile::run_netfilter(args).await,
            Command::Agent(args) => cli::agent::run(args).await,
            Command::Collect(args) => cli::collect::run(args).await,
            Command::Diff(args) => cli::diff::run(args).await,
            Command::Doctor {
                format,
                repair: false,
            } => cli::print(format, &doctor::report(), doctor::render),
            Command::Doctor {
                format,
                repair: true,
            } => {
                let report = cnitrace::repair::repair().await;
                cli::print(format, &report, cnitrace::repair::render)?;
                if report.remaining.is_empty() {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!(
                        "{} thing(s) could not be repaired (listed above)",
                        report.remaining.len()
                    ))
                }
            }
            Command::Lab(lab) => cli::lab::run(lab).await,
            Command::ImportPerf(_) => unreachable!("handled before the runtime starts"),
        }
    });
    report(result)
}
