//! The demo: a bridged pod pair with bridge-nf-call-iptables and non-matching FORWARD rules,
//! iperf3 through it, and cnitrace's breakdown of the window.

use std::{process::Command, thread, time::Duration};

use anyhow::{Context as _, Result, bail};
use cnitrace_tests::{Shape, Topology, remove_stale};

use crate::{bootstrap, cargo, run_command, workspace_root};

pub fn run(duration: u32, rules: usize) -> Result<()> {
    if !crate::is_root() {
        bail!("the demo needs root (network namespaces and BPF): run it as root");
    }
    bootstrap::ensure()?;
    run_command(cargo().args(["build", "--release", "--package", "cnitrace"]))?;
    let bin = workspace_root().join("target/release/cnitrace");
    remove_stale();

    eprintln!(
        "demo: building pod A -- veth -- bridge (node namespace, {rules} FORWARD rules) -- veth -- pod B"
    );
    let topo = Topology::new(Shape::Bridged { rules })?;
    eprintln!(
        "demo: iperf3 from {} to {} for {} s; cnitrace profiles {duration} s of it",
        topo.client,
        topo.server,
        duration + 3
    );
    let traffic = topo.start_iperf3(duration + 3)?;
    thread::sleep(Duration::from_millis(700));
    let status = Command::new(&bin)
        .args([
            "profile",
            "--duration",
            &duration.to_string(),
            "--iface",
            &topo.client_iface,
            "--netns",
            &topo.client,
        ])
        .status()
        .context("run cnitrace")?;
    let gbps = traffic.finish()?;
    drop(topo);
    if !status.success() {
        bail!("cnitrace profile failed with {status}");
    }
    println!("iperf3 throughput during the window: {gbps:.1} Gbit/s");
    println!("(the demo's namespaces are removed; `bpftool prog show` lists nothing of cnitrace)");
    Ok(())
}
