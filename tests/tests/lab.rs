//! `cnitrace lab` and `cnitrace netfilter` against the real kernel: every CNI model built from
//! namespaces carries iperf3 and request/response traffic and shows the components that define
//! it; the rule-count sweep fits a line; nothing the lab or the counters made is left behind.

// A component whose code never ran has exactly zero cycles: compared exactly on purpose.
#![allow(clippy::float_cmp)]

use std::{
    collections::HashMap,
    process::{Command, Output},
    thread,
    time::Duration,
};

use cnitrace_tests::{Shape, Topology, cnitrace_bin, privileged, remove_stale, run};
use serde_json::Value;

/// The start of every lab test: skip (saying why) without privileges, else take the serial
/// lock and remove any lab an earlier failed test left.
fn begin(test: &str) -> Option<std::sync::MutexGuard<'static, ()>> {
    if !privileged(test) {
        return None;
    }
    let serial = cnitrace_tests::serial();
    let _ = cnitrace(&["lab", "down"]);
    Some(serial)
}

fn cnitrace(args: &[&str]) -> Output {
    Command::new(cnitrace_bin())
        .args(args)
        .output()
        .expect("run cnitrace")
}

/// `cnitrace lab up MODEL`, which must succeed; returns what it said on stderr.
fn lab_up(model: &str) -> String {
    let out = cnitrace(&["lab", "up", model]);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "lab up {model}: {said}");
    said
}

/// `lab bench ARGS` with one 2 s repeat, as JSON; the lab must be gone afterwards.
fn quick_bench(args: &[&str]) -> Value {
    let mut full = vec!["lab", "bench"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--duration", "2", "--repeat", "1", "--format", "json"]);
    let entries = json_of(&cnitrace(&full));
    assert_lab_gone();
    entries
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "cnitrace failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

fn lab_namespaces() -> Vec<String> {
    let out = run("ip", &["netns", "list"]).expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("cnl-"))
        .map(str::to_owned)
        .collect()
}

/// `lab_*` programs still loaded, after the kernel's deferred frees (up to 3 s).
fn lab_programs() -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let out = run("bpftool", &["prog", "show"]).expect("bpftool");
        let left: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("name lab_"))
            .map(str::to_owned)
            .collect();
        if left.is_empty() || std::time::Instant::now() > deadline {
            return left;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn assert_lab_gone() {
    assert_eq!(
        lab_namespaces(),
        Vec::<String>::new(),
        "lab namespaces left"
    );
    assert_eq!(lab_programs(), Vec::<String>::new(), "lab programs left");
}

fn cpp(entry: &Value, component: &str) -> f64 {
    entry["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == component)
        .unwrap_or_else(|| panic!("{component} missing"))["cpp"]["mean"]
        .as_f64()
        .unwrap()
}

#[test]
fn every_model_carries_traffic_and_shows_its_defining_components() {
    let Some(_serial) = begin("every_model_carries_traffic_and_shows_its_defining_components")
    else {
        return;
    };
    let entries = quick_bench(&[]);
    let mut by_key: HashMap<(String, String), &Value> = HashMap::new();
    for entry in entries.as_array().unwrap() {
        let key = (
            entry["model"].as_str().unwrap().to_owned(),
            entry["scenario"].as_str().unwrap().to_owned(),
        );
        by_key.insert(key, entry);
    }
    assert_eq!(by_key.len(), 16, "8 models x 2 scenarios");
    let get = |model: &str, scenario: &str| by_key[&(model.to_owned(), scenario.to_owned())];
    for (key, entry) in &by_key {
        if entry["unavailable"].is_string() {
            continue;
        }
        eprintln!(
            "{key:?}: {:.1} Gbit/s, rtt {:.1} us, bridge {:.0} ip_forward {:.0} netfilter {:.0} vxlan {:.0} bpf {:.0}",
            entry["throughput_gbps"].as_f64().unwrap(),
            entry["rtt_us"].as_f64().unwrap(),
            cpp(entry, "bridge"),
            cpp(entry, "ip_forward"),
            cpp(entry, "netfilter"),
            cpp(entry, "vxlan"),
            cpp(entry, "bpf"),
        );
        assert!(
            entry["throughput_gbps"].as_f64().unwrap() > 0.1,
            "{key:?} carried no stream"
        );
        assert!(
            entry["rtt_us"].as_f64().unwrap() > 0.0,
            "{key:?} no round trips"
        );
        assert!(entry["breakdown"]["packets"]["count"].as_u64().unwrap() > 1000);
        assert!(
            entry["connections_per_s"]["mean"].as_f64().unwrap() > 100.0,
            "{key:?}: connect-request-response"
        );
    }
    for scenario in ["intra", "inter"] {
        // Bridges where the model has one, none in the routed models.
        for model in ["flannel", "kube-router", "weave"] {
            assert!(
                cpp(get(model, scenario), "bridge") > 0.0,
                "{model} {scenario}: bridge"
            );
        }
        for model in ["calico-np", "calico-wp", "cilium"] {
            assert_eq!(
                cpp(get(model, scenario), "bridge"),
                0.0,
                "{model} {scenario}: bridge"
            );
        }
        // Calico routes through the host IP stack, and its chains (and kube-proxy's) are on
        // every node, policy or not: netfilter is paid without any policy too.
        assert!(cpp(get("calico-np", scenario), "ip_forward") > 0.0);
        for model in ["calico-np", "calico-wp"] {
            assert!(
                cpp(get(model, scenario), "netfilter") > 0.0,
                "{model} {scenario}: netfilter"
            );
        }
        // Cilium's tc programs run on every packet and keep it out of iptables.
        assert!(
            cpp(get("cilium", scenario), "bpf") > 0.0,
            "cilium {scenario}: bpf"
        );
        assert!(
            cpp(get("cilium", scenario), "netfilter")
                < cpp(get("calico-wp", scenario), "netfilter"),
            "cilium {scenario}: netfilter below calico-wp's"
        );
    }
    // Overlays encapsulate across hosts; native routing does not.
    for model in ["flannel", "cilium", "weave"] {
        assert!(
            cpp(get(model, "inter"), "vxlan") > 0.0,
            "{model} inter: vxlan"
        );
    }
    // Nothing per packet: at most a stray sample of the vxlan module's housekeeping (device
    // notifiers run while namespaces come and go), against ~240 CPP where it encapsulates.
    for (model, scenario) in [
        ("kube-router", "inter"),
        ("calico-np", "inter"),
        ("flannel", "intra"),
    ] {
        assert!(
            cpp(get(model, scenario), "vxlan") < 2.0,
            "{model} {scenario}: vxlan {}",
            cpp(get(model, scenario), "vxlan")
        );
    }
    // This kernel has no IP-in-IP: said so, not faked.
    let ipip = get("calico-ipip", "inter");
    if ipip["unavailable"].is_string() {
        assert!(ipip["unavailable"].as_str().unwrap().contains("IP-in-IP"));
    } else {
        assert!(cpp(ipip, "ipip") > 0.0, "calico-ipip inter: ipip");
    }
    // Nor Open vSwitch (`cargo xtask vmtest` measures it on Debian's kernels); the model
    // switches pods on one host only, which its inter-host row says.
    let ovs = get("ovs", "intra");
    if let Some(reason) = ovs["unavailable"].as_str() {
        assert!(reason.contains("openvswitch"), "{reason}");
    } else {
        assert!(cpp(ovs, "ovs") > 0.0, "ovs intra: ovs");
        assert_eq!(cpp(ovs, "bridge"), 0.0, "ovs intra: no Linux bridge");
        let inter = get("ovs", "inter")["unavailable"]
            .as_str()
            .unwrap_or_default();
        assert!(inter.contains("one host"), "{inter}");
    }
}

#[test]
fn lab_up_leaves_a_working_lab_that_down_removes_with_its_programs() {
    let Some(_serial) = begin("lab_up_leaves_a_working_lab_that_down_removes_with_its_programs")
    else {
        return;
    };
    lab_up("cilium");
    // The lab outlives the command: namespaces, and tc programs held by their filters.
    assert_eq!(lab_namespaces().len(), 5, "{:?}", lab_namespaces());
    assert!(
        !lab_programs().is_empty(),
        "lab_redirect must stay attached"
    );
    let again = cnitrace(&["lab", "up", "flannel"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already up"));
    let out = cnitrace(&["lab", "down"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("removed 5"));
    assert_lab_gone();
}

#[test]
fn a_lab_that_fails_halfway_removes_what_it_made() {
    let Some(_serial) = begin("a_lab_that_fails_halfway_removes_what_it_made") else {
        return;
    };
    // Without iptables-restore on PATH, calico-wp fails after every device and route exists,
    // at its policy step: a real failure in the last step.
    let out = Command::new(cnitrace_bin())
        .args(["lab", "up", "calico-wp"])
        .env("PATH", "/nonexistent")
        .output()
        .expect("run cnitrace");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("iptables-restore"), "{stderr}");
    assert_lab_gone();
}

#[test]
fn netfilter_report_attributes_forward_rules_per_packet_and_removes_its_counters() {
    if !privileged("netfilter_report_attributes_forward_rules_per_packet_and_removes_its_counters")
    {
        return;
    }
    let _serial = cnitrace_tests::serial();
    remove_stale();
    let rules = 300;
    let topo = Topology::new(Shape::Bridged { rules }).expect("topology");
    let traffic = topo.start_iperf3(7).expect("iperf3");
    thread::sleep(Duration::from_millis(700));
    let out = cnitrace(&[
        "netfilter",
        "--count-hook-entries",
        "--duration",
        "3",
        "--format",
        "json",
        "--iface",
        &topo.client_iface,
        "--netns",
        &topo.client,
        "--netns",
        &topo.node,
    ]);
    traffic.finish().expect("iperf3 result");
    let b = json_of(&out);
    let hooks = b["netfilter"]["hooks"].as_array().unwrap();
    eprintln!("{}", serde_json::to_string_pretty(hooks).unwrap());
    let forward = hooks
        .iter()
        .find(|h| h["family"] == "ipv4" && h["hook"] == "FORWARD")
        .expect("ipv4 FORWARD");
    // Bridged frames reach IPv4 FORWARD through bridge-netfilter: all of it from the bridge.
    assert!(forward["cycles"].as_u64().unwrap() > 0);
    assert_eq!(forward["from_bridge_cycles"], forward["cycles"]);
    assert_eq!(
        hooks[0]["hook"], "FORWARD",
        "the rules make FORWARD the costliest hook"
    );
    let walked = forward["rules_traversed_per_packet"].as_f64().unwrap();
    assert!(
        walked >= rules as f64,
        "{walked} rules per packet < {rules}"
    );
    assert!(forward["rules"].as_u64().unwrap() >= rules as u64);
    assert!(forward["packets"].as_u64().unwrap() > 1000);
    assert!(forward["cycles_per_rule_evaluated"].as_f64().unwrap() > 0.0);
    // Hook cycles add up to the netfilter component.
    let netfilter = b["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "netfilter")
        .unwrap()["cycles"]
        .as_u64()
        .unwrap();
    let sum: u64 = hooks.iter().map(|h| h["cycles"].as_u64().unwrap()).sum();
    assert_eq!(sum, netfilter);
    // The counting table is gone and the user's rules are untouched.
    let tables = run(
        "ip",
        &["netns", "exec", &topo.node, "nft", "list", "tables"],
    )
    .unwrap();
    assert!(!String::from_utf8_lossy(&tables.stdout).contains("cnitrace"));
    let save = run("ip", &["netns", "exec", &topo.node, "iptables-save"]).unwrap();
    let forward_rules = String::from_utf8_lossy(&save.stdout)
        .lines()
        .filter(|l| l.starts_with("-A FORWARD"))
        .count();
    assert_eq!(forward_rules, rules);
}

#[test]
fn rule_sweep_fits_a_rising_line_and_removes_its_rules() {
    let Some(_serial) = begin("rule_sweep_fits_a_rising_line_and_removes_its_rules") else {
        return;
    };
    let out = cnitrace(&[
        "lab",
        "sweep",
        "--rules",
        "0,500,1000,2000",
        "--duration",
        "2",
        "--format",
        "json",
    ]);
    let result = json_of(&out);
    assert_lab_gone();
    eprintln!("{}", serde_json::to_string_pretty(&result).unwrap());
    for point in result["points"].as_array().unwrap() {
        let added = point["rules_added"].as_f64().unwrap();
        let walked = point["rules_traversed_per_packet"].as_f64().unwrap();
        assert!(
            walked >= added,
            "{walked} rules walked per packet < {added} added"
        );
    }
    // Rule evaluation is a per-packet loop, so the cost must rise with every step of the
    // sweep. Four points in strictly rising order happen by chance with p = 1/24 when the
    // rules cost nothing. A straight-line fit is not asserted: under GRO the per-packet
    // figure bends (dearer skbs aggregate more packets), and a loaded 2-core runner bends it
    // further, so R² is printed but not a criterion.
    let points = result["points"].as_array().unwrap();
    for field in ["hook_cycles_per_packet", "netfilter_cpp"] {
        let series: Vec<f64> = points.iter().map(|p| p[field].as_f64().unwrap()).collect();
        assert!(
            series.windows(2).all(|w| w[1] > w[0]),
            "{field} does not rise with the rule count: {series:?}"
        );
    }
    // 2000 rules walked per packet against one: at least five times the hook's cost.
    let hook = |i: usize| points[i]["hook_cycles_per_packet"].as_f64().unwrap();
    assert!(
        hook(points.len() - 1) >= 5.0 * hook(0),
        "hook cost with 2000 rules {} is not 5x that with none {}",
        hook(points.len() - 1),
        hook(0)
    );
    assert!(result["fit_cpp"]["slope"].as_f64().unwrap() > 0.0);
    assert!(result["fit_hook"]["slope"].as_f64().unwrap() > 0.0);
}

/// Services of the sweep's second point: enough that iptables mode's walk (about 80 cycles per
/// connection per Service here) stands far above the noise of a per-connection figure.
const SERVICES: u64 = 5000;

#[test]
fn services_cost_grows_with_their_number_in_iptables_mode_and_not_in_nftables_mode() {
    let Some(_serial) =
        begin("services_cost_grows_with_their_number_in_iptables_mode_and_not_in_nftables_mode")
    else {
        return;
    };
    let services = format!("1,{SERVICES}");
    let out = cnitrace(&[
        "lab",
        "sweep",
        "--services",
        &services,
        "--proxy-mode",
        "iptables,nftables",
        "--duration",
        "3",
        "--format",
        "json",
    ]);
    let result = json_of(&out);
    assert_lab_gone();
    eprintln!("{}", serde_json::to_string_pretty(&result).unwrap());
    let point = |mode: &str, services: u64| -> &Value {
        result["points"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["mode"] == mode && p["services"] == services)
            .unwrap_or_else(|| panic!("no point {mode} {services}"))
    };
    for mode in ["iptables", "nftables"] {
        for services in [1, SERVICES] {
            let p = point(mode, services);
            assert!(
                p["crr"]["connections"].as_u64().unwrap() > 100,
                "{mode} {services}: too few connections: {p}"
            );
        }
    }
    // iptables: the first packet of each connection walks KUBE-SERVICES to the last Service.
    let walked = |mode: &str, services: u64| {
        point(mode, services)["prerouting_rules_per_connection"]
            .as_f64()
            .unwrap_or_else(|| panic!("{mode} {services}: no walk"))
    };
    assert!(
        walked("iptables", SERVICES) >= SERVICES as f64,
        "iptables mode walks {} rules per new connection with {SERVICES} Services",
        walked("iptables", SERVICES)
    );
    // nftables: one map lookup, whatever the number of Services.
    assert!(
        walked("nftables", SERVICES) <= 20.0,
        "nftables mode walks {} rules per new connection",
        walked("nftables", SERVICES)
    );
    let cycles = |mode: &str, services: u64| {
        point(mode, services)["netfilter_cycles_per_connection"]
            .as_f64()
            .unwrap()
    };
    // Both points connect through a Service (DNAT), so what differs is the number of Services.
    // Per-connection cycles of a 3 s window swing by a third between runs on a loaded 2-CPU
    // runner (CI once read 93k and 126k for nftables mode at 1 and 2000 Services), so the
    // claim is about the growth: iptables mode's is large and at least three times what
    // nftables mode's can be.
    let growth = |mode: &str| cycles(mode, SERVICES) - cycles(mode, 1);
    assert!(
        cycles("iptables", SERVICES) > 1.6 * cycles("iptables", 1),
        "iptables: {} cycles per connection with {SERVICES} Services, {} with one",
        cycles("iptables", SERVICES),
        cycles("iptables", 1)
    );
    assert!(
        growth("iptables") > 3.0 * growth("nftables").max(0.0),
        "growth from 1 to {SERVICES} Services: iptables {} cycles per connection, nftables {}",
        growth("iptables"),
        growth("nftables")
    );
    // A stream's established packets skip the nat table: its per-packet netfilter cost
    // does not follow the Services (within the noise of two 2 s windows).
    let stream = |services: u64| {
        point("iptables", services)["stream_netfilter_cpp"]
            .as_f64()
            .unwrap()
    };
    assert!(
        stream(SERVICES) < 1.5 * stream(1) && stream(SERVICES) > 0.0,
        "stream netfilter CPP: {} with {SERVICES} Services, {} with one",
        stream(SERVICES),
        stream(1)
    );
}

#[test]
fn every_node_carries_the_rules_of_its_cni_and_kube_proxy() {
    let Some(_serial) = begin("every_node_carries_the_rules_of_its_cni_and_kube_proxy") else {
        return;
    };
    // Rules counted on a live node of each CNI (iptables-save, every table), with a few pods;
    // the lab's host 1 has two.
    for (model, counted) in [
        ("flannel", 56.0),
        ("calico-np", 141.0),
        ("cilium", 1.0),
        ("kube-router", 99.0),
    ] {
        let said = lab_up(model);
        let host = format!("cnl-{model}-h1");
        let save = run("ip", &["netns", "exec", &host, "iptables-save"]).unwrap();
        let text = String::from_utf8_lossy(&save.stdout);
        let rules = text.lines().filter(|l| l.starts_with("-A ")).count() as f64;
        assert!(
            said.contains(&format!("{rules} iptables rules")),
            "lab up must print the count: {said}"
        );
        eprintln!("{model}: {rules} rules (counted on a live node: {counted})");
        assert!(
            (rules - counted).abs() <= 0.2 * counted,
            "{model}: {rules} rules, not within 20% of {counted}"
        );
        assert_eq!(
            text.contains("-A KUBE-SERVICES"),
            model != "cilium",
            "{model}: kube-proxy's Services (Cilium replaces kube-proxy)"
        );
        let down = cnitrace(&["lab", "down"]);
        assert!(down.status.success());
    }
    assert_lab_gone();
}

#[test]
fn lab_bad_input_is_a_clear_error() {
    for (args, expected) in [
        (vec!["lab", "up", "nope"], "invalid value"),
        (
            vec!["lab", "bench", "flannel", "--repeat", "0"],
            "--repeat 0",
        ),
        (vec!["lab", "sweep", "--rules", "5"], "two counts"),
        (vec!["lab", "sweep", "--rules", "0,x"], "invalid value"),
    ] {
        let out = cnitrace(&args);
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

const CNI_STATE: &str = "/run/cnitrace-lab/cni";
/// Where host-local keeps the node's own leases for a network named "podman".
const NODE_LEASES: &str = "/var/lib/cni/networks/podman";

/// The sorted names in a directory with their sizes (None when it does not exist): a test
/// compares it before and after instead of assuming the machine never ran podman.
fn listing(dir: &str) -> Option<Vec<(String, u64)>> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut names: Vec<(String, u64)> = entries
        .filter_map(Result::ok)
        .map(|e| {
            let size = e.metadata().map_or(0, |m| m.len());
            (e.file_name().to_string_lossy().into_owned(), size)
        })
        .collect();
    names.sort();
    Some(names)
}

fn iptables_save_in(netns: &str) -> String {
    let out = run("ip", &["netns", "exec", netns, "iptables-save"]).expect("iptables-save");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn cni_plugin_models_carry_traffic_and_the_plugins_remove_what_they_made() {
    let Some(_serial) =
        begin("cni_plugin_models_carry_traffic_and_the_plugins_remove_what_they_made")
    else {
        return;
    };
    // Up by the plugins: their devices, their rules, their leases.
    lab_up("cni-bridge");
    let rules = iptables_save_in("cnl-cni-bridge-h1");
    assert!(rules.contains("CNI-FORWARD"), "firewall plugin: {rules}");
    assert!(
        rules.contains("MASQUERADE"),
        "bridge plugin's ipMasq: {rules}"
    );
    let leases = std::fs::read_dir(format!("{CNI_STATE}/ipam/cnitrace-lab-bridge"))
        .expect("host-local's leases")
        .count();
    assert!(leases >= 3, "{leases} entries in host-local's directory");
    let link = run(
        "ip",
        &["-n", "cnl-cni-bridge-h1", "-o", "link", "show", "cni0"],
    )
    .expect("ip link");
    assert!(link.status.success(), "the bridge plugin's cni0");
    let out = cnitrace(&["lab", "down"]);
    assert!(out.status.success());
    assert_lab_gone();
    assert!(
        !std::path::Path::new(CNI_STATE).exists(),
        "attachments and leases removed"
    );

    // Both models, both scenarios, measured.
    let entries = quick_bench(&[
        "cni-bridge",
        "cni-ptp",
        "cni-macvlan",
        "cni-ipvlan",
        "cni-bandwidth",
    ]);
    assert!(!std::path::Path::new(CNI_STATE).exists());
    // The bandwidth plugin's ifb devices lived in the lab hosts' namespaces: none is left.
    let links = run("ip", &["-o", "link", "show"]).expect("ip link");
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains(": bwp"),
        "an ifb device of the bandwidth plugin is left"
    );
    let entries = entries.as_array().unwrap();
    assert_eq!(entries.len(), 10, "5 models x 2 scenarios");
    for entry in entries {
        let (model, scenario) = (
            entry["model"].as_str().unwrap(),
            entry["scenario"].as_str().unwrap(),
        );
        // A kernel without a driver (ipvlan is not built everywhere) says so.
        if let Some(reason) = entry["unavailable"].as_str() {
            assert!(
                model == "cni-macvlan" || model == "cni-ipvlan",
                "{model}: {reason}"
            );
            eprintln!("{model} {scenario}: {reason}");
            continue;
        }
        eprintln!(
            "{model} {scenario}: {:.1} Gbit/s, bridge {:.0} ip_forward {:.0} netfilter {:.0} veth {:.0}",
            entry["throughput_gbps"].as_f64().unwrap(),
            cpp(entry, "bridge"),
            cpp(entry, "ip_forward"),
            cpp(entry, "netfilter"),
            cpp(entry, "veth"),
        );
        assert!(entry["throughput_gbps"].as_f64().unwrap() > 0.1);
        assert!(entry["connections_per_s"]["mean"].as_f64().unwrap() > 100.0);
        match model {
            "cni-bridge" | "cni-ptp" | "cni-bandwidth" => {
                // The firewall plugin's chains (and conntrack) are on every packet's path.
                assert!(
                    cpp(entry, "netfilter") > 0.0,
                    "{model} {scenario}: netfilter"
                );
                assert!(cpp(entry, "veth") > 0.0, "{model} {scenario}: veth");
            }
            // Sub-interfaces of the uplink: the host's IP stack and its bridges never see the
            // pods' packets.
            _ => {
                assert_eq!(cpp(entry, "bridge"), 0.0, "{model} {scenario}: no bridge");
                assert_eq!(
                    cpp(entry, "ip_forward"),
                    0.0,
                    "{model} {scenario}: no forwarding"
                );
            }
        }
        if model == "cni-bridge" || model == "cni-bandwidth" {
            assert!(cpp(entry, "bridge") > 0.0, "{model} {scenario}: bridge");
        }
        if model == "cni-bridge" {
            assert_eq!(cpp(entry, "tc"), 0.0, "{model} {scenario}: no shaping");
        }
        if model == "cni-bandwidth" {
            // tbf on the host's veth and the ifb device shape every packet; the stream stays
            // under the 5 Gbit/s limit (10% margin for the burst).
            assert!(cpp(entry, "tc") > 0.0, "{model} {scenario}: tc");
            let gbps = entry["throughput_gbps"].as_f64().unwrap();
            assert!(
                gbps < 5.5,
                "{model} {scenario}: {gbps} Gbit/s over the limit"
            );
        }
        if model == "cni-ptp" {
            assert_eq!(cpp(entry, "bridge"), 0.0, "{model} {scenario}: no bridge");
            assert!(cpp(entry, "ip_forward") > 0.0, "{model} {scenario}: routed");
        }
    }
}

#[test]
fn a_cni_plugin_failing_halfway_is_undone_through_the_plugins() {
    let Some(_serial) = begin("a_cni_plugin_failing_halfway_is_undone_through_the_plugins") else {
        return;
    };
    // The real plugins, but a firewall plugin that refuses ADD (and accepts DEL): bridge and
    // host-local have made the pod's interface and lease when it fails.
    let dir = std::env::temp_dir().join(format!("cnitrace-cni-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let real = ["/opt/cni/bin", "/usr/lib/cni"]
        .iter()
        .map(std::path::Path::new)
        .find(|d| d.join("bridge").exists())
        .expect("containernetworking-plugins");
    for plugin in ["bridge", "host-local", "portmap"] {
        std::os::unix::fs::symlink(real.join(plugin), dir.join(plugin)).unwrap();
    }
    let refusing = dir.join("firewall");
    std::fs::write(
        &refusing,
        "#!/bin/sh\ncat >/dev/null\nif [ \"$CNI_COMMAND\" = ADD ]; then\n  echo '{\"cniVersion\":\"1.0.0\",\"code\":100,\"msg\":\"refused by the test\"}'\n  exit 1\nfi\nexit 0\n",
    )
    .unwrap();
    run("chmod", &["755", refusing.to_str().unwrap()]).unwrap();
    let out = Command::new(cnitrace_bin())
        .args(["lab", "up", "cni-bridge"])
        .env("CNI_PATH", &dir)
        .output()
        .expect("run cnitrace");
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refused by the test"), "{stderr}");
    assert_lab_gone();
    assert!(
        !std::path::Path::new(CNI_STATE).exists(),
        "attachments and leases removed"
    );
    // A missing plugin is named before anything is made.
    let out = Command::new(cnitrace_bin())
        .args(["lab", "up", "cni-ptp"])
        .env("CNI_PATH", "/nonexistent")
        .output()
        .expect("run cnitrace");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CNI plugin `ptp` not found"), "{stderr}");
    assert_lab_gone();
}

#[test]
fn a_users_cni_configuration_is_benchmarked_with_the_installed_plugins() {
    let Some(_serial) =
        begin("a_users_cni_configuration_is_benchmarked_with_the_installed_plugins")
    else {
        return;
    };
    // A directory like /etc/cni/net.d: podman's default list first by name, then a file a
    // runtime would not use.
    let dir = std::env::temp_dir().join(format!("cnitrace-netd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let podman = r#"{"cniVersion": "0.4.0", "name": "podman", "plugins": [
        {"type": "bridge", "bridge": "cni-podman0", "isGateway": true, "ipMasq": true,
         "hairpinMode": true, "ipam": {"type": "host-local", "routes": [{"dst": "0.0.0.0/0"}],
         "ranges": [[{"subnet": "10.88.0.0/16", "gateway": "10.88.0.1"}]]}},
        {"type": "portmap", "capabilities": {"portMappings": true}},
        {"type": "firewall"},
        {"type": "tuning"}]}"#;
    std::fs::write(dir.join("87-podman.conflist"), podman).unwrap();
    std::fs::write(dir.join("99-unused.conflist"), "{not json").unwrap();
    let dir_arg = dir.to_str().unwrap();
    // podman itself may keep leases there on this machine: compare, do not assume it is absent.
    let node_leases_before = listing(NODE_LEASES);

    // Up: the user's IPAM chose the pods' addresses, in the user's range.
    let out = cnitrace(&["lab", "up", "--cni-conf", dir_arg]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("87-podman.conflist") && stderr.contains("bridge -> host-local"),
        "{stderr}"
    );
    assert!(stderr.contains("10.88.0."), "{stderr}");
    let link = run(
        "ip",
        &["-n", "cnl-cni-conf-h1", "-o", "link", "show", "cni-podman0"],
    );
    assert!(link.is_ok(), "the user's bridge name");
    let out = cnitrace(&["lab", "down"]);
    assert!(out.status.success());
    assert_lab_gone();
    assert!(!std::path::Path::new(CNI_STATE).exists());
    assert_eq!(
        listing(NODE_LEASES),
        node_leases_before,
        "host-local's leases stay in the lab's state, never the node's"
    );

    // Bench: measured through the user's chain, the inter-host scenario refused with why.
    let entries = quick_bench(&["--cni-conf", dir_arg]);
    assert!(!std::path::Path::new(CNI_STATE).exists());
    let entries = entries.as_array().unwrap();
    assert_eq!(entries.len(), 2, "{entries:?}");
    let intra = &entries[0];
    assert_eq!(intra["scenario"], "intra");
    assert!(intra["throughput_gbps"].as_f64().unwrap() > 0.1);
    assert!(cpp(intra, "bridge") > 0.0, "the bridge plugin's bridge");
    assert!(cpp(intra, "netfilter") > 0.0, "firewall, portmap, ipMasq");
    assert!(
        entries[1]["unavailable"]
            .as_str()
            .is_some_and(|r| r.contains("one node's")),
        "{:?}",
        entries[1]
    );

    // What one machine cannot run, or cannot read, is refused naming the file and the plugin,
    // before anything is built.
    for (name, text, said) in [
        (
            "10-calico.conflist",
            r#"{"cniVersion": "0.3.1", "name": "k8s-pod-network", "plugins": [{"type": "calico", "ipam": {"type": "calico-ipam"}}]}"#,
            "`calico` needs",
        ),
        (
            "10-missing.conflist",
            r#"{"cniVersion": "1.0.0", "name": "m", "plugins": [{"type": "no-such-plugin"}]}"#,
            "no-such-plugin",
        ),
        (
            "10-future.conflist",
            r#"{"cniVersion": "9.0.0", "name": "f", "plugins": [{"type": "bridge"}]}"#,
            "cniVersion 9.0.0 is not supported",
        ),
        ("10-broken.conflist", "{\"cniVersion\": ", "not JSON"),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let out = cnitrace(&["lab", "bench", "--cni-conf", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} accepted");
        assert!(
            stderr.contains(name) && stderr.contains(said),
            "{name}: {stderr}"
        );
        assert_lab_gone();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
