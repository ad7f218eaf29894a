//! Project tasks: `bootstrap` (the eBPF toolchain and test tools), `test` (what CI runs),
//! `demo` (profile a real datapath on this machine), `bench` (overhead, measured A/B).

mod bench;
mod bench_agent;
mod bench_fidelity;
mod bench_flame;
mod bench_scale;
mod bench_services;
mod bench_soak;
mod bench_truth;
mod bootstrap;
mod demo;
mod fuzz;
mod image;
mod report;
mod vmtest;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent: checks first, installs what is missing).
    Bootstrap {
        /// Only the build toolchain, not the test tools (for the container image).
        #[arg(long)]
        build_only: bool,
    },
    /// Lints, unit tests and the privileged integration tests (what CI runs).
    Test {
        /// Skip formatting and clippy checks.
        #[arg(long)]
        no_lint: bool,
    },
    /// The lab: every CNI model built on this machine, iperf3 and request/response through
    /// each, cnitrace's breakdown per model (table + SVG), then the netfilter rule sweep.
    Demo {
        /// Profiled seconds per run.
        #[arg(long, default_value_t = 3)]
        duration: u32,
        /// Rule counts of the netfilter sweep.
        #[arg(long, default_value = "0,500,1000,2000")]
        rules: String,
    },
    /// The tracing backend on Debian's 6.1 and 6.12 cloud kernels under QEMU (TCG).
    Vmtest(vmtest::Args),
    /// Sampling overhead on iperf3 throughput, A/B alternated in one run.
    Bench(bench::Args),
    /// The agent's memory, idle CPU and stop-to-breakdown time.
    BenchAgent(bench_agent::Args),
    /// Component shares vs perf record on the same window, and the cost of a result.
    BenchFidelity(bench_fidelity::Args),
    /// The agent's cost and memory as pods and TCP connections grow.
    BenchScale(bench_scale::Args),
    /// The agent for a long while under sessions, scrapers, polling, veth churn and traffic.
    BenchSoak(bench_soak::Args),
    /// Ablation ground truth: each component's claimed CPP against the busy cycles per packet
    /// its removal saves (netfilter, bpf, vxlan), A/B alternated.
    BenchTruth(bench_truth::Args),
    /// Flame graphs: time and size of each artefact, the cost of keeping stacks, and the
    /// graphs in docs/.
    BenchFlame(bench_flame::Args),
    /// Services: cost per new connection and set-up latency against their number, in
    /// kube-proxy's iptables and nftables modes.
    BenchServices(bench_services::Args),
    /// The agent's container image from deploy/Dockerfile (podman), and with --check a run of
    /// it exactly as the DaemonSet runs it.
    Image(image::Args),
    /// Every parser of outside text under libFuzzer (cargo-fuzz), from the seeds in fuzz/corpus.
    Fuzz(fuzz::Args),
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command in the workspace root, streaming its output; fails on a non-zero exit.
pub fn run_command(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    eprintln!("xtask: {shown}");
    let status = cmd
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("cannot run {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|u| u.split_whitespace().nth(1))
            == Some("0")
    })
}

/// The manifests the kustomization applies (the ServiceMonitor needs the operator's CRD schema,
/// which the Kubernetes schemas do not have).
const MANIFESTS: &[&str] = &[
    "deploy/namespace.yaml",
    "deploy/serviceaccount.yaml",
    "deploy/daemonset.yaml",
    "deploy/service.yaml",
];
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// Validates deploy/ offline against the Kubernetes schemas bundled with kubernetes-validate,
/// installed in a virtualenv inside the clone (target/k8s-venv).
fn validate_manifests() -> Result<()> {
    let venv = workspace_root().join("target/k8s-venv");
    if !venv.join("bin/kubernetes-validate").exists() {
        run_command(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run_command(Command::new(venv.join("bin/pip")).args([
            "install",
            "-q",
            KUBERNETES_VALIDATE,
        ]))?;
    }
    run_command(
        Command::new(venv.join("bin/kubernetes-validate"))
            .args(["--strict", "--quiet"])
            .args(MANIFESTS),
    )
}

/// schemathesis, which checks the agent against its OpenAPI document
/// (`tests/tests/api_schema.rs`), in a virtualenv inside the clone (target/api-venv).
const SCHEMATHESIS: &str = "schemathesis==4.32.5";

fn ensure_schemathesis() -> Result<()> {
    let venv = workspace_root().join("target/api-venv");
    if !venv.join("bin/st").exists() {
        run_command(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        run_command(Command::new(venv.join("bin/pip")).args(["install", "-q", SCHEMATHESIS]))?;
    }
    Ok(())
}

fn test(no_lint: bool) -> Result<()> {
    bootstrap::ensure()?;
    if !no_lint {
        run_command(cargo().args(["fmt", "--all", "--check"]))?;
        run_command(cargo().args([
            "clippy",
            "--workspace",
            "--exclude",
            "cnitrace-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
        // The eBPF crate only builds for the BPF target, with nightly and build-std.
        run_command(
            Command::new("rustup")
                .args([
                    "run",
                    "nightly",
                    "cargo",
                    "clippy",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                ])
                .args([
                    "--package",
                    "cnitrace-ebpf",
                    "--bins",
                    "--",
                    "-D",
                    "warnings",
                ])
                .env(
                    "CARGO_ENCODED_RUSTFLAGS",
                    "--cfg=bpf_target_arch=\"x86_64\"",
                )
                .env_remove("RUSTC")
                .env_remove("RUSTUP_TOOLCHAIN")
                .env(
                    "CARGO_TARGET_DIR",
                    workspace_root().join("target/ebpf-lint"),
                ),
        )?;
    }
    validate_manifests()?;
    ensure_schemathesis()?;
    run_command(cargo().args(["build", "--package", "cnitrace"]))?;
    let mut tests = cargo();
    tests.args(["test", "--workspace", "--exclude", "cnitrace-ebpf"]);
    if is_root() {
        // On a machine where the privileged tests can run, a skip is a failure.
        tests.env("CNITRACE_REQUIRE_PRIVILEGED", "1");
    } else {
        eprintln!("xtask: not root: privileged tests will report themselves as skipped");
    }
    run_command(&mut tests)?;
    cnitrace_tests::remove_stale();
    // A short fuzzing pass over every parser of outside text (longer runs: `cargo xtask fuzz`).
    fuzz::run(&fuzz::Args {
        seconds: 15,
        targets: Vec::new(),
    })?;
    if is_root() {
        // The tracing backend needs kprobes and fentry, which this machine's kernel may lack:
        // proven on Debian's distro kernels under QEMU.
        print!("{}", vmtest::run(&vmtest::Args::default())?);
        // The image, run as the DaemonSet runs it.
        let tag = "localhost/cnitrace:test";
        image::build(tag)?;
        print!("{}", image::check(tag, &[])?);
    } else {
        eprintln!("xtask: not root: vmtest (QEMU kernels) and the image check skipped");
    }
    eprintln!("xtask: all tests passed");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Bootstrap { build_only: false } => bootstrap::ensure(),
        Task::Bootstrap { build_only: true } => bootstrap::ensure_build(),
        Task::Test { no_lint } => test(no_lint),
        Task::Demo { duration, rules } => demo::run(duration, &rules),
        Task::Vmtest(args) => {
            vmtest::run(&args).and_then(|summary| report::publish("vmtest", &summary))
        }
        Task::Bench(args) => bench::run(&args),
        Task::BenchAgent(args) => bench_agent::run(&args),
        Task::BenchFidelity(args) => bench_fidelity::run(&args),
        Task::BenchScale(args) => bench_scale::run(&args),
        Task::BenchSoak(args) => bench_soak::run(&args),
        Task::BenchTruth(args) => bench_truth::run(&args),
        Task::BenchFlame(args) => bench_flame::run(&args),
        Task::BenchServices(args) => bench_services::run(&args),
        Task::Fuzz(args) => fuzz::run(&args),
        Task::Image(args) => image::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
