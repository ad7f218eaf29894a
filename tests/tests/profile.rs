//! `cnitrace profile` against the real kernel: real namespaces, real iperf3 traffic, real BPF.

use std::{
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use cnitrace_tests::{
    Shape, Topology, cnitrace_bin, loaded_cnitrace_programs, privileged, programs_left_after_exit,
    remove_stale,
};
use serde_json::Value;

fn cycles(b: &Value, name: &str) -> u64 {
    b["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("component {name} missing"))["cycles"]
        .as_u64()
        .unwrap()
}

fn share(b: &Value, name: &str) -> f64 {
    cycles(b, name) as f64 / b["total"]["cycles"].as_u64().unwrap() as f64
}

fn assert_closure(b: &Value) {
    let sum: u64 = b["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["cycles"].as_u64().unwrap())
        .sum();
    assert_eq!(
        sum,
        b["total"]["cycles"].as_u64().unwrap(),
        "components must add up to the total"
    );
}

fn assert_nothing_left_attached() {
    let left = programs_left_after_exit().expect("bpftool");
    assert!(left.is_empty(), "programs left loaded: {left:?}");
}

#[test]
fn bridged_pair_with_rules_shows_bridge_netfilter_and_veth() {
    if !privileged("bridged_pair_with_rules_shows_bridge_netfilter_and_veth") {
        return;
    }
    let _serial = cnitrace_tests::serial();
    remove_stale();
    let topo = Topology::new(Shape::Bridged { rules: 200 }).expect("topology");
    let b = topo.profile_traffic(3).expect("profile");
    eprintln!(
        "{}",
        serde_json::to_string_pretty(&b["components"]).unwrap()
    );
    assert!(
        b["packets"]["count"].as_u64().unwrap() > 10_000,
        "packets: {}",
        b["packets"]
    );
    assert_eq!(b["packets"]["interfaces"][0], topo.client_iface.as_str());
    for name in ["bridge", "netfilter", "veth"] {
        assert!(cycles(&b, name) > 0, "{name} must be > 0");
    }
    // 200 non-matching rules walked by every packet make rule evaluation visible.
    let rules = b["subcomponents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "netfilter.rules");
    assert!(
        rules.is_some_and(|r| r["cycles"].as_u64().unwrap() > 0),
        "netfilter.rules must be > 0"
    );
    assert_closure(&b);
    assert_eq!(b["clock"]["source"], "cpu_clock");
    assert!(b["total"]["cpp"].as_f64().unwrap() > 0.0);
    drop(topo);
    assert_nothing_left_attached();
}

#[test]
fn routed_pair_shows_ip_forward_and_no_bridge() {
    if !privileged("routed_pair_shows_ip_forward_and_no_bridge") {
        return;
    }
    let _serial = cnitrace_tests::serial();
    remove_stale();
    let topo = Topology::new(Shape::Routed).expect("topology");
    let b = topo.profile_traffic(3).expect("profile");
    eprintln!(
        "{}",
        serde_json::to_string_pretty(&b["components"]).unwrap()
    );
    assert!(cycles(&b, "ip_forward") > 0, "ip_forward must be > 0");
    // No bridge is on the path; allow a stray sample from unrelated bridge activity on the node.
    assert!(
        share(&b, "bridge") < 0.002,
        "bridge share {}",
        share(&b, "bridge")
    );
    assert!(share(&b, "ip_forward") > 10.0 * share(&b, "bridge"));
    assert_closure(&b);
    drop(topo);
    assert_nothing_left_attached();
}

#[test]
fn sigint_mid_window_reports_and_detaches() {
    if !privileged("sigint_mid_window_reports_and_detaches") {
        return;
    }
    let _serial = cnitrace_tests::serial();
    let child = Command::new(cnitrace_bin())
        .args(["profile", "--duration", "60", "--format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    thread::sleep(Duration::from_secs(2));
    let attached = loaded_cnitrace_programs().expect("bpftool");
    assert_eq!(
        attached.len(),
        1,
        "by default only the sampler is attached (packets and softirqs come from the kernel's \
         own counters): {attached:?}"
    );
    // Compiler-builtin subprograms (memset, memcmp, ...) would show in kallsyms as BPF programs
    // of their own, named without our prefix, and be taken for datapath BPF: none may load.
    let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap();
    let builtins: Vec<&str> = kallsyms
        .lines()
        .filter(|l| l.ends_with("[bpf]"))
        .filter(|l| {
            ["_memset", "_memcpy", "_memmove", "_memcmp", "_bcmp"]
                .iter()
                .any(|b| l.contains(b))
        })
        .collect();
    assert!(
        builtins.is_empty(),
        "builtin subprograms loaded: {builtins:?}"
    );
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc_kill(pid, 2) }, 0);
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "exit after SIGINT: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let b: Value = serde_json::from_slice(&out.stdout).expect("partial window is still reported");
    let duration = b["window"]["duration_s"].as_f64().unwrap();
    assert!((1.0..30.0).contains(&duration), "window {duration}");
    assert_nothing_left_attached();
}

#[test]
fn sigkill_leaves_nothing_attached() {
    if !privileged("sigkill_leaves_nothing_attached") {
        return;
    }
    let _serial = cnitrace_tests::serial();
    let mut child = Command::new(cnitrace_bin())
        .args(["profile", "--duration", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    thread::sleep(Duration::from_secs(2));
    child.kill().unwrap();
    child.wait().unwrap();
    // Nothing is pinned: the kernel frees the programs with the process's file descriptors.
    assert_nothing_left_attached();
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
