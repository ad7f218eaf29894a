//! Softirq accounting, the CPU split, and BPF program costs, on the real kernel with real
//! traffic and the project's own tc program.

use std::process::{Child, Command, Stdio};

use cnitrace_tests::{
    Shape, Topology, cnitrace_bin, privileged, programs_left_after_exit, remove_stale,
};
use serde_json::Value;

/// `cnitrace lab tc-work` holding the program attached; killed (and so detached) on drop.
struct TcWork(Child);

impl TcWork {
    fn attach(topo: &Topology, loops: u32) -> Self {
        let mut child = Command::new(cnitrace_bin())
            .args([
                "lab",
                "tc-work",
                "--netns",
                &topo.node,
                "--iface",
                &topo.node_client_iface,
            ])
            .args(["--loops", &loops.to_string()])
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lab tc-work");
        // Wait for the attach message rather than a fixed delay.
        let stderr = child.stderr.take().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stderr), &mut line).unwrap();
        assert!(line.contains("attached"), "lab tc-work: {line}");
        TcWork(child)
    }
}

impl Drop for TcWork {
    fn drop(&mut self) {
        // SIGTERM: the command detaches and exits 0.
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

fn lab_program(b: &Value) -> &Value {
    b["bpf_programs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "lab_tc_work")
        .unwrap_or_else(|| {
            panic!(
                "lab_tc_work missing from bpf_programs: {}",
                b["bpf_programs"]
            )
        })
}

#[test]
fn tc_program_cost_is_measured_attributed_and_scales_with_work() {
    if !privileged("tc_program_cost_is_measured_attributed_and_scales_with_work") {
        return;
    }
    let _serial = cnitrace_tests::serial();
    remove_stale();
    let stats_before = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap();
    let topo = Topology::new(Shape::Bridged { rules: 0 }).expect("topology");
    let mut cpp = Vec::new();
    for loops in [1000, 2000] {
        let work = TcWork::attach(&topo, loops);
        let b = topo.profile_traffic(3).expect("profile");
        drop(work);
        let p = lab_program(&b);
        eprintln!("loops {loops}: {p}");
        // Every data skb the client sends enters the node through this ingress.
        let runs = p["run_cnt"].as_f64().unwrap();
        let skbs = b["packets"]["skbs"].as_f64().unwrap();
        assert!(
            (0.9..1.15).contains(&(runs / skbs)),
            "run_cnt {runs} vs {skbs} skbs sent"
        );
        assert!(
            p["attach"]
                .as_str()
                .unwrap()
                .contains(&topo.node_client_iface),
            "attach: {}",
            p["attach"]
        );
        assert!(p["datapath"].as_bool().unwrap());
        let bpf = b["components"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "bpf")
            .unwrap();
        assert!(bpf["cycles"].as_u64().unwrap() > 0, "bpf component");
        assert_eq!(
            b["quality"]["bpf_exact_cycles"], bpf["cycles"],
            "bpf reports the exact figure"
        );
        // Per packet, so that the two runs' different packet counts do not matter.
        cpp.push(p["run_time_ns"].as_f64().unwrap() / skbs);
    }
    let ratio = cpp[1] / cpp[0];
    eprintln!("lab_tc_work ns per packet: {cpp:?}, ratio {ratio:.2}");
    // Twice the loop iterations; the fixed cost of a program run keeps it a little under 2.
    assert!(
        (1.5..2.5).contains(&ratio),
        "doubling the work gave a ratio of {ratio}"
    );
    drop(topo);
    let stats_after = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap();
    assert_eq!(
        stats_before, stats_after,
        "kernel.bpf_stats_enabled must be restored"
    );
    assert!(programs_left_after_exit().unwrap().is_empty());
    let lab_left = Command::new("bpftool")
        .args(["prog", "show"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&lab_left.stdout).contains("lab_tc_work"),
        "lab program left loaded"
    );
}

#[test]
fn net_rx_softirq_and_cpu_split_under_iperf3() {
    if !privileged("net_rx_softirq_and_cpu_split_under_iperf3") {
        return;
    }
    let _serial = cnitrace_tests::serial();
    remove_stale();
    let topo = Topology::new(Shape::Bridged { rules: 0 }).expect("topology");
    let b = topo.profile_traffic(3).expect("profile");
    eprintln!("softirq: {}\ncpu: {}", b["softirq"], b["cpu"]);
    let net_rx = b["softirq"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["vector"] == "NET_RX")
        .expect("NET_RX ran");
    assert!(net_rx["count"].as_u64().unwrap() > 0);
    assert!(net_rx["cycles"].as_u64().unwrap() > 0);
    assert!(net_rx["cpp"].as_f64().unwrap() > 0.0);
    let share = net_rx["in_ksoftirqd_share"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&share));
    let c = &b["cpu"];
    let sum: f64 = ["user", "system", "softirq", "irq", "idle", "steal"]
        .iter()
        .map(|k| c[*k].as_f64().unwrap())
        .sum();
    assert!((sum - 1.0).abs() < 1e-9, "CPU split sums to {sum}");
    assert!(
        c["softirq"].as_f64().unwrap() > 0.0,
        "iperf3 through veths runs NET_RX softirqs"
    );
    assert!(c["gbps_per_busy_cpu"].as_f64().unwrap() > 0.0);
}
