//! Overhead benchmark: iperf3 throughput over a bridged pod pair without and with cnitrace and
//! its peers, alternated in one run so machine drift hits every side alike, with an A/A row
//! (no profiler twice) to tell a difference from noise. Throughput rounds run with
//! kernel.bpf_stats_enabled as the machine had it (0 by default), so no side is taxed by the
//! bench; cnitrace's in-kernel cost is measured in separate rounds with statistics on.

use std::{
    process::{Child, Command, Stdio},
    thread,
    time::Duration,
};

use std::fmt::Write as _;

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
    /// Sampling frequencies; each is run with cnitrace, perf record and bpftrace.
    #[arg(long, value_delimiter = ',', default_values_t = vec![999u64])]
    frequencies: Vec<u64>,
    /// Only cnitrace at each frequency (no perf, bpftrace or agent configurations).
    #[arg(long)]
    cnitrace_only: bool,
    /// Non-matching FORWARD rules on the path (a netfilter cost to measure).
    #[arg(long, default_value_t = 100)]
    rules: usize,
    /// Offer a fixed load (iperf3 -b, Gbit/s) below saturation and compare busy CPU per
    /// packet of the whole node (from /proc/stat) instead of throughput alone.
    #[arg(long)]
    target_gbps: Option<f64>,
}

pub(crate) fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        f64::midpoint(values[n / 2 - 1], values[n / 2])
    }
}

/// The agent's continuous rate in the agent rows (its default).
const AGENT_CONTINUOUS_HZ: u64 = 49;

/// What runs beside iperf3.
#[derive(Clone, Copy)]
enum Config {
    Nothing,
    /// The same as `Nothing`, as a second row: the A/A comparison.
    NothingAgain,
    Cnitrace(u64),
    /// perf record -a -g, the usual method.
    PerfRecord(u64),
    /// An equivalent profile probe: kernel stacks counted in a BPF map.
    Bpftrace(u64),
    /// `cnitrace agent` with no session open and nobody reading (its sampler detached).
    AgentIdle,
    /// `cnitrace agent` with no session, scraped once at the start: its continuous rate.
    AgentScraped,
}

impl Config {
    fn label(self) -> String {
        match self {
            Config::Nothing => "no profiler".to_owned(),
            Config::NothingAgain => "no profiler (A/A)".to_owned(),
            Config::Cnitrace(hz) => format!("cnitrace {hz} Hz"),
            Config::PerfRecord(hz) => format!("perf record -g {hz} Hz"),
            Config::Bpftrace(hz) => format!("bpftrace profile {hz} Hz"),
            Config::AgentIdle => "agent, nobody reading".to_owned(),
            Config::AgentScraped => "agent, scraped".to_owned(),
        }
    }

    /// Samples per second per CPU this configuration takes (the agent's continuous rate is
    /// its default).
    fn rate_hz(self) -> u64 {
        match self {
            Config::Cnitrace(hz) | Config::PerfRecord(hz) | Config::Bpftrace(hz) => hz,
            Config::AgentScraped => AGENT_CONTINUOUS_HZ,
            Config::Nothing | Config::NothingAgain | Config::AgentIdle => 0,
        }
    }

    fn start(self, bin: &std::path::Path, seconds: u32) -> Result<Option<Child>> {
        let span = (seconds + 1).to_string();
        let child = match self {
            Config::Nothing | Config::NothingAgain => return Ok(None),
            Config::Cnitrace(hz) => start_profiler(bin, hz, seconds)?,
            Config::PerfRecord(hz) => {
                let data = workspace_root().join("target/bench/overhead-perf.data");
                std::fs::create_dir_all(data.parent().unwrap())?;
                let child = Command::new("perf")
                    .args([
                        "record",
                        "-q",
                        "-a",
                        "-g",
                        "-e",
                        "cpu-clock",
                        "-F",
                        &hz.to_string(),
                        "-o",
                    ])
                    .arg(&data)
                    .args(["--", "sleep", &span])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("perf (linux-perf)")?;
                thread::sleep(Duration::from_millis(800));
                child
            }
            Config::Bpftrace(hz) => {
                let program = format!(
                    "profile:hz:{hz} {{ @[kstack] = count(); }} interval:s:{span} {{ exit(); }}"
                );
                let mut child = Command::new("bpftrace")
                    .args(["-e", &program])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("bpftrace")?;
                // bpftrace compiles before it attaches: wait for its "Attaching" line.
                let stdout = child.stdout.take().context("stdout")?;
                let mut reader = std::io::BufReader::new(stdout);
                let mut line = String::new();
                std::io::BufRead::read_line(&mut reader, &mut line)?;
                // Keep draining: bpftrace prints its map at exit and must not hit a closed pipe.
                thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
                child
            }
            Config::AgentIdle | Config::AgentScraped => {
                let port = std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port();
                let child = Command::new(bin)
                    .args(["agent", "--listen", &format!("127.0.0.1:{port}")])
                    .args(["--continuous-frequency", &AGENT_CONTINUOUS_HZ.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?;
                cnitrace_tests::wait_until_ok(
                    &format!("http://127.0.0.1:{port}/healthz"),
                    Duration::from_secs(30),
                )?;
                // The first seconds of an agent are its start-up (symbols, doctor report):
                // the row is about the agent idling, not starting.
                thread::sleep(Duration::from_millis(500));
                if matches!(self, Config::AgentScraped) {
                    ureq::get(format!("http://127.0.0.1:{port}/metrics"))
                        .call()
                        .context("scrape the agent")?;
                }
                child
            }
        };
        Ok(Some(child))
    }
}

fn start_profiler(bin: &std::path::Path, hz: u64, seconds: u32) -> Result<Child> {
    let mut child = Command::new(bin)
        .args([
            "profile",
            "--format",
            "json",
            "--frequency",
            &hz.to_string(),
        ])
        .args(["--duration", &(seconds + 1).to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("start cnitrace")?;
    // Traffic starts once the window is open (probes attached, start snapshot taken): its
    // line on stderr says so.
    let stderr = child.stderr.take().context("stderr")?;
    let mut reader = std::io::BufReader::new(stderr);
    let mut line = String::new();
    loop {
        line.clear();
        if std::io::BufRead::read_line(&mut reader, &mut line)? == 0 {
            bail!("cnitrace profile exited before its window opened");
        }
        if line.contains("profiling for") {
            break;
        }
    }
    thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    Ok(child)
}

/// Sum of `run_time_ns` and `run_cnt` over cnitrace's loaded programs (the kernel accounts them
/// while kernel.bpf_stats_enabled=1).
fn cnitrace_bpf_runtime() -> Result<(u64, u64)> {
    let out = Command::new("bpftool")
        .args(["--json", "prog", "show"])
        .output()
        .context("bpftool")?;
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool --json")?;
    let ours = progs.as_array().into_iter().flatten().filter(|p| {
        p["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("cnitrace_"))
    });
    Ok(ours.fold((0, 0), |(ns, cnt), p| {
        (
            ns + p["run_time_ns"].as_u64().unwrap_or(0),
            cnt + p["run_cnt"].as_u64().unwrap_or(0),
        )
    }))
}

/// User + system CPU seconds of a process, from /proc/PID/stat (fields 14 and 15).
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux architecture cnitrace targets.
    Some(ticks as f64 / 100.0)
}

/// Enables kernel.bpf_stats_enabled; restores the previous value on drop.
struct BpfStats {
    previous: String,
}

impl BpfStats {
    const PATH: &'static str = "/proc/sys/kernel/bpf_stats_enabled";

    fn enable() -> Result<Self> {
        let previous = std::fs::read_to_string(Self::PATH).context("read bpf_stats_enabled")?;
        std::fs::write(Self::PATH, "1").context("enable bpf_stats")?;
        Ok(Self { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, self.previous.trim());
    }
}

/// What one profiled run cost, measured by the kernel and /proc rather than inferred from
/// throughput (which varies far more between identical runs than the profiler's cost).
struct Cost {
    /// cnitrace's BPF programs' run time over the CPU time available (elapsed x CPUs).
    bpf_fraction: f64,
    bpf_runs_per_s: f64,
    /// The cnitrace process's own CPU time over the CPU time available.
    process_fraction: f64,
    /// cnitrace's BPF run time per second, and the stream's wire segments per second.
    bpf_ns_per_s: f64,
    segments_per_s: f64,
}

/// Busy CPU seconds of all CPUs so far. cpuidle's per-state residency (measured at each idle
/// entry and exit) where the kernel has it: busy is the time since boot no CPU spent idle.
/// /proc/stat's tick-sampled split is the fallback; on this VM (HZ=250, NO_HZ idle, a haltpoll
/// cpuidle driver) it read 46 to 2,500 busy ns per packet for the same fixed load.
pub(crate) fn busy_cpu_seconds() -> Result<f64> {
    if let Some(busy) = busy_by_cpuidle() {
        return Ok(busy);
    }
    busy_by_proc_stat()
}

/// Uptime x CPUs minus every CPU's residency in every idle state.
fn busy_by_cpuidle() -> Option<f64> {
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let mut cpus = 0u32;
    let mut idle_us = 0u64;
    for cpu in std::fs::read_dir("/sys/devices/system/cpu").ok()?.flatten() {
        let name = cpu.file_name().to_string_lossy().into_owned();
        if name
            .strip_prefix("cpu")
            .is_none_or(|n| n.parse::<u32>().is_err())
        {
            continue;
        }
        let states = std::fs::read_dir(cpu.path().join("cpuidle")).ok()?;
        cpus += 1;
        for state in states.flatten() {
            let time = std::fs::read_to_string(state.path().join("time")).ok()?;
            idle_us += time.trim().parse::<u64>().ok()?;
        }
    }
    (cpus > 0).then(|| uptime * f64::from(cpus) - idle_us as f64 / 1e6)
}

pub(crate) fn busy_by_proc_stat() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .context("empty /proc/stat")?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    // USER_HZ is 100 on every Linux architecture cnitrace targets.
    Ok((total - idle) as f64 / 100.0)
}

/// One run: throughput, and busy CPU seconds of the node during the iperf3 transfer.
struct Run {
    gbps: f64,
    busy_s: f64,
}

/// One iperf3 run beside `config`; with `cost`, cnitrace's in-kernel and process cost too.
fn measure(
    config: Config,
    bin: &std::path::Path,
    topo: &Topology,
    load: &Load,
    cpus: f64,
    cost: bool,
) -> Result<(Run, Option<Cost>)> {
    let seconds = load.seconds;
    let started = std::time::Instant::now();
    let profiler = config.start(bin, seconds)?;
    let busy_before = busy_cpu_seconds()?;
    let gbps = load.gbps(topo)?;
    let busy_s = busy_cpu_seconds()? - busy_before;
    let mut measured = None;
    if let Some(mut p) = profiler {
        if cost {
            // Read while the programs are still loaded (the window outlasts iperf3 by 1 s).
            let (run_ns, runs) = cnitrace_bpf_runtime()?;
            let process_s = process_cpu_seconds(p.id()).unwrap_or(0.0);
            let elapsed = started.elapsed().as_secs_f64();
            measured = Some(Cost {
                bpf_fraction: run_ns as f64 / 1e9 / (elapsed * cpus),
                bpf_runs_per_s: runs as f64 / elapsed,
                process_fraction: process_s / (elapsed * cpus),
                bpf_ns_per_s: run_ns as f64 / elapsed,
                segments_per_s: 0.0,
            });
        }
        if matches!(config, Config::AgentIdle | Config::AgentScraped) {
            let _ = Command::new("kill").arg(p.id().to_string()).status();
        }
        let status = p.wait()?;
        if !status.success() {
            bail!(
                "{} exited with {status} during the benchmark",
                config.label()
            );
        }
    }
    Ok((Run { gbps, busy_s }, measured))
}

/// The traffic of every run: saturating, or at a fixed offered rate.
struct Load {
    seconds: u32,
    target: Option<String>,
}

impl Load {
    fn gbps(&self, topo: &Topology) -> Result<f64> {
        let stream = match &self.target {
            None => topo.start_iperf3(self.seconds)?,
            Some(target) => topo.start_iperf3_with(self.seconds, &["-b", target.as_str()])?,
        };
        Ok(stream.finish()?)
    }
}

/// Two-sided 97.5% quantiles of Student's t for 1..=10 degrees of freedom.
const T_975: [f64; 10] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
];

/// Mean and 95% interval half-width (Student's t) of paired differences.
pub(crate) fn mean_ci(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n < 2 {
        return (values.first().copied().unwrap_or(f64::NAN), f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    // Past ten degrees of freedom, the normal's quantile.
    let t = T_975.get(n - 2).copied().unwrap_or(1.96);
    (mean, t * (var / n as f64).sqrt())
}

pub fn run(args: &Args) -> Result<()> {
    if !crate::is_root() {
        bail!("the benchmark needs root (network namespaces and BPF)");
    }
    bootstrap::ensure_bench()?;
    run_command(cargo().args(["build", "--release", "--package", "cnitrace"]))?;
    let bin = workspace_root().join("target/release/cnitrace");
    remove_stale();
    let topo = Topology::new(Shape::Bridged { rules: args.rules })?;
    let cpus = thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    // Configuration 0 is "nothing"; the others run beside the same traffic.
    let mut configs = vec![Config::Nothing, Config::NothingAgain];
    for &hz in &args.frequencies {
        configs.push(Config::Cnitrace(hz));
        if !args.cnitrace_only {
            configs.extend([Config::PerfRecord(hz), Config::Bpftrace(hz)]);
        }
    }
    if !args.cnitrace_only {
        configs.extend([Config::AgentIdle, Config::AgentScraped]);
    }
    let load = Load {
        seconds: args.seconds,
        target: args.target_gbps.map(|g| format!("{g}G")),
    };
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    // Busy CPU nanoseconds per wire segment, per configuration and round.
    let mut busy_per_packet: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut costs: Vec<Vec<Cost>> = (0..configs.len()).map(|_| Vec::new()).collect();
    for round in 0..args.rounds as usize {
        for step in 0..configs.len() {
            // Rotate the order each round so no configuration always runs first.
            let index = (step + round) % configs.len();
            let config = configs[index];
            let (run, _) = measure(config, &bin, &topo, &load, cpus, false)?;
            let segments = run.gbps * 1e9 / 8.0 / 1448.0 * f64::from(args.seconds);
            let ns_per_packet = run.busy_s * 1e9 / segments;
            eprintln!(
                "bench: round {}/{} {:>24}: {:.2} Gbit/s, {ns_per_packet:.0} busy ns/packet",
                round + 1,
                args.rounds,
                config.label(),
                run.gbps
            );
            results[index].push(run.gbps);
            busy_per_packet[index].push(ns_per_packet);
        }
    }
    // In-kernel cost: separate rounds with run-time statistics on (they tax every program,
    // so they never run during the throughput rounds above).
    {
        let _stats = BpfStats::enable()?;
        for _ in 0..args.rounds.min(3) {
            for (index, &config) in configs.iter().enumerate() {
                if matches!(
                    config,
                    Config::Cnitrace(_) | Config::AgentIdle | Config::AgentScraped
                ) {
                    let (run, cost) = measure(config, &bin, &topo, &load, cpus, true)?;
                    if let Some(mut cost) = cost {
                        // Wire segments of 1448 payload bytes: the packets of the stream.
                        cost.segments_per_s = run.gbps * 1e9 / 8.0 / 1448.0;
                        costs[index].push(cost);
                    }
                }
            }
        }
    }
    drop(topo);

    let mut out = String::new();
    let _ = writeln!(
        out,
        "\niperf3 over a bridged pod pair ({} FORWARD rules), {} rounds x {} s, A/B alternated, {cpus} CPUs",
        args.rules, args.rounds, args.seconds
    );
    let _ = writeln!(
        out,
        "{:<26} {:>13} {:>7} {:>7} {:>7} {:>15} {:>13} {:>12} {:>11} {:>12}",
        "configuration",
        "median Gbit/s",
        "min",
        "max",
        "ratio",
        "round ratios",
        "BPF CPU share",
        "process CPU",
        "BPF runs/s",
        "BPF ns/pkt"
    );
    for ((config, values), cost) in configs.iter().zip(&results).zip(&costs) {
        let mut v = values.clone();
        let m = median(&mut v);
        // Each round's run against the same round's run without a profiler: slow drifts of
        // the machine cancel, what is left is the noise the A/A row shows.
        let mut ratios: Vec<f64> = values.iter().zip(&results[0]).map(|(a, b)| a / b).collect();
        let ratio = median(&mut ratios);
        let label = config.label();
        let med = |f: &dyn Fn(&Cost) -> f64| {
            let mut values: Vec<f64> = cost.iter().map(f).collect();
            (!values.is_empty()).then(|| median(&mut values))
        };
        let pct =
            |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{:.3}%", v * 100.0));
        let _ = writeln!(
            out,
            "{label:<26} {m:>13.2} {:>7.2} {:>7.2} {ratio:>7.4} {:>15} {:>13} {:>12} {:>11} {:>12}",
            v.first().copied().unwrap_or_default(),
            v.last().copied().unwrap_or_default(),
            format!(
                "{:.3}-{:.3}",
                ratios.first().copied().unwrap_or_default(),
                ratios.last().copied().unwrap_or_default()
            ),
            pct(med(&|c| c.bpf_fraction)),
            pct(med(&|c| c.process_fraction)),
            med(&|c| c.bpf_runs_per_s).map_or_else(|| "-".to_owned(), |r| format!("{r:.0}")),
            med(&|c| c.bpf_ns_per_s / c.segments_per_s)
                .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}")),
        );
    }
    let _ = writeln!(
        out,
        "\nThroughput rounds: kernel.bpf_stats_enabled as found (0), no A/B side taxed by statistics; ratio = median over rounds of the run / the same round's `no profiler` run (round ratios: lowest-highest).\n\
         BPF CPU share, runs/s, ns/pkt: run_time_ns of cnitrace's programs over elapsed x CPUs, per second, and per wire segment of the stream, in separate rounds with kernel.bpf_stats_enabled=1 (restored after)."
    );
    let _ = writeln!(
        out,
        "process CPU: utime+stime of the profiler process over elapsed x CPUs."
    );
    if args.target_gbps.is_some() {
        fixed_load_table(&mut out, &configs, &busy_per_packet, args);
    }
    crate::report::publish(
        if args.target_gbps.is_some() {
            "overhead-fixed-load"
        } else {
            "overhead"
        },
        &out,
    )
}

/// Busy CPU per packet of the whole node at a fixed offered load: what each configuration
/// adds over the same round's run without a profiler, with a 95% interval over rounds, and
/// that cost per sample taken.
fn fixed_load_table(out: &mut String, configs: &[Config], busy: &[Vec<f64>], args: &Args) {
    let cpus = thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    let _ = writeln!(
        out,
        "\nFixed load: iperf3 -b {}G, busy CPU per packet of the whole node (cpuidle residency), {} rounds",
        args.target_gbps.unwrap_or_default(),
        args.rounds
    );
    let _ = writeln!(
        out,
        "{:<26} {:>12} {:>22} {:>20}",
        "configuration", "busy ns/pkt", "added ns/pkt (95% CI)", "added us/sample"
    );
    for (config, values) in configs.iter().zip(busy) {
        let added: Vec<f64> = values.iter().zip(&busy[0]).map(|(a, b)| a - b).collect();
        let (mean, half) = mean_ci(&added);
        let base = values.iter().sum::<f64>() / values.len().max(1) as f64;
        // Added busy ns per packet x packets per second = added busy ns per second of the
        // node; over the samples per second of the node: the cost of one sample.
        let packets_per_s = args.target_gbps.unwrap_or_default() * 1e9 / 8.0 / 1448.0;
        let per_sample = match config.rate_hz() {
            0 => "-".to_owned(),
            hz => format!("{:.1}", mean * packets_per_s / (hz as f64 * cpus) / 1e3),
        };
        let _ = writeln!(
            out,
            "{:<26} {base:>12.0} {:>22} {per_sample:>20}",
            config.label(),
            format!("{mean:+.1} ± {half:.1}")
        );
    }
    let _ = writeln!(
        out,
        "added: each round's run minus the same round's `no profiler` run; mean over rounds ± the 95% half-width (Student's t). The A/A row is the noise floor. Per sample: added busy time per second over samples per second (rate x CPUs)."
    );
}
