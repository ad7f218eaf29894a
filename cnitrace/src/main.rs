//! The cnitrace command line: `profile`, `doctor` (and, as they land, `agent`, `lab`, `bench`).

use std::{io::IsTerminal as _, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use cnitrace::{
    breakdown::PacketUnit,
    doctor,
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
    /// Datapath lab helpers.
    #[command(subcommand)]
    Lab(LabCommand),
    /// Report what this node supports: backends, hooks, PMU, BTF, components, CNI.
    Doctor {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
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
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,
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
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
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

async fn run_profile(args: ProfileArgs) -> anyhow::Result<()> {
    let options = ProfileOptions {
        duration_s: args.duration,
        backend: match args.backend {
            BackendArg::Auto => Backend::Auto,
            BackendArg::Sampling => Backend::Sampling,
            BackendArg::Tracing => Backend::Tracing,
        },
        sampler: SamplerConfig {
            frequency_hz: args.frequency,
            clock: match args.clock {
                ClockArg::Auto => ClockChoice::Auto,
                ClockArg::CpuClock => ClockChoice::CpuClock,
            },
        },
        ifaces: args.ifaces,
        netns: args.netns,
        unit: match args.packet_unit {
            UnitArg::Segment => PacketUnit::Segment,
            UnitArg::Skb => PacketUnit::Skb,
        },
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
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&breakdown)?),
        Format::Table => print!("{}", render::table(&breakdown)),
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
    } = command;
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
        Command::Lab(lab) => return report(run_lab(lab)),
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
            Command::Profile(args) => run_profile(args).await,
            Command::Doctor { format } => {
                let report = doctor::report();
                match format {
                    Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                    Format::Table => print!("{}", doctor::render(&report)),
                }
                Ok(())
            }
            Command::Lab(_) => unreachable!("lab commands run before the runtime starts"),
        }
    });
    report(result)
}
