//! What cnitrace costs by default, proven on the real kernel: an idle agent runs no program per
//! packet or per softirq, and the cheap default sources (devices' own counters, sampled softirq
//! times) agree with the exact per-packet and per-softirq probes on the same traffic.

use std::{process::Command, thread, time::Duration};

use cnitrace_tests::{
    AgentProcess, Shape, Topology, cnitrace_bin, loaded_cnitrace_programs, privileged, remove_stale,
};
use serde_json::{Value, json};

/// Programs that run per packet or per softirq run.
const PER_EVENT: &[&str] = &["cnitrace_tx", "cnitrace_si_in", "cnitrace_si_out"];

fn per_event_programs() -> Vec<String> {
    loaded_cnitrace_programs()
        .unwrap()
        .into_iter()
        .filter(|line| PER_EVENT.iter().any(|name| line.contains(name)))
        .collect()
}

#[test]
fn idle_agent_and_its_sessions_run_no_per_packet_or_softirq_program() {
    if !privileged("idle_agent_and_its_sessions_run_no_per_packet_or_softirq_program") {
        return;
    }
    let _serial = cnitrace_tests::serial();
    remove_stale();
    let agent = AgentProcess::start(&[], &[]).expect("agent");
    let loaded = loaded_cnitrace_programs().unwrap();
    assert!(
        loaded.iter().any(|l| l.contains("cnitrace_sample")),
        "the sampler is attached: {loaded:?}"
    );
    assert_eq!(per_event_programs(), Vec::<String>::new(), "idle");
    let (status, body) = agent
        .request("POST", "/api/v1/sessions", Some(&json!({})))
        .unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(per_event_programs(), Vec::<String>::new(), "session open");
    assert!(agent.terminate().unwrap().success());

    // The exact sources are there when asked for, so the check above can fail.
    let exact = AgentProcess::start(&["--packets", "exact", "--softirq", "exact"], &[])
        .expect("agent with exact counters");
    assert_eq!(per_event_programs().len(), 3, "{:?}", per_event_programs());
    assert!(exact.terminate().unwrap().success());
}

/// The CPUs the sampler is attached on (not a quota's count).
fn online_cpus() -> usize {
    let list = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    list.trim()
        .split(',')
        .map(|range| match range.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum()
}

/// The links that hold the sampler on a CPU's perf event.
fn sampler_links() -> usize {
    let programs = Command::new("bpftool")
        .args(["-j", "prog", "show", "name", "cnitrace_sample"])
        .output()
        .unwrap();
    // One object per program (one line per agent); this test runs one agent.
    let ids: Vec<u64> = String::from_utf8_lossy(&programs.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|p| p["id"].as_u64())
        .collect();
    let links = Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()
        .unwrap();
    let links: Value = serde_json::from_slice(&links.stdout).unwrap_or(Value::Null);
    links.as_array().map_or(0, |links| {
        links
            .iter()
            .filter(|l| l["prog_id"].as_u64().is_some_and(|id| ids.contains(&id)))
            .count()
    })
}

fn samples_total(agent: &AgentProcess) -> f64 {
    let (status, text) = agent.request("GET", "/metrics", None).unwrap();
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find(|l| l.starts_with("cnitrace_samples_total{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Samples per second per CPU the agent takes now, from its own counters over `seconds`.
fn measured_rate(agent: &AgentProcess, seconds: u64) -> f64 {
    let cpus = online_cpus() as f64;
    let (before, start) = (samples_total(agent), std::time::Instant::now());
    thread::sleep(Duration::from_secs(seconds));
    let (after, elapsed) = (samples_total(agent), start.elapsed().as_secs_f64());
    (after - before) / elapsed / cpus
}

/// An agent nobody reads samples nothing; a scraper gets the continuous rate; a session the
/// session rate while it runs, then the continuous rate again.
#[test]
fn the_agent_samples_only_as_fast_as_its_readers_need() {
    if !privileged("the_agent_samples_only_as_fast_as_its_readers_need") {
        return;
    }
    let _serial = cnitrace_tests::serial();
    remove_stale();
    // cpu-clock fires on idle CPUs too (hardware cycles, where a PMU exists, do not).
    let agent = AgentProcess::start(
        &[
            "--continuous-frequency",
            "49",
            "-F",
            "499",
            "--clock",
            "cpu-clock",
        ],
        &[],
    )
    .expect("agent");
    assert_eq!(sampler_links(), 0, "nobody reads: the sampler is detached");
    // The first scrape attaches it at the continuous rate (and takes the baseline).
    samples_total(&agent);
    let cpus = online_cpus();
    assert_eq!(sampler_links(), cpus, "one perf event per CPU");
    // cpu-clock fires on every CPU, idle or not. Measured here over 3 s: 48.5-55 Hz at 49
    // and 438-498 Hz at 499 (a vCPU that is not running misses its timer), so the bounds
    // are 60% to 130% of the rate asked for, and the two rates must stay apart.
    let continuous = measured_rate(&agent, 3);
    assert!(
        (29.0..=64.0).contains(&continuous),
        "continuous {continuous:.1} Hz"
    );
    let (status, body) = agent
        .request("POST", "/api/v1/sessions", Some(&json!({})))
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let during = measured_rate(&agent, 3);
    assert!((300.0..=600.0).contains(&during), "session {during:.1} Hz");
    let id = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_u64()
        .unwrap();
    let (status, body) = agent
        .request("POST", &format!("/api/v1/sessions/{id}/stop"), None)
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let after = measured_rate(&agent, 3);
    assert!(
        (29.0..=64.0).contains(&after),
        "after the session {after:.1} Hz"
    );
    eprintln!("continuous {continuous:.1} Hz, session {during:.1} Hz, after {after:.1} Hz");
    assert!(agent.terminate().unwrap().success());
}

fn softirq_cycles(b: &Value, vector: &str) -> f64 {
    b["softirq"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["vector"] == vector)
        .map_or(0.0, |s| s["cycles"].as_f64().unwrap())
}

/// A `cnitrace profile` whose window is open (its "profiling for" line seen) and that ends
/// when interrupted.
struct OpenProfile {
    child: std::process::Child,
}

impl OpenProfile {
    fn start(topo: &Topology, extra: &[&str]) -> Self {
        let mut child = Command::new(cnitrace_bin())
            .args([
                "profile",
                "--duration",
                "120",
                "--format",
                "json",
                "--no-ruleset",
            ])
            .args(["--iface", &topo.client_iface, "--netns", &topo.client])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (opened, wait) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
            let seen = lines.any(|l| l.is_ok_and(|l| l.contains("profiling for")));
            let _ = opened.send(seen);
            // Keep draining so the profiler never blocks on a full pipe.
            lines.for_each(drop);
        });
        let seen = wait.recv_timeout(Duration::from_mins(1));
        assert_eq!(seen, Ok(true), "the window of {extra:?} did not open");
        Self { child }
    }

    /// Ends the window (SIGINT, as Ctrl-C) and returns its breakdown.
    fn finish(self) -> Value {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let out = self.child.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

/// Two profiles at once, one with the exact probes and one with the defaults, around a fixed
/// iperf3 transfer: both windows are open before it starts (each profiler said so) and are
/// closed after it ended, however long it took on a loaded machine, so both count the same
/// packets. (Fixed window lengths once let a slow transfer's last packets fall after the
/// first window closed.)
fn default_against_exact(topo: &Topology) -> (Value, Value) {
    let exact = OpenProfile::start(topo, &["--packets", "exact", "--softirq", "exact"]);
    let default = OpenProfile::start(topo, &[]);
    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &topo.server,
            "iperf3",
            "-s",
            "-1",
            "-p",
            "5311",
        ])
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(500));
    let client = Command::new("ip")
        .args(["netns", "exec", &topo.client, "iperf3", "-c"])
        .arg(topo.server_ip.to_string())
        .args(["-p", "5311", "-n", "6G"])
        .output()
        .unwrap();
    assert!(client.status.success(), "{client:?}");
    let _ = server.wait();
    // The connections' last segments (FIN, ACK) are out within milliseconds.
    thread::sleep(Duration::from_millis(500));
    (exact.finish(), default.finish())
}

#[test]
fn device_counters_and_sampled_softirq_agree_with_the_exact_probes() {
    if !privileged("device_counters_and_sampled_softirq_agree_with_the_exact_probes") {
        return;
    }
    let _serial = cnitrace_tests::serial();
    remove_stale();
    let topo = Topology::new(Shape::Bridged { rules: 0 }).expect("topology");
    let (exact, default) = default_against_exact(&topo);
    let (e, d) = (&exact["packets"], &default["packets"]);
    assert!(
        d["source"].as_str().unwrap().starts_with("device counters"),
        "{}",
        d["source"]
    );
    // The same skbs left the device in both windows: the test's namespaces send nothing of
    // their own (IPv6 off, static neighbours), and both windows span the whole transfer.
    // Still the device counts a few data skbs more than the tracepoint sees (0-5 of ~110k
    // here with the machine quiet, 15 on a loaded fresh machine; not yet explained), so the
    // bound is 0.05% of the skbs (~55), three times the worst seen, and far below what a
    // window missing part of the transfer would show.
    let skb_difference = d["skbs"].as_i64().unwrap() - e["skbs"].as_i64().unwrap();
    let bound = (e["skbs"].as_f64().unwrap() * 0.0005).max(4.0);
    assert!(
        (skb_difference.abs() as f64) <= bound,
        "exact {e}\ndefault {d}"
    );
    let ratio = d["segments"].as_f64().unwrap() / e["segments"].as_f64().unwrap();
    // The estimate misses the partial last segment of some skbs: 0.9963-0.9994 measured
    // here over eleven runs, so the bound is 1%, not quite three times the worst seen.
    assert!(
        (ratio - 1.0).abs() <= 0.01,
        "segments from bytes and MTU within 1% of gso_segs: {ratio:.5}"
    );
    // Softirq time: the sampled NET_RX estimate against the entry/exit timer. With ~3 s of
    // traffic at 999 Hz on 2 CPUs there are ~2500 NET_RX samples (about 2% noise); the exact
    // timer also counts its own probes and the entry and exit paths that no sample can place
    // in a handler, so the sample reads lower. Observed here: 0.71 to 0.96.
    let (exact_rx, sampled_rx) = (
        softirq_cycles(&exact, "NET_RX"),
        softirq_cycles(&default, "NET_RX"),
    );
    assert!(exact_rx > 0.0, "{}", exact["softirq"]);
    let rx_ratio = sampled_rx / exact_rx;
    assert!(
        (0.6..=1.15).contains(&rx_ratio),
        "NET_RX sampled / exact = {rx_ratio:.3}"
    );
    eprintln!(
        "skbs default-exact {skb_difference}, segments default/exact {ratio:.5}, NET_RX \
         sampled/exact {rx_ratio:.3}"
    );
}

/// A window that spans a rate change (the rolling window: five seconds at the continuous
/// rate, then five at the session rate) weights each sample by its own period: its cycles per
/// packet match the constant-rate session's on the same steady stream, and it expects the
/// samples of each part at that part's rate. Taken as one rate, either would be off by ~45%.
#[test]
fn a_window_spanning_a_rate_change_weights_each_part_by_its_rate() {
    if !privileged("a_window_spanning_a_rate_change_weights_each_part_by_its_rate") {
        return;
    }
    let _serial = cnitrace_tests::serial();
    remove_stale();
    let topo = Topology::new(Shape::Bridged { rules: 0 }).expect("topology");
    // cpu-clock fires on idle CPUs too (hardware cycles, where a PMU exists, do not).
    let agent = AgentProcess::start(
        &[
            "--continuous-frequency",
            "99",
            "-F",
            "999",
            "--clock",
            "cpu-clock",
        ],
        &[],
    )
    .expect("agent");
    // A scraper (the continuous rate) and a rolling reader (the ring starts with this read).
    samples_total(&agent);
    let (status, _) = agent
        .request("GET", "/api/v1/breakdown?window=10", None)
        .unwrap();
    assert!(status == 409 || status == 200, "{status}");
    let traffic = topo.start_iperf3(16).expect("iperf3");
    thread::sleep(Duration::from_secs(6));
    let (status, body) = agent
        .request("POST", "/api/v1/sessions", Some(&json!({})))
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<Value>(&body).unwrap()["id"]
        .as_u64()
        .unwrap();
    thread::sleep(Duration::from_secs(5));
    let (status, rolling) = agent
        .request("GET", "/api/v1/breakdown?window=10", None)
        .unwrap();
    assert_eq!(status, 200, "{rolling}");
    let (status, stopped) = agent
        .request("POST", &format!("/api/v1/sessions/{id}/stop"), None)
        .unwrap();
    assert_eq!(status, 200, "{stopped}");
    traffic.finish().expect("iperf3");
    let rolling: Value = serde_json::from_str(&rolling).unwrap();
    let session = serde_json::from_str::<Value>(&stopped).unwrap()["breakdown"].clone();
    let cpp = |b: &Value| b["total"]["cpp"].as_f64().unwrap();
    let ratio = cpp(&rolling) / cpp(&session);
    let q = &rolling["quality"];
    let mean_hz = q["frequency_hz"].as_f64().unwrap();
    let taken = q["samples"].as_f64().unwrap() / q["expected_samples"].as_f64().unwrap();
    eprintln!(
        "rolling/session CPP {ratio:.3}, rolling mean rate {mean_hz:.0} Hz, samples/expected \
         {taken:.3}"
    );
    // CPP of two windows of one steady stream varies ~15% here: 0.75-1.33 allows that and
    // refuses the ~0.55 a single-rate reading would give.
    assert!(
        (0.75..=1.33).contains(&ratio),
        "rolling {rolling}\nsession {session}"
    );
    // ~10 s, about half at each rate: 549 Hz, give or take a second at either end.
    assert!((350.0..=750.0).contains(&mean_hz), "{q}");
    assert!((0.75..=1.15).contains(&taken), "{q}");
    assert!(agent.terminate().unwrap().success());
}
