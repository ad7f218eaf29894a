//! `cargo xtask bench-soak`: the agent (release) under everything a node throws at it for a
//! long while: sessions opened and stopped without pause (some left to expire), two
//! Prometheus scrapers every second, the page polling, veth pairs created and deleted by the
//! thousand, iperf3 traffic through a bridged pod pair. Prints RSS over time, liveness,
//! request failures, lost samples, whether every session names the devices its traffic
//! crossed, then SIGTERM and what is left.

use std::{
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use cnitrace_tests::{
    AgentProcess, PREFIX, Shape, Topology, programs_left_after_exit, remove_stale,
};
use serde_json::{Value, json};

use crate::{bench_agent::status_kb, bootstrap, cargo, report, run_command, workspace_root};

#[derive(clap::Args)]
pub struct Args {
    /// Minutes of soak.
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// veth pairs created and deleted over the run.
    #[arg(long, default_value_t = 5000)]
    pairs: u64,
    /// Who scrapes `/metrics`: two scrapers every second, nobody, or two with a wrong token
    /// (a scraper left behind by a token rotation).
    #[arg(long, value_enum, default_value_t = Scrapers::Two)]
    scrapers: Scrapers,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum Scrapers {
    Two,
    None,
    Unauthorized,
}

#[derive(Default)]
struct Counts {
    sessions_started: AtomicU64,
    sessions_stopped: AtomicU64,
    scrapes: AtomicU64,
    polls: AtomicU64,
    pairs: AtomicU64,
    failures: AtomicU64,
    health_checks: AtomicU64,
    health_failures: AtomicU64,
    health_worst_ms: AtomicU64,
    /// Stopped sessions that carried traffic, and those among them whose denominator named a
    /// device outside the pod pair (a churned veth, or a dead device's reused name).
    sessions_with_traffic: AtomicU64,
    sessions_misnamed: AtomicU64,
}

/// The interface names of the pod pair's namespaces: the only devices traffic crosses.
fn topology_devices(topo: &Topology) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for ns in [&topo.node, &topo.client, &topo.server] {
        let out = std::process::Command::new("ip")
            .args(["-n", ns, "-o", "link", "show"])
            .output()?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // `2: ca1b@if3: <...>`
            if let Some(name) = line.split(": ").nth(1) {
                names.push(name.split('@').next().unwrap_or(name).to_owned());
            }
        }
    }
    Ok(names)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Deletes the churn namespace on drop, also when the soak fails.
struct Namespace(String);

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

pub fn run(args: &Args) -> Result<()> {
    if !crate::is_root() {
        bail!("the soak needs root");
    }
    bootstrap::ensure()?;
    run_command(cargo().args(["build", "--release", "--package", "cnitrace"]))?;
    let bin = workspace_root().join("target/release/cnitrace");
    remove_stale();
    let topo = Topology::new(Shape::Bridged { rules: 20 }).context("topology")?;
    let devices = Arc::new(topology_devices(&topo)?);
    let churn_ns = Namespace(format!("{PREFIX}{}-soak", std::process::id()));
    run_command(std::process::Command::new("ip").args(["netns", "add", &churn_ns.0]))?;
    let agent = Arc::new(AgentProcess::start_binary(&bin, &[])?);
    let pid = agent.pid().context("agent pid")?;
    let duration = Duration::from_secs(args.minutes * 60);
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let rss = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
    let mut workers = Vec::new();

    // Sessions: open and stop without pause; every fifth is given 2 s and left to expire.
    workers.push({
        let (agent, stop, counts) = (Arc::clone(&agent), Arc::clone(&stop), Arc::clone(&counts));
        let devices = Arc::clone(&devices);
        thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let body = if n.is_multiple_of(5) {
                    json!({"duration_s": 2})
                } else {
                    json!({})
                };
                match agent.request("POST", "/api/v1/sessions", Some(&body)) {
                    Ok((201, text)) => {
                        counts.sessions_started.fetch_add(1, Ordering::Relaxed);
                        thread::sleep(Duration::from_millis(500));
                        if !n.is_multiple_of(5) {
                            let id = serde_json::from_str::<Value>(&text)
                                .ok()
                                .and_then(|v| v["id"].as_u64())
                                .unwrap_or(0);
                            match agent.request(
                                "POST",
                                &format!("/api/v1/sessions/{id}/stop"),
                                None,
                            ) {
                                Ok((200, text)) => {
                                    counts.sessions_stopped.fetch_add(1, Ordering::Relaxed);
                                    let view: Value =
                                        serde_json::from_str(&text).unwrap_or_default();
                                    let packets = &view["breakdown"]["packets"];
                                    // With iperf3 running the busiest device is on its path;
                                    // between streams it may be anything, so only windows
                                    // with traffic are judged.
                                    if packets["segments"].as_u64().unwrap_or(0) > 50_000 {
                                        counts
                                            .sessions_with_traffic
                                            .fetch_add(1, Ordering::Relaxed);
                                        let named = packets["interfaces"]
                                            .as_array()
                                            .into_iter()
                                            .flatten()
                                            .filter_map(Value::as_str)
                                            .all(|i| {
                                                let name = i.split_whitespace().next().unwrap_or(i);
                                                devices.iter().any(|d| d == name)
                                            });
                                        if !named {
                                            counts
                                                .sessions_misnamed
                                                .fetch_add(1, Ordering::Relaxed);
                                            eprintln!("soak: misnamed device: {packets}");
                                        }
                                    }
                                }
                                _ => {
                                    counts.failures.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                    // 429 while the expiring ones still hold slots is the agent working.
                    Ok((429, _)) => thread::sleep(Duration::from_millis(500)),
                    _ => {
                        counts.failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    });
    // Two scrapers every second (or none, or two refused), and the page's polling every two.
    for _ in 0..if args.scrapers == Scrapers::None {
        0
    } else {
        2
    } {
        let (agent, stop, counts) = (Arc::clone(&agent), Arc::clone(&stop), Arc::clone(&counts));
        let refused = args.scrapers == Scrapers::Unauthorized;
        workers.push(thread::spawn(move || {
            let url = format!("{}/metrics", agent.url);
            while !stop.load(Ordering::Relaxed) {
                let answer = if refused {
                    cnitrace_tests::http("GET", &url, Some("a-token-that-was-rotated-away"), None)
                } else {
                    agent.request("GET", "/metrics", None)
                };
                match (answer, refused) {
                    (Ok((200, _)), false) | (Ok((401, _)), true) => {
                        counts.scrapes.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => counts.failures.fetch_add(1, Ordering::Relaxed),
                };
                thread::sleep(Duration::from_secs(1));
            }
        }));
    }
    workers.push({
        let (agent, stop, counts) = (Arc::clone(&agent), Arc::clone(&stop), Arc::clone(&counts));
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for path in ["/", "/api/v1/breakdown?window=10", "/api/v1/sessions"] {
                    match agent.request("GET", path, None) {
                        // 409: the rolling window's first read starts its ring.
                        Ok((200 | 409, _)) => counts.polls.fetch_add(1, Ordering::Relaxed),
                        _ => counts.failures.fetch_add(1, Ordering::Relaxed),
                    };
                }
                thread::sleep(Duration::from_secs(2));
            }
        })
    });
    // Liveness, timed, as the kubelet asks it.
    workers.push({
        let (agent, stop, counts) = (Arc::clone(&agent), Arc::clone(&stop), Arc::clone(&counts));
        thread::spawn(move || {
            let client: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(1)))
                .build()
                .into();
            while !stop.load(Ordering::Relaxed) {
                let asked = Instant::now();
                let ok = client.get(format!("{}/healthz", agent.url)).call().is_ok();
                let ms = asked.elapsed().as_millis() as u64;
                counts.health_checks.fetch_add(1, Ordering::Relaxed);
                counts.health_worst_ms.fetch_max(ms, Ordering::Relaxed);
                if !ok {
                    counts.health_failures.fetch_add(1, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_secs(1));
            }
        })
    });
    // veth churn, paced to spread the pairs over the run.
    workers.push({
        let (stop, counts, ns) = (Arc::clone(&stop), Arc::clone(&counts), churn_ns.0.clone());
        let pace = duration.div_f64(args.pairs.max(1) as f64);
        thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (a, b) = (format!("sk{n}a"), format!("sk{n}b"));
                let ip = |args: &[&str]| {
                    std::process::Command::new("ip")
                        .args(["-n", &ns])
                        .args(args)
                        .status()
                        .is_ok_and(|s| s.success())
                };
                let ok = ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])
                    && ip(&["link", "set", &a, "up"])
                    && ip(&["link", "set", &b, "up"])
                    && ip(&["link", "del", &a]);
                if ok {
                    counts.pairs.fetch_add(1, Ordering::Relaxed);
                } else {
                    counts.failures.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
                thread::sleep(pace);
            }
        })
    });
    // RSS every 10 s; traffic in 60 s streams for the whole run.
    let mut traffic_rounds = 0u32;
    while started.elapsed() < duration {
        let traffic = topo.start_iperf3(55).context("iperf3")?;
        let round_end = Instant::now() + Duration::from_mins(1);
        while Instant::now() < round_end && started.elapsed() < duration {
            if let (Ok(now), Ok(peak)) = (status_kb(pid, "VmRSS:"), status_kb(pid, "VmHWM:")) {
                rss.lock().unwrap().push((now, peak));
            }
            thread::sleep(Duration::from_secs(10));
        }
        let _ = traffic.finish();
        traffic_rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.join();
    }
    let (_, metrics) = agent.request("GET", "/metrics", None)?;
    let samples = metric(&metrics, "cnitrace_samples_total");
    let lost = metric(&metrics, "cnitrace_lost_samples_total");
    let rss = rss.lock().unwrap().clone();
    let agent =
        Arc::try_unwrap(agent).map_err(|_| anyhow::anyhow!("a worker still holds the agent"))?;
    let exit = agent.terminate()?;
    drop(topo);
    drop(churn_ns);
    let left = programs_left_after_exit()?;

    let mb = |kb: u64| kb as f64 / 1024.0;
    let mut out = String::new();
    let c = &counts;
    let _ = writeln!(
        out,
        "soak: {} min, release agent at 999 Hz, iperf3 through a bridged pod pair ({traffic_rounds} streams)",
        args.minutes
    );
    let _ = writeln!(
        out,
        "sessions started {} (stopped by request {}, the rest expired), scrapes {}, page polls {}, veth pairs churned {}",
        c.sessions_started.load(Ordering::Relaxed),
        c.sessions_stopped.load(Ordering::Relaxed),
        c.scrapes.load(Ordering::Relaxed),
        c.polls.load(Ordering::Relaxed),
        c.pairs.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "/healthz: {} checks, {} failed, slowest {} ms; other requests failed: {}",
        c.health_checks.load(Ordering::Relaxed),
        c.health_failures.load(Ordering::Relaxed),
        c.health_worst_ms.load(Ordering::Relaxed),
        c.failures.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "devices: {} stopped sessions with traffic, {} named a device outside the pod pair",
        c.sessions_with_traffic.load(Ordering::Relaxed),
        c.sessions_misnamed.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "samples {samples:.0}, lost {lost:.0} ({:.3}%)",
        if samples > 0.0 {
            lost / samples * 100.0
        } else {
            0.0
        }
    );
    let _ = writeln!(out, "RSS MB every 10 s (now/peak):");
    for chunk in rss.chunks(6) {
        let row: Vec<String> = chunk
            .iter()
            .map(|(now, peak)| format!("{:.1}/{:.1}", mb(*now), mb(*peak)))
            .collect();
        let _ = writeln!(out, "  {}", row.join("  "));
    }
    // The level of the first five minutes against the last five (RSS every 10 s).
    let level = |part: &[(u64, u64)]| {
        part.iter().map(|(now, _)| mb(*now)).sum::<f64>() / part.len().max(1) as f64
    };
    let window = rss.len().min(30);
    let (early, late) = (level(&rss[..window]), level(&rss[rss.len() - window..]));
    let _ = writeln!(
        out,
        "scrapers: {:?}; RSS level first 5 min {early:.1} MB, last 5 min {late:.1} MB ({:+.1}%)",
        args.scrapers,
        (late / early - 1.0) * 100.0
    );
    let first = rss.first().map_or(0.0, |(now, _)| mb(*now));
    let final_rss = rss.last().map_or(0.0, |(now, _)| mb(*now));
    let peak = rss.iter().map(|(_, p)| mb(*p)).fold(0.0, f64::max);
    let _ = writeln!(
        out,
        "RSS first {first:.1} MB, last {final_rss:.1} MB, peak {peak:.1} MB; SIGTERM exit {exit}; programs left: {}",
        left.len()
    );
    report::publish("soak", &out)?;
    if !exit.success() || !left.is_empty() {
        bail!("the agent did not stop cleanly");
    }
    if c.sessions_misnamed.load(Ordering::Relaxed) > 0 {
        bail!("sessions named devices outside the pod pair");
    }
    Ok(())
}
