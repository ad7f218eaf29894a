//! Agent benchmark: resident memory, idle CPU, and the time from a stop request to the
//! breakdown in the response, on the release binary.

use std::{thread, time::Duration, time::Instant};

use std::fmt::Write as _;

use anyhow::{Context as _, Result, bail};
use cnitrace_tests::{AgentProcess, Shape, Topology, remove_stale};
use serde_json::json;

use crate::{bootstrap, cargo, run_command, workspace_root};

#[derive(clap::Args)]
pub struct Args {
    /// Seconds the agent is left idle to measure its CPU use.
    #[arg(long, default_value_t = 20)]
    idle_seconds: u64,
    /// Session stop requests timed under iperf3 load.
    #[arg(long, default_value_t = 7)]
    stops: u32,
}

/// A `/proc/PID/status` field in kB (VmRSS, VmHWM, ...).
pub fn status_kb(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{field} missing"))
}

fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

pub fn run(args: &Args) -> Result<()> {
    if !crate::is_root() {
        bail!("the agent benchmark needs root");
    }
    bootstrap::ensure()?;
    run_command(cargo().args(["build", "--release", "--package", "cnitrace"]))?;
    let bin = workspace_root().join("target/release/cnitrace");
    remove_stale();
    let agent = AgentProcess::start_binary(&bin, &[])?;
    let pid = agent.pid().context("agent pid")?;
    thread::sleep(Duration::from_secs(2));
    let cpu0 = cpu_seconds(pid)?;
    let t0 = Instant::now();
    thread::sleep(Duration::from_secs(args.idle_seconds));
    let idle_cpu = (cpu_seconds(pid)? - cpu0) / t0.elapsed().as_secs_f64();
    let idle_rss = status_kb(pid, "VmRSS:")?;
    let startup_peak = status_kb(pid, "VmHWM:")?;

    let topo = Topology::new(Shape::Bridged { rules: 100 })?;
    let mut stop_ms = Vec::new();
    for _ in 0..args.stops {
        let traffic = topo.start_iperf3(4)?;
        thread::sleep(Duration::from_millis(500));
        let (status, body) = agent.request("POST", "/api/v1/sessions", Some(&json!({})))?;
        if status != 201 {
            bail!("session start: {status} {body}");
        }
        let id = serde_json::from_str::<serde_json::Value>(&body)?["id"]
            .as_u64()
            .context("id")?;
        thread::sleep(Duration::from_secs(2));
        let t = Instant::now();
        let (status, body) = agent.request("POST", &format!("/api/v1/sessions/{id}/stop"), None)?;
        stop_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if status != 200 {
            bail!("session stop: {status} {body}");
        }
        traffic.finish()?;
    }
    let peak_rss = status_kb(pid, "VmHWM:")?;
    drop(topo);
    let status = agent.terminate()?;
    let mut out = String::new();
    stop_ms.sort_by(f64::total_cmp);
    let _ = writeln!(
        out,
        "\ncnitrace agent (release), 999 Hz sampling, default limits"
    );
    let _ = writeln!(
        out,
        "idle CPU over {} s:            {:.3}% of one core",
        args.idle_seconds,
        idle_cpu * 100.0
    );
    let _ = writeln!(
        out,
        "RSS idle:                     {:.1} MB",
        idle_rss as f64 / 1024.0
    );
    let _ = writeln!(
        out,
        "RSS peak before any session:  {:.1} MB (start-up: BTF parse, symbols)",
        startup_peak as f64 / 1024.0
    );
    let _ = writeln!(
        out,
        "RSS peak (after {} sessions): {:.1} MB",
        args.stops,
        peak_rss as f64 / 1024.0
    );
    let _ = writeln!(
        out,
        "stop -> breakdown in response: median {:.0} ms, min {:.0} ms, max {:.0} ms ({} stops under iperf3)",
        stop_ms[stop_ms.len() / 2],
        stop_ms[0],
        stop_ms[stop_ms.len() - 1],
        stop_ms.len()
    );
    let _ = writeln!(out, "SIGTERM exit: {status}");
    crate::report::publish("agent", &out)
}
