//! The `cnitrace` binary's subcommands (not part of the library): argument types and the work
//! of each subcommand, one module each, on top of the library's own enums.

pub mod agent;
pub mod collect;
pub mod diff;
pub mod import_perf;
pub mod lab;
pub mod profile;

use clap::ValueEnum;
use cnitrace::probe::sampling::{
    ClockChoice, DEFAULT_FREQUENCY_HZ, PacketSource, ProbeConfig, SoftirqSource,
};
use serde::Serialize;

/// How a result is printed.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

/// Prints `value` as pretty JSON or as the table `render` makes of it.
pub fn print<T: Serialize>(
    format: Format,
    value: &T,
    render: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Format::Table => print!("{}", render(value)),
    }
    Ok(())
}

/// What gets attached: the sampler's rate and clock, and where packets and softirq times come
/// from.
#[derive(clap::Args)]
pub struct ProbeArgs {
    /// Sampling frequency per CPU, in Hz.
    #[arg(short = 'F', long, default_value_t = DEFAULT_FREQUENCY_HZ)]
    pub frequency: u64,
    /// Sample a hardware cycles counter when present (auto), or always cpu-clock.
    #[arg(long, value_enum, default_value_t = ClockChoice::Auto)]
    pub clock: ClockChoice,
    /// The packet denominator: devices' own counters (no per-packet program; segments derived
    /// from bytes and MTU), or exact (a program on every transmit of every device).
    #[arg(long, value_enum, default_value_t = PacketSource::Devices)]
    pub packets: PacketSource,
    /// Softirq times: from the sampled stacks (runs from /proc/softirqs), or exact (a probe
    /// pair on every softirq run).
    #[arg(long, value_enum, default_value_t = SoftirqSource::Sampled)]
    pub softirq: SoftirqSource,
}

impl ProbeArgs {
    pub fn config(&self) -> ProbeConfig {
        ProbeConfig {
            frequency_hz: self.frequency,
            clock: self.clock,
            packets: self.packets,
            softirq: self.softirq,
        }
    }
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn interrupted() {
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

/// Reads a bearer token from a file (trimmed; empty is an error).
pub fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read --token-file {}: {e}", path.display()))?
        .trim()
        .to_owned();
    if token.is_empty() {
        anyhow::bail!("--token-file {} is empty", path.display());
    }
    Ok(token)
}
