//! `cargo xtask fuzz`: every parser of outside text under libFuzzer (cargo-fuzz, nightly), each
//! target for a while from the seed corpus in fuzz/corpus. New inputs and crashes go to
//! target/fuzz, never into the repository's corpus.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{bootstrap, run_command, workspace_root};

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The targets in fuzz/Cargo.toml.
pub const TARGETS: &[&str] = &[
    "iptables_save",
    "nft_json",
    "kallsyms",
    "perf_script",
    "proc_files",
    "session_request",
];

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u32,
    /// Only these targets (default: all).
    #[arg(long = "target")]
    pub targets: Vec<String>,
}

fn ensure_cargo_fuzz() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION));
    if !installed {
        eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute, once)");
        run_command(crate::cargo().args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ]))?;
    }
    Ok(())
}

pub fn run(args: &Args) -> Result<()> {
    bootstrap::ensure_build()?;
    ensure_cargo_fuzz()?;
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in &args.targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("unknown fuzz target `{t}`: one of {}", TARGETS.join(", "));
            }
        }
        args.targets.iter().map(String::as_str).collect()
    };
    let root = workspace_root();
    let work = root.join("target/fuzz");
    // Parsers only: panics are what is looked for, so no sanitizer (which would also reach
    // the eBPF object's build).
    let fuzz = |sub: &str| {
        let mut command = Command::new("rustup");
        command
            .args([
                "run",
                "nightly",
                "cargo",
                "fuzz",
                sub,
                "--sanitizer",
                "none",
            ])
            .current_dir(&root)
            .env_remove("RUSTC")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env("CARGO_TARGET_DIR", work.join("build"));
        command
    };
    let mut build = fuzz("build");
    run_command(&mut build)?;
    let mut summary = Vec::new();
    for target in targets {
        let corpus = work.join("corpus").join(target);
        let artifacts = work.join("artifacts").join(target);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifacts)?;
        let seeds: PathBuf = root.join("fuzz/corpus").join(target);
        eprintln!("xtask: fuzzing {target} for {} s", args.seconds);
        let out = fuzz("run")
            .arg(target)
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={}", args.seconds))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-rss_limit_mb=2048")
            .arg("-max_len=65536")
            .output()
            .with_context(|| format!("cargo fuzz run {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let last = log
            .lines()
            .rev()
            .find(|l| l.starts_with("Done ") || (l.contains('#') && l.contains("exec/s")))
            .unwrap_or("(no summary)")
            .to_owned();
        if !out.status.success() {
            eprintln!("{log}");
            bail!(
                "fuzz target {target} found a failure; the input is in {}",
                artifacts.display()
            );
        }
        summary.push(format!("{target:<16} {last}"));
    }
    println!(
        "fuzz: {} s per target, no failure\n{}",
        args.seconds,
        summary.join("\n")
    );
    Ok(())
}
