//! The demo: the lab's CNI models (bridge, routed, overlay and eBPF datapaths) built from namespaces on this
//! machine, an iperf3 stream and a request/response run through each, cnitrace's
//! cycles-per-packet breakdown per model (the shape of figs. 9 and 11, also as SVG), and the
//! netfilter rule-count sweep (table III's question: what does a rule cost per packet).

use anyhow::{Context as _, Result, bail};

use crate::{bootstrap, cargo, run_command, workspace_root};

pub fn run(duration: u32, rules: &str) -> Result<()> {
    if !crate::is_root() {
        bail!("the demo needs root (network namespaces and BPF): run it as root");
    }
    bootstrap::ensure()?;
    run_command(cargo().args(["build", "--release", "--package", "cnitrace"]))?;
    let bin = workspace_root().join("target/release/cnitrace");
    let chart = workspace_root().join("target/demo/lab.svg");
    std::fs::create_dir_all(chart.parent().expect("parent")).context("create target/demo")?;
    // A lab left by an interrupted run would refuse to build.
    run_command(std::process::Command::new(&bin).args(["lab", "down"]))?;

    eprintln!(
        "demo: every lab model, pods on one host (intra) and across two (inter), {duration} s profiled per run"
    );
    run_command(std::process::Command::new(&bin).args([
        "lab",
        "bench",
        "--duration",
        &duration.to_string(),
        "--repeat",
        "1",
        "--svg",
        chart.to_str().context("path")?,
    ]))?;
    eprintln!("demo: chart of the breakdowns: {}", chart.display());

    eprintln!("demo: netfilter rule sweep on flannel (bridged pods, FORWARD via br_netfilter)");
    run_command(std::process::Command::new(&bin).args([
        "lab",
        "sweep",
        "--rules",
        rules,
        "--duration",
        &duration.to_string(),
    ]))?;
    println!(
        "(the lab's namespaces are removed; `bpftool prog show` lists nothing of cnitrace or the lab)"
    );
    Ok(())
}
