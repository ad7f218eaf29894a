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

/// The largest datapath component's share.
fn from_breakdown_share(b: &Value) -> f64 {
    b["components"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"] != "other")
        .map(|c| c["share"].as_f64().unwrap())
        .fold(0.0, f64::max)
}

fn stack_share(b: &Value, component: &str) -> f64 {
    let stacks = b["stacks"].as_array().expect("stacks in the JSON");
    let cycles = |filter: &dyn Fn(&Value) -> bool| -> u64 {
        stacks
            .iter()
            .filter(|s| filter(s))
            .map(|s| s["cycles"].as_u64().unwrap())
            .sum()
    };
    let part = cycles(&|s| {
        s["component"]
            .as_str()
            .is_some_and(|c| c.split('.').next() == Some(component))
    });
    part as f64 / cycles(&|_| true) as f64
}

fn cnitrace_ok(args: &[&str]) -> Vec<u8> {
    let out = Command::new(cnitrace_bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "cnitrace {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The rule evaluation function of this iptables (nft-based or legacy).
fn is_rule_function(name: &str) -> bool {
    name == "nft_do_chain" || name == "ipt_do_table"
}

#[test]
fn flame_graph_pprof_and_diff_of_a_bridged_pair_with_rules() {
    if !privileged("flame_graph_pprof_and_diff_of_a_bridged_pair_with_rules") {
        return;
    }
    let _serial = cnitrace_tests::serial();
    remove_stale();
    let dir = std::env::temp_dir().join(format!("cnitrace-flame-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();

    // 1000 rules: JSON with stacks and the flame graph from one window.
    let topo = Topology::new(Shape::Bridged { rules: 1000 }).expect("topology");
    let svg_path = path("rules-1000.svg");
    let with_rules = topo
        .profile_traffic_with(3, &["--stacks", "--flamegraph", &svg_path])
        .expect("profile");
    let others: Vec<(String, f64)> = with_rules["subcomponents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["name"].as_str().unwrap().starts_with("other."))
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["share"].as_f64().unwrap(),
            )
        })
        .collect();
    eprintln!("the host's own work: {others:?}");
    // The host's work is split into named groups: the unnamed remainder is not its bulk.
    let unnamed = others
        .iter()
        .find(|(name, _)| name == "other.kernel")
        .map_or(0.0, |(_, s)| *s);
    let largest_named = others
        .iter()
        .filter(|(name, _)| name != "other.kernel")
        .map(|(_, s)| *s)
        .fold(0.0, f64::max)
        .max(from_breakdown_share(&with_rules));
    assert!(
        unnamed <= largest_named,
        "other.kernel {unnamed} is larger than every named group ({largest_named})"
    );
    // The stacks carry the breakdown's netfilter share (same samples, same rounding).
    let from_stacks = stack_share(&with_rules, "netfilter");
    let from_breakdown = share(&with_rules, "netfilter");
    eprintln!("netfilter share: stacks {from_stacks:.4}, breakdown {from_breakdown:.4}");
    assert!(from_breakdown > 0.01, "netfilter share {from_breakdown}");
    assert!(
        (from_stacks - from_breakdown).abs() < 0.01,
        "stacks {from_stacks} vs breakdown {from_breakdown}"
    );
    let svg = std::fs::read_to_string(&svg_path).expect("flame graph written");
    assert!(svg.starts_with("<?xml") && svg.trim_end().ends_with("</svg>"));
    assert!(
        svg.contains("nft_do_chain") || svg.contains("ipt_do_table"),
        "rule evaluation missing from the flame graph"
    );
    // Well-formed XML, per the XML parser of the system's Python.
    let parsed = Command::new("python3")
        .args([
            "-c",
            "import sys, xml.dom.minidom; xml.dom.minidom.parse(sys.argv[1])",
            &svg_path,
        ])
        .status()
        .unwrap();
    assert!(parsed.success(), "the SVG is not well-formed XML");
    std::fs::write(path("rules-1000.json"), with_rules.to_string()).unwrap();

    // Folded stacks and a pprof profile read by go tool pprof.
    let traffic = topo.start_iperf3(6).expect("iperf3");
    thread::sleep(Duration::from_millis(700));
    let window = [
        "--duration",
        "2",
        "--iface",
        &topo.client_iface,
        "--netns",
        &topo.client,
    ];
    let folded = String::from_utf8(cnitrace_ok(
        &[&["profile", "--format", "folded"][..], &window[..]].concat(),
    ))
    .unwrap();
    let pprof = cnitrace_ok(&[&["profile", "--format", "pprof"][..], &window[..]].concat());
    traffic.finish().expect("iperf3");
    for line in folded.lines() {
        let (frames, cycles) = line.rsplit_once(' ').expect("`frames cycles`");
        assert!(
            !frames.is_empty() && cycles.parse::<u64>().is_ok(),
            "{line}"
        );
    }
    assert!(folded.lines().any(|l| l.contains("nf_hook_slow")));
    std::fs::write(path("profile.pb.gz"), &pprof).unwrap();
    let top = Command::new("go")
        .args([
            "tool",
            "pprof",
            "-top",
            "-nodecount=15",
            &path("profile.pb.gz"),
        ])
        .env("HOME", &dir)
        .output()
        .expect("go tool pprof (golang-go, installed by the bootstrap)");
    let top_text = String::from_utf8_lossy(&top.stdout);
    eprintln!("{top_text}{}", String::from_utf8_lossy(&top.stderr));
    assert!(top.status.success(), "go tool pprof failed");
    assert!(
        top_text
            .lines()
            .any(|l| l.split_whitespace().last().is_some_and(is_rule_function)),
        "rule evaluation not among pprof's top entries"
    );
    drop(topo);

    // No rules: the diff shows rule evaluation growing, led by the rule function.
    let topo = Topology::new(Shape::Bridged { rules: 0 }).expect("topology");
    let without = topo
        .profile_traffic_with(3, &["--stacks"])
        .expect("profile");
    drop(topo);
    std::fs::write(path("rules-0.json"), without.to_string()).unwrap();
    let diff_svg = path("diff.svg");
    let diff: Value = serde_json::from_slice(&cnitrace_ok(&[
        "diff",
        &path("rules-0.json"),
        &path("rules-1000.json"),
        "--flamegraph",
        &diff_svg,
        "--format",
        "json",
    ]))
    .unwrap();
    let rules = diff["subcomponents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "netfilter.rules")
        .expect("netfilter.rules in the diff");
    assert!(rules["delta_cpp"].as_f64().unwrap() > 0.0, "{rules}");
    let first = &diff["functions"][0];
    assert!(
        is_rule_function(first["name"].as_str().unwrap()),
        "largest growth: {first}"
    );
    assert!(
        std::fs::read_to_string(&diff_svg)
            .unwrap()
            .contains("</svg>")
    );
    // The same window against itself: nothing changed.
    let same: Value = serde_json::from_slice(&cnitrace_ok(&[
        "diff",
        &path("rules-1000.json"),
        &path("rules-1000.json"),
        "--format",
        "json",
    ]))
    .unwrap();
    for list in ["components", "subcomponents", "functions"] {
        for entry in same[list].as_array().unwrap() {
            assert_eq!(entry["delta_cpp"].as_f64(), Some(0.0), "{entry}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert_nothing_left_attached();
}
