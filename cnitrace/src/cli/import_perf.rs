//! `cnitrace import-perf`: cnitrace's taxonomy applied to a `perf script` recording.

use std::io::Read as _;

use cnitrace::{
    breakdown, perf_import,
    probe::{clock, sampling::DEFAULT_FREQUENCY_HZ},
    render, window,
};

use super::Format;

#[derive(clap::Args)]
pub struct ImportPerfArgs {
    /// The `perf script` output; `-` reads standard input.
    pub input: std::path::PathBuf,
    /// Length of the recording in seconds.
    #[arg(long)]
    pub duration: f64,
    /// The `-F` frequency of the recording.
    #[arg(long, default_value_t = DEFAULT_FREQUENCY_HZ)]
    pub frequency: u64,
    /// Packets sent during the recording, the denominator of CPP.
    #[arg(long, default_value_t = 0)]
    pub packets: u64,
    /// The breakdown as a table or as JSON.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

pub fn run(args: &ImportPerfArgs) -> anyhow::Result<()> {
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
        .map(|k| cnitrace::components::unavailable(&k))
        .unwrap_or_default();
    let context = breakdown::Context {
        node: window::node_name(),
        kernel: window::kernel_release(),
        backend: "perf-import".to_owned(),
        unavailable,
    };
    let b = breakdown::compute(&raw, &context, &breakdown::PacketSelection::default());
    super::print(args.format, &b, render::table)
}
