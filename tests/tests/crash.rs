//! `kill -9` in the middle of a window, then `cnitrace doctor --repair` (or the next start):
//! the node ends exactly as it was before (sysctl, nftables, BPF programs, namespaces).

use std::{
    process::{Child, Command},
    thread,
    time::{Duration, Instant},
};

use cnitrace_tests::{
    AgentProcess, PREFIX, cnitrace_bin, privileged, programs_left_after_exit, remove_stale, run,
};
use serde_json::{Value, json};

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

fn sysctl() -> String {
    std::fs::read_to_string(SYSCTL).unwrap().trim().to_owned()
}

/// A namespace of this test, and the sysctl's value before it; both put back on drop, also
/// when an assertion fails.
struct Scene {
    netns: String,
    sysctl_before: String,
    children: Vec<Child>,
}

impl Scene {
    fn new() -> Self {
        let netns = format!("{PREFIX}{}-crash", std::process::id());
        run("ip", &["netns", "add", &netns]).unwrap();
        // A table for the counting table to join (it counts the families that have rules).
        run(
            "ip",
            &[
                "netns", "exec", &netns, "iptables", "-A", "FORWARD", "-j", "ACCEPT",
            ],
        )
        .unwrap();
        Self {
            netns,
            sysctl_before: sysctl(),
            children: Vec::new(),
        }
    }

    fn counting_tables(&self) -> Vec<String> {
        let out = run(
            "ip",
            &["netns", "exec", &self.netns, "nft", "list", "tables"],
        )
        .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("cnitrace_entries"))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::write(SYSCTL, &self.sysctl_before);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "{what} within 20 s");
        thread::sleep(Duration::from_millis(100));
    }
}

fn kill_9(child: &mut Child) {
    run("kill", &["-KILL", &child.id().to_string()]).unwrap();
    let _ = child.wait();
}

fn repair() -> Value {
    let out = Command::new(cnitrace_bin())
        .args(["doctor", "--repair", "--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "doctor --repair: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

#[test]
fn kill_9_during_netfilter_then_repair_restores_the_node() {
    if !privileged("kill_9_during_netfilter_then_repair_restores_the_node") {
        return;
    }
    let _serial = cnitrace_tests::serial();
    remove_stale();
    let mut scene = Scene::new();
    assert_eq!(
        scene.sysctl_before, "0",
        "this test needs kernel.bpf_stats_enabled=0 to start with"
    );
    // The sysctl path is what kernels before 5.8 take; the counting table is what `netfilter
    // --count-hook-entries` adds. Run inside the test's namespace, so its nftables are the ones touched.
    let child = Command::new("ip")
        .args(["netns", "exec", &scene.netns])
        .arg(cnitrace_bin())
        .args([
            "netfilter",
            "--count-hook-entries",
            "--duration",
            "60",
            "--format",
            "json",
        ])
        .env("CNITRACE_BPF_STATS", "sysctl")
        .spawn()
        .unwrap();
    scene.children.push(child);
    wait_for("the counting table and the sysctl switched on", || {
        !scene.counting_tables().is_empty() && sysctl() == "1"
    });
    kill_9(&mut scene.children[0]);
    // What the kernel does not clean up by itself is still there ...
    assert_eq!(sysctl(), "1");
    assert_eq!(
        scene.counting_tables().len(),
        1,
        "{:?}",
        scene.counting_tables()
    );
    // ... and what it does is gone.
    assert!(programs_left_after_exit().unwrap().is_empty());

    let report = repair();
    let repaired = report["repaired"].to_string();
    assert!(
        repaired.contains("bpf_stats_enabled restored to 0"),
        "{report}"
    );
    assert!(repaired.contains("cnitrace_entries_"), "{report}");
    assert_eq!(report["remaining"], json!([]), "{report}");
    assert_eq!(sysctl(), "0");
    assert!(scene.counting_tables().is_empty());
    // A second repair finds nothing.
    assert_eq!(repair(), json!({"repaired": [], "remaining": []}));
}

#[test]
fn the_next_start_after_a_killed_agent_restores_the_sysctl() {
    if !privileged("the_next_start_after_a_killed_agent_restores_the_sysctl") {
        return;
    }
    let _serial = cnitrace_tests::serial();
    remove_stale();
    let scene = Scene::new();
    assert_eq!(scene.sysctl_before, "0");
    let mut agent = AgentProcess::start(&[], &[("CNITRACE_BPF_STATS", "sysctl")]).expect("agent");
    let (status, body) = agent
        .request("POST", "/api/v1/sessions", Some(&json!({})))
        .unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(sysctl(), "1", "a session switches statistics on");
    run("kill", &["-KILL", &agent.pid().unwrap().to_string()]).unwrap();
    agent.reap();
    assert_eq!(sysctl(), "1", "nothing restored it");
    assert!(programs_left_after_exit().unwrap().is_empty());
    // The next window (a profile of one second) restores the user's setting first, so it
    // switches statistics off again when it ends.
    let out = Command::new(cnitrace_bin())
        .args([
            "profile",
            "--duration",
            "1",
            "--format",
            "json",
            "--no-ruleset",
        ])
        .env("CNITRACE_BPF_STATS", "sysctl")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        sysctl(),
        "0",
        "the killed agent's sysctl was taken for the user's"
    );
    assert_eq!(
        repair(),
        json!({"repaired": [], "remaining": []}),
        "nothing left to repair"
    );
}
