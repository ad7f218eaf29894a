//! Fidelity and cost against the usual method (perf record -a -g): on the same iperf3 traffic and the same
//! window, cnitrace's component shares vs `perf record -a -g` classified by the same taxonomy
//! (`cnitrace import-perf`), and what each costs to produce a result.

use std::{
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use std::fmt::Write as _;

use anyhow::{Context as _, Result, bail};
use cnitrace_tests::{Shape, Topology, remove_stale};
use serde_json::Value;

use crate::{bootstrap, cargo, run_command, workspace_root};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 3)]
    runs: u32,
    #[arg(long, default_value_t = 8)]
    seconds: u32,
    #[arg(long, default_value_t = 200)]
    rules: usize,
    #[arg(long, default_value_t = 999)]
    frequency: u64,
}

/// One run's costs: cnitrace, perf record, perf script (GNU time), then seconds from the window's
/// end to cnitrace's result and to perf's result.
type RunCosts = (Cost, Cost, Cost, f64, f64);

/// Wall, user, system seconds and max RSS (KB) of a command, from GNU time.
struct Cost {
    wall: f64,
    cpu: f64,
    max_rss_kb: u64,
}

fn timed(out: &Path) -> Command {
    let mut command = Command::new("/usr/bin/time");
    command.args(["-f", "%e %U %S %M", "-o"]).arg(out);
    command
}

fn read_cost(path: &Path) -> Result<Cost> {
    let text = std::fs::read_to_string(path)?;
    let last = text.lines().last().context("empty time output")?;
    let f: Vec<f64> = last
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    if f.len() < 4 {
        bail!("unexpected GNU time output: {last}");
    }
    Ok(Cost {
        wall: f[0],
        cpu: f[1] + f[2],
        max_rss_kb: f[3] as u64,
    })
}

fn shares(b: &Value) -> Vec<(String, f64)> {
    b["components"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or("").to_owned(),
                c["share"].as_f64().unwrap_or(0.0),
            )
        })
        .collect()
}

pub fn run(args: &Args) -> Result<()> {
    if !crate::is_root() {
        bail!("the fidelity benchmark needs root");
    }
    bootstrap::ensure()?;
    run_command(cargo().args(["build", "--release", "--package", "cnitrace"]))?;
    let bin = workspace_root().join("target/release/cnitrace");
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    remove_stale();
    let topo = Topology::new(Shape::Bridged { rules: args.rules })?;
    let (hz, secs) = (args.frequency.to_string(), args.seconds.to_string());
    let mut diffs: Vec<Vec<(String, f64, f64)>> = Vec::new();
    let mut costs: Vec<RunCosts> = Vec::new();
    for run in 1..=args.runs {
        let traffic = topo.start_iperf3(args.seconds + 3)?;
        thread::sleep(Duration::from_millis(700));
        let perf_data = dir.join("perf.data");
        let (ours_time, perf_time) = (dir.join("cnitrace.time"), dir.join("perf-record.time"));
        let perf = timed(&perf_time)
            .args([
                "perf",
                "record",
                "-q",
                "-a",
                "-g",
                "-e",
                "cpu-clock",
                "-F",
                &hz,
                "-o",
            ])
            .arg(&perf_data)
            .args(["--", "sleep", &secs])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let ours = timed(&ours_time)
            .arg(&bin)
            .args([
                "profile",
                "--format",
                "json",
                "--frequency",
                &hz,
                "--duration",
                &secs,
            ])
            .args(["--iface", &topo.client_iface, "--netns", &topo.client])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let ours = ours.wait_with_output()?;
        let ours_done = chrono::Utc::now();
        let perf_status = perf.wait_with_output()?.status;
        traffic.finish()?;
        if !ours.status.success() || !perf_status.success() {
            bail!("run {run}: cnitrace {} / perf {perf_status}", ours.status);
        }
        // perf's post-processing: perf script, then the same taxonomy.
        let t = Instant::now();
        let script_time = dir.join("perf-script.time");
        let script = timed(&script_time)
            .args(["perf", "script", "-i"])
            .arg(&perf_data)
            .args(["-F", "comm,pid,tid,cpu,period,event,ip,sym,dso"])
            .stderr(Stdio::null())
            .output()?;
        let script_path = dir.join("perf.script");
        std::fs::write(&script_path, &script.stdout)?;
        let import = Command::new(&bin)
            .arg("import-perf")
            .arg(&script_path)
            .args(["--duration", &secs, "--frequency", &hz, "--format", "json"])
            .output()?;
        let perf_result_s = t.elapsed().as_secs_f64();
        if !import.status.success() {
            bail!("import-perf: {}", String::from_utf8_lossy(&import.stderr));
        }
        let ours_json: Value = serde_json::from_slice(&ours.stdout)?;
        let perf_json: Value = serde_json::from_slice(&import.stdout)?;
        let perf_shares = shares(&perf_json);
        let row: Vec<(String, f64, f64)> = shares(&ours_json)
            .into_iter()
            .map(|(name, ours)| {
                let reference = perf_shares
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or(0.0, |(_, s)| *s);
                (name, ours, reference)
            })
            .collect();
        eprintln!(
            "bench: run {run}/{}: {} components compared",
            args.runs,
            row.len()
        );
        diffs.push(row);
        let (ours_cost, record_cost, script_cost) = (
            read_cost(&ours_time)?,
            read_cost(&perf_time)?,
            read_cost(&script_time)?,
        );
        // From the window's end, as cnitrace itself recorded it, to the process handing over the
        // breakdown (start-up before the window is not part of it).
        let window_end = ours_json["window"]["end"]
            .as_str()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .context("window.end")?;
        let ours_after_window =
            (ours_done - window_end.with_timezone(&chrono::Utc)).num_milliseconds() as f64 / 1000.0;
        costs.push((
            ours_cost,
            record_cost,
            script_cost,
            ours_after_window,
            perf_result_s,
        ));
    }
    drop(topo);

    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nfidelity: shares of busy cycles, cnitrace vs perf record -a -g -e cpu-clock -F {hz} on the same window\n\
         ({} runs x {} s, iperf3 through a bridged pod pair with {} FORWARD rules; both at {hz} Hz at once)",
        args.runs, args.seconds, args.rules
    );
    let _ = writeln!(
        out,
        "{:<16} {:>16} {:>16} {:>22}",
        "component", "cnitrace (mean)", "perf (mean)", "diff pp (mean, max)"
    );
    for (index, (name, _, _)) in diffs[0].iter().enumerate() {
        let ours: Vec<f64> = diffs.iter().map(|r| r[index].1).collect();
        let reference: Vec<f64> = diffs.iter().map(|r| r[index].2).collect();
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let d: Vec<f64> = ours
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b) * 100.0)
            .collect();
        let max = d
            .iter()
            .copied()
            .fold(0.0_f64, |m, x| if x.abs() > m.abs() { x } else { m });
        let _ = writeln!(
            out,
            "{name:<16} {:>15.2}% {:>15.2}% {:>+12.2} {:>+8.2}",
            mean(&ours) * 100.0,
            mean(&reference) * 100.0,
            mean(&d),
            max
        );
    }
    let _ = writeln!(out, "\ncost of one result (median of {} runs)", costs.len());
    let med = |f: &dyn Fn(&RunCosts) -> f64| {
        let mut v: Vec<f64> = costs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let _ = writeln!(
        out,
        "cnitrace profile:          CPU {:.2} s, peak RSS {:.1} MB, breakdown {:.0} ms after the window",
        med(&|c| c.0.cpu),
        med(&|c| c.0.max_rss_kb as f64) / 1024.0,
        med(&|c| c.3) * 1000.0
    );
    let _ = writeln!(
        out,
        "perf record + perf script: CPU {:.2} s + {:.2} s, peak RSS {:.1} MB / {:.1} MB, result {:.0} ms after the window",
        med(&|c| c.1.cpu),
        med(&|c| c.2.cpu),
        med(&|c| c.1.max_rss_kb as f64) / 1024.0,
        med(&|c| c.2.max_rss_kb as f64) / 1024.0,
        med(&|c| c.4) * 1000.0
    );
    let _ = writeln!(
        out,
        "(perf's wall times: record {:.1} s, script {:.1} s)",
        med(&|c| c.1.wall),
        med(&|c| c.2.wall)
    );
    crate::report::publish("fidelity", &out)
}
