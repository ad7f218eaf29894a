//! `cargo xtask vmtest`: the tracing backend proven on real distro kernels. Downloads (apt)
//! Debian's cloud kernels 6.1 and 6.12 into target/vmtest, builds an initramfs with busybox,
//! cnitrace, iperf3, iptables, nft and the kernel modules the lab needs, boots each under QEMU
//! (TCG) and runs cnitrace there: the lab's datapaths with the tracing backend in fentry mode,
//! kprobe mode forced, an IP-in-IP tunnel, VXLAN, netfilter under a policy, an Open vSwitch
//! kernel datapath under both backends, and the same
//! traffic profiled by sampling and by tracing for the cross-check. The serial console carries
//! each result as JSON between markers; the checks run here.

mod boot;
mod check;
mod image;

use anyhow::{Result, bail};
use boot::boot_until_cases_run;
use check::{check, parse_console};
use image::{build_initramfs, fetch_kernel, kernel_package, vm_dir};

use crate::{bootstrap, cargo, run_command, workspace_root};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Kernel series to boot (Debian cloud kernels).
    #[arg(long, value_delimiter = ',', default_value = "6.1,6.12")]
    kernels: Vec<String>,
    /// Profiled seconds per run inside the VM.
    #[arg(long, default_value_t = 2)]
    duration: u32,
    /// Give up on a VM after this many seconds.
    #[arg(long, default_value_t = 1200)]
    timeout: u64,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            kernels: vec!["6.1".to_owned(), "6.12".to_owned()],
            duration: 2,
            timeout: 1200,
        }
    }
}

/// Modules the lab needs (their dependencies are added from modinfo).
const MODULES: &[&str] = &[
    "bridge",
    "br_netfilter",
    "veth",
    "vxlan",
    "ipip",
    "nf_tables",
    "nft_compat",
    "nf_conntrack",
    "xt_conntrack",
    "xt_mark",
    "xt_multiport",
    "xt_comment",
    "xt_tcpudp",
    // What the nodes' own rules use (kubelet, kube-proxy, the CNIs' chains).
    "nf_nat",
    "nft_nat",
    "nft_chain_nat",
    "nft_masq",
    "nft_ct",
    "nft_numgen",
    "xt_nat",
    "xt_MASQUERADE",
    "xt_statistic",
    "xt_addrtype",
    "xt_physdev",
    "xt_state",
    "xt_limit",
    "xt_NFLOG",
    "nfnetlink_log",
    "ipt_rpfilter",
    "ipt_REJECT",
    "sch_ingress",
    "cls_bpf",
    // The ovs model's kernel datapath.
    "openvswitch",
];

/// One run inside the VM: a name and cnitrace's arguments.
fn cases(duration: u32) -> Vec<(&'static str, Vec<String>)> {
    let lab = |model: &str, scenario: &str, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "lab",
            "bench",
            model,
            "--scenario",
            scenario,
            "--repeat",
            "1",
            "--format",
            "json",
            "--duration",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.push(duration.to_string());
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    };
    vec![
        (
            "doctor",
            vec!["doctor".into(), "--format".into(), "json".into()],
        ),
        (
            "vxlan-auto",
            lab("flannel", "inter", &["--backend", "tracing"]),
        ),
        (
            "ipip-kprobe",
            lab(
                "calico-ipip",
                "inter",
                &["--backend", "tracing", "--attach", "kprobe"],
            ),
        ),
        (
            "netfilter-policy",
            lab("calico-wp", "intra", &["--backend", "tracing"]),
        ),
        (
            "fentry-forced",
            lab(
                "calico-np",
                "intra",
                &["--backend", "tracing", "--attach", "fentry"],
            ),
        ),
        (
            "ovs-sampling",
            lab("ovs", "intra", &["--backend", "sampling"]),
        ),
        (
            "ovs-tracing",
            lab("ovs", "intra", &["--backend", "tracing"]),
        ),
        ("ovs-inter", lab("ovs", "inter", &["--backend", "sampling"])),
        (
            "cross-sampling",
            lab("flannel", "intra", &["--backend", "sampling"]),
        ),
        (
            "cross-tracing",
            lab("flannel", "intra", &["--backend", "tracing"]),
        ),
    ]
}

/// Runs every kernel's cases; returns the summary (`cargo xtask vmtest` keeps it in
/// BENCHMARKS.md for the probe-pair costs; the test command prints it).
pub fn run(args: &Args) -> Result<String> {
    if !crate::is_root() {
        bail!("vmtest needs root (apt, dpkg-deb)");
    }
    bootstrap::ensure()?;
    run_command(cargo().args(["build", "--package", "cnitrace"]))?;
    let cnitrace = workspace_root().join("target/debug/cnitrace");
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for series in &args.kernels {
        let package = kernel_package(series)?;
        let (kernel_root, release) = fetch_kernel(&package)?;
        eprintln!("vmtest: {release}: building the initramfs");
        let initrd = build_initramfs(&kernel_root, &release, &cnitrace, args.duration)?;
        let vmlinuz = kernel_root.join("boot").join(format!("vmlinuz-{release}"));
        let log = vm_dir().join(&release).join("console.log");
        eprintln!(
            "vmtest: {release}: booting under QEMU TCG (console: {})",
            log.display()
        );
        let console = boot_until_cases_run(&release, &vmlinuz, &initrd, &log, args.timeout)?;
        for line in console.lines().filter(|l| l.starts_with("@@MODULE-FAILED")) {
            eprintln!("vmtest: {release}: {line}");
        }
        if !console.contains("@@DONE") {
            failures.push(format!(
                "{release}: the VM did not finish its cases (see {})",
                log.display()
            ));
        }
        let outputs = parse_console(&console);
        let (summary, failed) = check(&release, &outputs);
        report.push(format!("{release} ({package}):"));
        report.extend(summary);
        failures.extend(failed);
    }
    let summary = format!("vmtest summary:\n{}\n", report.join("\n"));
    if !failures.is_empty() {
        print!("{summary}");
        bail!("vmtest failed:\n  {}", failures.join("\n  "));
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::{boot::died_before_cases, image::depends, *};

    #[test]
    fn a_boot_death_is_told_from_a_failed_case() {
        let oops = "[ 1.2] Oops: int3: 0000 [#1] PREEMPT SMP\n[ 1.3] Kernel panic - not syncing: Fatal exception in interrupt\n";
        assert!(died_before_cases(oops).is_some_and(|l| l.contains("Oops")));
        let after_a_case = format!("@@CASE a\n@@EXIT 1\n{oops}");
        assert_eq!(died_before_cases(&after_a_case), None);
        assert_eq!(died_before_cases("booted\n@@CASE a\n@@DONE\n"), None);
    }

    #[test]
    fn console_cases_are_parsed() {
        let console = "noise\n@@CASE a\n@@EXIT 0\n[1]\n@@STDERR\nwarn\n@@END\n@@CASE b\n@@EXIT 3\n@@STDERR\n@@END\n";
        let out = parse_console(console);
        assert_eq!(out["a"].exit, 0);
        assert_eq!(out["a"].stdout.trim(), "[1]");
        assert_eq!(out["a"].stderr.trim(), "warn");
        assert_eq!(out["b"].exit, 3);
    }

    #[test]
    fn modinfo_depends() {
        let bytes = b"\0license=GPL\0depends=stp,llc\0vermagic=6.1\0";
        assert_eq!(depends(bytes), vec!["stp", "llc"]);
        assert!(depends(b"\0depends=\0").is_empty());
    }
}
