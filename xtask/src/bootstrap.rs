//! Idempotent set-up of everything the build and the tests need: apt packages (LLVM 22 for
//! bpf-linker, iperf3, iptables, bpftool, ...), nightly rust-src, and bpf-linker 0.13.0 built
//! against LLVM 22. Each piece is checked first and installed only when missing.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::run_command as run;

/// Debian packages for building: LLVM 22 for bpf-linker.
const BUILD_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// The tests' and the demo's real tools.
const TEST_PACKAGES: &[&str] = &[
    "iperf3",
    "iptables",
    "nftables",
    "bpftool",
    "iproute2",
    "util-linux",
    "procps",
    // Headless browser for the test of the agent's page.
    "chromium",
    // Certificates for the agent's TLS test.
    "openssl",
    // `go tool pprof` reads the pprof profiles cnitrace writes (the format's own reader).
    "golang-go",
    // A virtualenv for kubernetes-validate (offline manifest validation).
    "python3-venv",
    // perf record, the usual way to measure this, as the benchmarks' reference, and GNU time for its costs.
    "linux-perf",
    "time",
    // `cargo xtask vmtest`: distro kernels with kprobes and fentry under QEMU.
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "xz-utils",
    "binutils",
    // `cargo xtask image`: the container image built and run as the DaemonSet runs it (runc:
    // crun refuses hosts with hybrid cgroups; mmdebstrap makes the Debian base where no
    // registry is reachable).
    "podman",
    "runc",
    "mmdebstrap",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

fn apt_missing(packages: &[&'static str]) -> Vec<&'static str> {
    packages
        .iter()
        .copied()
        .filter(|pkg| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", pkg])
                .output();
            !out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

fn ensure_apt(packages: &[&'static str]) -> Result<()> {
    let missing = apt_missing(packages);
    if missing.is_empty() {
        return Ok(());
    }
    if !crate::is_root() {
        bail!(
            "missing packages {}: run `cargo xtask bootstrap` as root",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn ensure_nightly() -> Result<()> {
    let toolchains = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("rustup is required")?;
    if !String::from_utf8_lossy(&toolchains.stdout)
        .lines()
        .any(|l| l.starts_with("nightly"))
    {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()?;
    if !String::from_utf8_lossy(&components.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn ensure_bpf_linker() -> Result<()> {
    let installed = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if installed {
        return Ok(());
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes, once)"
    );
    let path = format!(
        "{LLVM_PREFIX}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    run(crate::cargo()
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("PATH", path)
        .env("LLVM_PREFIX", LLVM_PREFIX))
}

/// Everything: the build toolchain and the test tools.
pub fn ensure() -> Result<()> {
    ensure_apt(TEST_PACKAGES)?;
    ensure_build()
}

/// What the benchmarks compare against besides the test tools (perf is one of those).
const BENCH_PACKAGES: &[&str] = &["bpftrace"];

/// Everything the benchmarks use: the test tools and the peers they are compared with.
pub fn ensure_bench() -> Result<()> {
    ensure()?;
    ensure_apt(BENCH_PACKAGES)
}

/// Only what building needs (the container image's builder stage).
pub fn ensure_build() -> Result<()> {
    ensure_apt(BUILD_PACKAGES)?;
    ensure_nightly()?;
    ensure_bpf_linker()?;
    eprintln!(
        "xtask: toolchain ready (nightly rust-src, bpf-linker {BPF_LINKER_VERSION}, LLVM 22, test tools)"
    );
    Ok(())
}
