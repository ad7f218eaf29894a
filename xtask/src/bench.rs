//! Overhead benchmark: iperf3 throughput over a bridged pod pair without and with cnitrace
//! sampling, alternated A/B/A/B in one run so machine drift hits both sides alike.

use std::{
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use cnitrace_tests::{Shape, Topology, remove_stale};

use crate::{bootstrap, cargo, run_command, workspace_root};

#[derive(clap::Args)]
pub struct Args {
    /// A/B rounds; each round runs every configuration once, in rotating order.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Seconds of iperf3 per run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Sampling frequencies to compare against no profiler.
    #[arg(long, value_delimiter = ',', default_values_t = vec![999u64])]
    frequencies: Vec<u64>,
    /// Non-matching FORWARD rules on the path (the paper's netfilter cost).
    #[arg(long, default_value_t = 100)]
    rules: usize,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        f64::midpoint(values[n / 2 - 1], values[n / 2])
    }
}

fn start_profiler(bin: &std::path::Path, hz: u64, seconds: u32) -> Result<Child> {
    let child = Command::new(bin)
        .args([
            "profile",
            "--format",
            "json",
            "--frequency",
            &hz.to_string(),
        ])
        .args(["--duration", &(seconds + 1).to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start cnitrace")?;
    // Attach (load, calibrate 100 ms) before the traffic starts.
    thread::sleep(Duration::from_millis(800));
    Ok(child)
}

pub fn run(args: &Args) -> Result<()> {
    if !crate::is_root() {
        bail!("the benchmark needs root (network namespaces and BPF)");
    }
    bootstrap::ensure()?;
    run_command(cargo().args(["build", "--release", "--package", "cnitrace"]))?;
    let bin = workspace_root().join("target/release/cnitrace");
    remove_stale();
    let topo = Topology::new(Shape::Bridged { rules: args.rules })?;

    // Configuration 0 is "nothing"; the others sample at the given frequencies.
    let configs: Vec<Option<u64>> = std::iter::once(None)
        .chain(args.frequencies.iter().copied().map(Some))
        .collect();
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for round in 0..args.rounds as usize {
        for step in 0..configs.len() {
            // Rotate the order each round so no configuration always runs first.
            let index = (step + round) % configs.len();
            let profiler = configs[index]
                .map(|hz| start_profiler(&bin, hz, args.seconds))
                .transpose()?;
            let gbps = topo.start_iperf3(args.seconds)?.finish()?;
            if let Some(mut p) = profiler {
                let status = p.wait()?;
                if !status.success() {
                    bail!("cnitrace exited with {status} during the benchmark");
                }
            }
            let label =
                configs[index].map_or_else(|| "nothing".to_owned(), |hz| format!("{hz} Hz"));
            eprintln!(
                "bench: round {}/{} {label:>9}: {gbps:.2} Gbit/s",
                round + 1,
                args.rounds
            );
            results[index].push(gbps);
        }
    }
    drop(topo);

    let baseline = median(&mut results[0].clone());
    println!(
        "\niperf3 over a bridged pod pair ({} FORWARD rules), {} rounds x {} s, A/B alternated",
        args.rules, args.rounds, args.seconds
    );
    println!(
        "{:<22} {:>14} {:>8} {:>8} {:>10}",
        "configuration", "median Gbit/s", "min", "max", "ratio"
    );
    for (config, values) in configs.iter().zip(&results) {
        let mut v = values.clone();
        let m = median(&mut v);
        let label = config.map_or_else(
            || "no profiler".to_owned(),
            |hz| format!("cnitrace sampling {hz} Hz"),
        );
        println!(
            "{label:<22} {m:>14.2} {:>8.2} {:>8.2} {:>10.4}",
            v.first().copied().unwrap_or_default(),
            v.last().copied().unwrap_or_default(),
            m / baseline
        );
    }
    Ok(())
}
