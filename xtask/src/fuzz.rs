//! `cargo xtask fuzz`: every parser of outside text under libFuzzer (cargo-fuzz, nightly), each
//! target for a while from the seed corpus in fuzz/corpus/TARGET.
//!
//! Two builds, one per `--sanitizer`:
//!
//! - `address` (the default of `cargo xtask fuzz`): AddressSanitizer, with LeakSanitizer at
//!   exit. Besides panics, hangs and stack overflows it catches what safe Rust cannot show by
//!   itself: out-of-bounds or freed memory in the `unsafe` and C code the parsers reach
//!   (std's, the dependencies'), and leaks. A fifth to a half of `none`'s executions a second;
//!   the build is kept in target/fuzz/build-address. For long runs.
//! - `none`: no sanitizer, as the test command's short pass runs (`cargo xtask test`, 15 s per
//!   target): panics (every failed assertion of a target's invariants), hangs, stack overflows
//!   and `-rss_limit_mb`'s memory blow-ups only, at full speed. Built in target/fuzz/build.
//!
//! The sanitizer instruments the fuzz crate and its dependencies for the host target only;
//! the eBPF object that cnitrace's build script builds gets its own flags (aya-build sets
//! `CARGO_ENCODED_RUSTFLAGS`), so it is the same in both builds.
//!
//! New interesting inputs go to target/fuzz/corpus/TARGET, which grows from run to run;
//! failures go to target/fuzz/artifacts/TARGET. With `--keep`, after a target's run libFuzzer
//! merges (`-merge=1`) the inputs found there that are smaller than 16 KiB into
//! fuzz/corpus/TARGET: only those that reach code (edges) the seeds already there do not, each
//! named by the SHA-1 of its content. Against the hand-written seeds that is tens to hundreds of
//! small files per target at first (a few KiB to 100 KiB in all), few once they are in; commit
//! the ones worth keeping.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

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
    "cni_config",
    "host_origin",
];

/// Inputs are capped at this (`-max_len`); the largest seeds are just below it.
const MAX_LEN: usize = 64 * 1024;

/// `--keep` copies found inputs smaller than this into fuzz/corpus.
const KEEP_BELOW: u64 = 16 * 1024;

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Sanitizer {
    /// AddressSanitizer (and LeakSanitizer): memory errors besides panics; slower.
    Address,
    /// No sanitizer: panics, hangs and stack overflows only, at full speed.
    None,
}

impl Sanitizer {
    fn as_str(self) -> &'static str {
        match self {
            Sanitizer::Address => "address",
            Sanitizer::None => "none",
        }
    }

    /// Where the build with this sanitizer lives (the two would rebuild each other).
    fn build_dir(self, work: &Path) -> PathBuf {
        match self {
            Sanitizer::Address => work.join("build-address"),
            Sanitizer::None => work.join("build"),
        }
    }
}

/// How the targets run beyond their time: what `cargo xtask fuzz` adds on its command line.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub sanitizer: Sanitizer,
    /// Merge new inputs below 16 KiB into fuzz/corpus.
    pub keep: bool,
}

impl Options {
    /// The test command's short pass: no sanitizer, nothing kept.
    pub const SHORT_PASS: Options = Options {
        sanitizer: Sanitizer::None,
        keep: false,
    };
}

/// Which targets for how long; built by the test command for its short pass (which runs with
/// [`Options::SHORT_PASS`]) and parsed from `cargo xtask fuzz`'s command line, whose
/// `--sanitizer` and `--keep` are kept aside as its [`Options`].
pub struct Args {
    /// Seconds per target.
    pub seconds: u32,
    /// Only these targets (default: all).
    pub targets: Vec<String>,
}

/// `cargo xtask fuzz`'s command line.
#[derive(clap::Args)]
struct Cli {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    seconds: u32,
    /// Only these targets (default: all).
    #[arg(long = "target")]
    targets: Vec<String>,
    /// AddressSanitizer (memory errors and leaks besides panics; slower) or none (as the test
    /// command's short pass runs).
    #[arg(long, value_enum, default_value_t = Sanitizer::Address)]
    sanitizer: Sanitizer,
    /// After each target, merge the new inputs it found that are smaller than 16 KiB and add
    /// coverage into fuzz/corpus/TARGET.
    #[arg(long)]
    keep: bool,
}

/// The options parsed from the command line, when `cargo xtask fuzz` is what runs. `Args` has
/// only the two fields the test command's struct literal (main.rs) sets, so the options parsed
/// with them travel here; were that literal to name them, they could be fields of `Args`.
static CLI_OPTIONS: OnceLock<Options> = OnceLock::new();

impl Cli {
    fn split(self) -> Args {
        let _ = CLI_OPTIONS.set(Options {
            sanitizer: self.sanitizer,
            keep: self.keep,
        });
        Args {
            seconds: self.seconds,
            targets: self.targets,
        }
    }
}

impl clap::FromArgMatches for Args {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Ok(Cli::from_arg_matches(matches)?.split())
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl clap::Args for Args {
    fn group_id() -> Option<clap::Id> {
        Cli::group_id()
    }

    fn augment_args(command: clap::Command) -> clap::Command {
        Cli::augment_args(command)
    }

    fn augment_args_for_update(command: clap::Command) -> clap::Command {
        Cli::augment_args_for_update(command)
    }
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

/// Runs the targets: with `cargo xtask fuzz`'s options when that is what runs, else (the test
/// command's short pass) with [`Options::SHORT_PASS`].
pub fn run(args: &Args) -> Result<()> {
    run_with(
        args,
        CLI_OPTIONS.get().copied().unwrap_or(Options::SHORT_PASS),
    )
}

pub fn run_with(args: &Args, options: Options) -> Result<()> {
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
    let sanitizer = options.sanitizer;
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
                sanitizer.as_str(),
            ])
            .current_dir(&root)
            .env_remove("RUSTC")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env("CARGO_TARGET_DIR", sanitizer.build_dir(&work));
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
        eprintln!(
            "xtask: fuzzing {target} for {} s (sanitizer: {})",
            args.seconds,
            sanitizer.as_str()
        );
        let out = fuzz("run")
            .arg(target)
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={}", args.seconds))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-rss_limit_mb=2048")
            .arg(format!("-max_len={MAX_LEN}"))
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
        let kept = if options.keep {
            let kept = keep(target, &corpus, &seeds, &work, || fuzz("run"))?;
            format!(", {kept} new input(s) kept in fuzz/corpus/{target}")
        } else {
            String::new()
        };
        summary.push(format!("{target:<16} {last}{kept}"));
    }
    println!(
        "fuzz: {} s per target, sanitizer {}, no failure\n{}",
        args.seconds,
        sanitizer.as_str(),
        summary.join("\n")
    );
    Ok(())
}

/// Merges the inputs found (`corpus`) smaller than [`KEEP_BELOW`] into the seeds: libFuzzer
/// adds to `seeds` only those that add coverage beyond what is there. How many it added.
fn keep(
    target: &str,
    corpus: &Path,
    seeds: &Path,
    work: &Path,
    run: impl Fn() -> Command,
) -> Result<usize> {
    let names = |dir: &Path| -> Result<BTreeSet<std::ffi::OsString>> {
        Ok(std::fs::read_dir(dir)
            .with_context(|| format!("read {}", dir.display()))?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?)
    };
    let candidates = work.join("keep").join(target);
    if candidates.exists() {
        std::fs::remove_dir_all(&candidates)
            .with_context(|| format!("remove {}", candidates.display()))?;
    }
    std::fs::create_dir_all(&candidates)?;
    for entry in std::fs::read_dir(corpus)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_file() && meta.len() < KEEP_BELOW {
            std::fs::copy(entry.path(), candidates.join(entry.file_name()))?;
        }
    }
    let before = names(seeds)?;
    let out = run()
        .arg(target)
        .arg(seeds)
        .arg(&candidates)
        .arg("--")
        .arg("-merge=1")
        // New edges only, not new hit counts of known ones: far fewer inputs (after 5 s of
        // host_origin, 46 rather than 311).
        .arg("-use_counters=0")
        .arg(format!("-max_len={MAX_LEN}"))
        .arg("-rss_limit_mb=2048")
        .output()
        .with_context(|| format!("cargo fuzz run {target} -- -merge=1"))?;
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        bail!(
            "merging {target}'s new inputs into {} failed",
            seeds.display()
        );
    }
    std::fs::remove_dir_all(&candidates)?;
    Ok(names(seeds)?.difference(&before).count())
}
