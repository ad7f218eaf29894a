//! `cargo xtask bench-flame`: what flame graphs cost and what they show. The release agent
//! profiles an iperf3 stream through a bridged pod pair with 1000 FORWARD rules, then with
//! none; prints the time from a stopped session to each artefact (SVG, pprof, folded), their
//! sizes, the agent's RSS before and after, and the cost of keeping stacks in a CLI window
//! (alternated A/B with an A/A row). Writes docs/flamegraph.svg and the differential graph
//! docs/diff-0-vs-1000-rules.svg.

use std::{
    fmt::Write as _,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use cnitrace_tests::{AgentProcess, Shape, Topology, remove_stale};
use serde_json::{Value, json};

use crate::{bench_agent::status_kb, bootstrap, cargo, report, run_command, workspace_root};

#[derive(clap::Args)]
pub struct Args {
    /// Seconds of each session window.
    #[arg(long, default_value_t = 10)]
    window: u64,
    /// Timed requests per artefact (the median is reported).
    #[arg(long, default_value_t = 5)]
    requests: usize,
    /// Alternated CLI windows per configuration for the cost of keeping stacks.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A stopped session of `seconds` over a running iperf3 stream; returns its id.
fn session(agent: &AgentProcess, topo: &Topology, seconds: u64) -> Result<u64> {
    let traffic = topo.start_iperf3(u32::try_from(seconds)? + 3)?;
    thread::sleep(Duration::from_millis(700));
    let request = json!({"ifaces": [topo.client_iface], "netns": [topo.client]});
    let (status, body) = agent.request("POST", "/api/v1/sessions", Some(&request))?;
    if status != 201 {
        bail!("start session: {status} {body}");
    }
    let id = serde_json::from_str::<Value>(&body)?["id"]
        .as_u64()
        .context("session id")?;
    thread::sleep(Duration::from_secs(seconds));
    let (status, body) = agent.request("POST", &format!("/api/v1/sessions/{id}/stop"), None)?;
    traffic.finish()?;
    if status != 200 {
        bail!("stop session: {status} {body}");
    }
    Ok(id)
}

/// Times GET `path` (median of `n`) and returns the body's size in bytes.
fn timed_get(agent: &AgentProcess, path: &str, n: usize) -> Result<(f64, usize, Vec<u8>)> {
    let client: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut times = Vec::new();
    let mut body = Vec::new();
    for _ in 0..n {
        let started = Instant::now();
        let mut response = client
            .get(format!("{}{path}", agent.url))
            .header("Authorization", &format!("Bearer {}", agent.token))
            .call()?;
        if response.status() != 200 {
            bail!("GET {path}: {}", response.status());
        }
        body = response.body_mut().read_to_vec()?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok((median(times), body.len(), body))
}

/// Wall seconds of one `cnitrace profile` window over a stream, with or without stacks.
fn cli_window(bin: &std::path::Path, topo: &Topology, stacks: bool) -> Result<f64> {
    let traffic = topo.start_iperf3(6)?;
    thread::sleep(Duration::from_millis(700));
    let mut command = Command::new(bin);
    command.args(["profile", "--duration", "3", "--format", "json"]);
    command.args(["--iface", &topo.client_iface, "--netns", &topo.client]);
    if stacks {
        command.arg("--stacks");
    }
    let started = Instant::now();
    let out = command.output()?;
    let wall = started.elapsed().as_secs_f64();
    traffic.finish()?;
    if !out.status.success() {
        bail!("profile: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(wall)
}

pub fn run(args: &Args) -> Result<()> {
    if !crate::is_root() {
        bail!("bench-flame needs root (BPF, namespaces)");
    }
    bootstrap::ensure()?;
    run_command(cargo().args(["build", "--release", "--package", "cnitrace"]))?;
    let bin = workspace_root().join("target/release/cnitrace");
    remove_stale();
    let topo = Topology::new(Shape::Bridged { rules: 1000 }).context("topology")?;
    let agent = AgentProcess::start_binary(&bin, &[])?;
    let pid = agent.pid().context("agent pid")?;
    let rss_idle = status_kb(pid, "VmRSS:")?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "flame graphs: release agent at 999 Hz, iperf3 through a bridged pod pair, {} s sessions",
        args.window
    );

    let with_rules = session(&agent, &topo, args.window)?;
    let docs = workspace_root().join("docs");
    let _ = writeln!(
        out,
        "artefact of a stopped session (1000 FORWARD rules), median of {} requests:",
        args.requests
    );
    for (name, path) in [
        ("flame graph SVG", "flamegraph.svg"),
        ("pprof (gzip)", "profile.pb.gz"),
        ("folded stacks", "folded"),
    ] {
        let (ms, bytes, body) = timed_get(
            &agent,
            &format!("/api/v1/sessions/{with_rules}/{path}"),
            args.requests,
        )?;
        let _ = writeln!(
            out,
            "  {name:<16} {ms:>7.1} ms {:>8.1} KB",
            bytes as f64 / 1024.0
        );
        if path == "flamegraph.svg" {
            std::fs::write(docs.join("flamegraph.svg"), &body)?;
        }
        if path == "folded" {
            let _ = writeln!(
                out,
                "  ({} distinct stacks)",
                String::from_utf8_lossy(&body).lines().count()
            );
        }
    }

    // The same pair without rules, then the difference.
    run_command(
        Command::new("ip").args(["netns", "exec", &topo.node, "iptables", "-F", "FORWARD"]),
    )?;
    let without = session(&agent, &topo, args.window)?;
    let token_file = cnitrace_tests::private_token_file("bench-flame", &agent.token)?;
    let diff_svg = docs.join("diff-0-vs-1000-rules.svg");
    let started = Instant::now();
    let diff = Command::new(&bin)
        .args(["diff", "--agent", &agent.url, "--token-file"])
        .arg(&token_file)
        .args([
            &without.to_string(),
            &with_rules.to_string(),
            "--flamegraph",
        ])
        .arg(&diff_svg)
        .output()?;
    let diff_s = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(token_file.parent().context("token dir")?);
    if !diff.status.success() {
        bail!("diff: {}", String::from_utf8_lossy(&diff.stderr));
    }
    let _ = writeln!(
        out,
        "cnitrace diff --agent (two sessions fetched, compared, differential SVG): {:.2} s, SVG {:.1} KB",
        diff_s,
        std::fs::metadata(&diff_svg)?.len() as f64 / 1024.0
    );
    let diff_text = String::from_utf8_lossy(&diff.stdout);
    let _ = writeln!(out, "diff, no rules -> 1000 rules:");
    for line in diff_text.lines().filter(|l| !l.trim().is_empty()).take(40) {
        let _ = writeln!(out, "  {line}");
    }
    let rss_after = status_kb(pid, "VmRSS:")?;
    let _ = writeln!(
        out,
        "agent RSS: {:.1} MB before any session, {:.1} MB after two sessions with their stacks kept",
        rss_idle as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    let status = agent.terminate()?;
    if !status.success() {
        bail!("agent exit: {status:?}");
    }

    // What keeping stacks adds to a CLI window: alternated, with an A/A row.
    let mut plain = Vec::new();
    let mut plain_again = Vec::new();
    let mut stacks = Vec::new();
    for _ in 0..args.rounds {
        plain.push(cli_window(&bin, &topo, false)?);
        stacks.push(cli_window(&bin, &topo, true)?);
        plain_again.push(cli_window(&bin, &topo, false)?);
    }
    let (a, a2, b) = (median(plain), median(plain_again), median(stacks));
    let _ = writeln!(
        out,
        "profile --duration 3 wall time (median of {}): without stacks {a:.3} s, again {a2:.3} s \
         (A/A ratio {:.3}), with --stacks {b:.3} s (ratio {:.3})",
        args.rounds,
        a2 / a,
        b / a
    );
    drop(topo);
    report::publish("flame", &out)
}
