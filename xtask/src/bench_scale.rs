//! Scale: the agent's in-kernel cost and memory as the pods on a bridge (2 to 100) and the
//! concurrent TCP connections (1 to 1500) grow.

use std::{thread, time::Duration};

use std::fmt::Write as _;

use anyhow::{Context as _, Result, bail};
use cnitrace_tests::{AgentProcess, Flow, Shape, Stream, Topology, remove_stale};
use serde_json::{Value, json};

use crate::{bootstrap, cargo, run_command, workspace_root};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, value_delimiter = ',', default_values_t = vec![2usize, 10, 50, 100])]
    pods: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 100, 500, 1500])]
    connections: Vec<usize>,
    #[arg(long, default_value_t = 6)]
    seconds: u32,
}

struct Point {
    label: String,
    gbps: f64,
    probe_runs_per_s: f64,
    probe_cost_ns: f64,
    bpf_share: f64,
    rss_mb: f64,
    peak_mb: f64,
    lost: u64,
}

fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// One session of the agent around `flows`, started just before.
fn measure(agent: &AgentProcess, label: String, flows: Vec<Stream>, seconds: u32) -> Result<Point> {
    thread::sleep(Duration::from_millis(800));
    let (status, body) = agent.request("POST", "/api/v1/sessions", Some(&json!({})))?;
    if status != 201 {
        bail!("session: {status} {body}");
    }
    let id = serde_json::from_str::<Value>(&body)?["id"]
        .as_u64()
        .context("id")?;
    thread::sleep(Duration::from_secs(
        u64::from(seconds.saturating_sub(2)).max(1),
    ));
    let (status, body) = agent.request("POST", &format!("/api/v1/sessions/{id}/stop"), None)?;
    if status != 200 {
        bail!("stop: {status} {body}");
    }
    let mut gbps = 0.0;
    for flow in flows {
        gbps += flow.finish()?;
    }
    let b = &serde_json::from_str::<Value>(&body)?["breakdown"];
    let q = &b["quality"];
    let duration = b["window"]["duration_s"].as_f64().unwrap_or(1.0);
    let runs = q["probe_runs"].as_f64().unwrap_or(0.0);
    let cost = q["probe_cost_ns"].as_f64().unwrap_or(0.0);
    let cpus = thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    let pid = agent.pid().context("pid")?;
    Ok(Point {
        label,
        gbps,
        probe_runs_per_s: runs / duration,
        probe_cost_ns: cost,
        bpf_share: runs * cost / 1e9 / (duration * cpus),
        rss_mb: status_kb(pid, "VmRSS:") as f64 / 1024.0,
        peak_mb: status_kb(pid, "VmHWM:") as f64 / 1024.0,
        lost: q["lost"].as_u64().unwrap_or(0),
    })
}

pub fn run(args: &Args) -> Result<()> {
    if !crate::is_root() {
        bail!("the scale benchmark needs root");
    }
    bootstrap::ensure()?;
    run_command(cargo().args(["build", "--release", "--package", "cnitrace"]))?;
    let bin = workspace_root().join("target/release/cnitrace");
    remove_stale();
    let mut points = Vec::new();
    for &pods in &args.pods {
        let mut topo = Topology::new(Shape::Bridged { rules: 0 })?;
        let extra = topo.add_pods(pods.saturating_sub(2))?;
        let agent = AgentProcess::start_binary(&bin, &[])?;
        // One flow between the base pair, and one between each further pair of pods, sharing
        // the machine: every pod sends or receives.
        let mut flows = vec![topo.start_iperf3(args.seconds)?];
        for pair in extra.chunks_exact(2) {
            flows.push(
                Flow::new(&pair[0].0, &pair[1].0, pair[1].1, args.seconds)
                    .client_args(&["-b", "200M"])
                    .start()?,
            );
        }
        eprintln!("bench: {pods} pods, {} flows", flows.len());
        points.push(measure(
            &agent,
            format!("{pods} pods"),
            flows,
            args.seconds,
        )?);
        drop(agent);
        drop(topo);
    }
    for &connections in &args.connections {
        let topo = Topology::new(Shape::Bridged { rules: 0 })?;
        let agent = AgentProcess::start_binary(&bin, &[])?;
        // iperf3 takes at most 128 streams per process: several processes on several ports.
        let mut flows = Vec::new();
        let mut left = connections;
        let mut port = 5201;
        while left > 0 {
            let streams = left.min(125);
            let p = streams.to_string();
            flows.push(
                Flow::new(&topo.client, &topo.server, topo.server_ip, args.seconds)
                    .port(port)
                    .client_args(&["-P", &p])
                    .start()?,
            );
            left -= streams;
            port += 1;
        }
        eprintln!(
            "bench: {connections} connections in {} iperf3 processes",
            flows.len()
        );
        points.push(measure(
            &agent,
            format!("{connections} connections"),
            flows,
            args.seconds,
        )?);
        drop(agent);
        drop(topo);
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nscale: cnitrace agent (release, 999 Hz) with one session per point, {} s each",
        args.seconds
    );
    let _ = writeln!(
        out,
        "{:<18} {:>8} {:>14} {:>10} {:>11} {:>9} {:>9} {:>6}",
        "point", "Gbit/s", "probe runs/s", "ns/run", "BPF share", "RSS MB", "peak MB", "lost"
    );
    for p in &points {
        let _ = writeln!(
            out,
            "{:<18} {:>8.2} {:>14.0} {:>10.0} {:>10.2}% {:>9.1} {:>9.1} {:>6}",
            p.label,
            p.gbps,
            p.probe_runs_per_s,
            p.probe_cost_ns,
            p.bpf_share * 100.0,
            p.rss_mb,
            p.peak_mb,
            p.lost
        );
    }
    let _ = writeln!(
        out,
        "\nBPF share: cnitrace's probe runs x mean cost (bpf_stats, on during the session) over the window x CPUs."
    );
    crate::report::publish("scale", &out)
}
