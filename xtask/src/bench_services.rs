//! `cargo xtask bench-services`: what Services cost per new connection in kube-proxy's
//! iptables and nftables modes, from none (straight to the pod) and 1 to 10000 Services (the release binary's
//! `lab sweep --services`, modes alternated at every count); the chart goes to
//! docs/services.svg.

use anyhow::{Result, bail};

use crate::{bootstrap, cargo, report, run_command, workspace_root};

#[derive(clap::Args)]
pub struct Args {
    /// Numbers of Services, comma-separated.
    #[arg(long, default_value = "0,1,1000,5000,10000")]
    services: String,
    /// Profiled seconds per point.
    #[arg(long, default_value_t = 3)]
    duration: u32,
}

pub fn run(args: &Args) -> Result<()> {
    if !crate::is_root() {
        bail!("bench-services needs root (namespaces, BPF)");
    }
    bootstrap::ensure()?;
    run_command(cargo().args(["build", "--release", "--package", "cnitrace"]))?;
    let bin = workspace_root().join("target/release/cnitrace");
    let out = std::process::Command::new(&bin)
        .args([
            "lab",
            "sweep",
            "--services",
            &args.services,
            "--proxy-mode",
            "iptables,nftables",
            "--duration",
            &args.duration.to_string(),
            "--svg",
        ])
        .arg(workspace_root().join("docs/services.svg"))
        .output()?;
    if !out.status.success() {
        bail!("lab sweep: {}", String::from_utf8_lossy(&out.stderr));
    }
    report::publish("services", &String::from_utf8_lossy(&out.stdout))
}
