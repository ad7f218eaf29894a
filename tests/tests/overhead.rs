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

fn softirq_cycles(b: &Value, vector: &str) -> f64 {
    b["softirq"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["vector"] == vector)
        .map_or(0.0, |s| s["cycles"].as_f64().unwrap())
}

/// Two profiles at once, one with the exact probes and one with the defaults, around a fixed
/// iperf3 transfer that starts and ends inside both windows: both count the same packets.
fn default_against_exact(topo: &Topology) -> (Value, Value) {
    let server = Command::new("ip")
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
    let profile = |extra: &[&str]| {
        Command::new(cnitrace_bin())
            .args([
                "profile",
                "--duration",
                "9",
                "--format",
                "json",
                "--no-ruleset",
            ])
            .args(["--iface", &topo.client_iface, "--netns", &topo.client])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let exact = profile(&["--packets", "exact", "--softirq", "exact"]);
    let default = profile(&[]);
    // The transfer must start inside both windows: wait until both samplers and the exact
    // packet counter are loaded (each window opens right after its programs attach), then a
    // margin. A fixed sleep was once too short for the exact profiler's BTF read.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let loaded = cnitrace_tests::loaded_cnitrace_programs().unwrap();
        let count = |name: &str| loaded.iter().filter(|l| l.contains(name)).count();
        if count("cnitrace_sample") >= 2 && count("cnitrace_tx") >= 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "profilers not attached: {loaded:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_millis(1500));
    let client = Command::new("ip")
        .args([
            "netns",
            "exec",
            &topo.client,
            "iperf3",
            "-c",
            &topo.server_ip.to_string(),
        ])
        .args(["-p", "5311", "-n", "6G"])
        .output()
        .unwrap();
    assert!(client.status.success(), "{client:?}");
    let mut server = server;
    let _ = server.wait();
    let parse = |child: std::process::Child| -> Value {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    (parse(exact), parse(default))
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
    // The same skbs left the device in both windows (give or take a neighbour-discovery frame
    // the device counts outside the stream).
    let skb_difference = d["skbs"].as_i64().unwrap() - e["skbs"].as_i64().unwrap();
    assert!(skb_difference.abs() <= 4, "exact {e}\ndefault {d}");
    let ratio = d["segments"].as_f64().unwrap() / e["segments"].as_f64().unwrap();
    assert!(
        (ratio - 1.0).abs() <= 0.005,
        "segments from bytes and MTU within 0.5% of gso_segs: {ratio:.5}"
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
    eprintln!("segments default/exact {ratio:.5}, NET_RX sampled/exact {rx_ratio:.3}");
}
