//! `cargo xtask bench-truth`: ablation ground truth for component CPP. A component's CPP should
//! equal what removing it saves in busy cycles per packet of the whole node, so each experiment
//! runs the same saturating iperf3 transfer with the component (side A) and without it (side
//! B), alternated round by round, and sets the profiler's claimed difference against the busy
//! cycles (cpuidle residency) the node actually spent.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::Ipv4Addr,
    path::Path,
    process::{Child, Command, Output, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use cnitrace_tests::{Flow, Shape, Topology, ns_run, remove_stale};
use serde_json::Value;

use crate::{
    bench::{busy_by_proc_stat, busy_cpu_seconds, mean_ci, median},
    bootstrap, cargo, run_command, workspace_root,
};

#[derive(clap::Args)]
pub struct Args {
    /// Rounds; each runs both sides of every experiment, A then B, then B then A, and so on.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Seconds of each iperf3 transfer.
    #[arg(long, default_value_t = 4)]
    seconds: u32,
    /// Experiments to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "netfilter-toggle,netfilter-rules,bpf,vxlan"
    )]
    experiments: Vec<Experiment>,
    /// Iterations of work per skb of the tc program in the bpf experiment (0: a no-op
    /// program, whose cost is the hook's alone). The default is the program's maximum: about
    /// 770 claimed CPP here against a 60-200 CPP spread of the busy CPP within a side (2000
    /// loops claimed ~180, inside that spread).
    #[arg(long, default_value_t = 8192)]
    bpf_loops: u32,
    /// The attribution rule the profiler charges samples by (`cnitrace profile --view`):
    /// layer, self or children.
    #[arg(long, default_value = "layer")]
    view: String,
}

/// One ablation: what side A has and side B lacks.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Experiment {
    /// bridge-nf-call-iptables on and off, 1000 FORWARD rules.
    NetfilterToggle,
    /// 1000 FORWARD rules against none, two bridged topologies alive at once.
    NetfilterRules,
    /// A tc program on the node's ingress, attached or not.
    Bpf,
    /// The same pods reached over VXLAN or routed natively between two hosts.
    Vxlan,
}

/// A row of the report: its label and the components whose CPP it sums.
type Claim = (&'static str, &'static [&'static str]);

impl Experiment {
    fn title(self) -> &'static str {
        match self {
            Experiment::NetfilterToggle => "netfilter (bridge-nf on/off, 1000 rules)",
            Experiment::NetfilterRules => "netfilter (1000 vs 0 rules)",
            Experiment::Bpf => "bpf (tc program attached/detached)",
            Experiment::Vxlan => "vxlan (overlay vs routed, two hosts)",
        }
    }

    fn claims(self) -> &'static [Claim] {
        match self {
            Experiment::NetfilterToggle | Experiment::NetfilterRules => {
                &[("netfilter", &["netfilter"])]
            }
            Experiment::Bpf => &[("bpf", &["bpf"])],
            Experiment::Vxlan => &[
                ("vxlan", &["vxlan"]),
                ("vxlan + tunnel_offload", &["vxlan", "tunnel_offload"]),
            ],
        }
    }

    /// The topologies both sides run on (side A's first).
    fn topologies(self) -> Result<Vec<Topology>> {
        Ok(match self {
            Experiment::NetfilterToggle => vec![Topology::new(Shape::Bridged { rules: 1000 })?],
            Experiment::NetfilterRules => vec![
                Topology::new(Shape::Bridged { rules: 1000 })?,
                Topology::new(Shape::Bridged { rules: 0 })?,
            ],
            Experiment::Bpf => vec![Topology::new(Shape::Bridged { rules: 0 })?],
            Experiment::Vxlan => vec![Topology::new(Shape::TwoHosts)?],
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    A,
    B,
}

/// All that differs between the runs of one experiment.
struct Plan<'a> {
    topo: &'a Topology,
    target: Ipv4Addr,
    /// bridge-nf-call-iptables of the node namespace, set before the run.
    bridge_nf: Option<bool>,
    /// `cnitrace lab tc-work --loops` on the node's end of the client's veth during the run.
    tc_loops: Option<u32>,
}

fn plan(
    experiment: Experiment,
    topologies: &[Topology],
    side: Side,
    bpf_loops: u32,
) -> Result<Plan<'_>> {
    let a = side == Side::A;
    let topo = match experiment {
        Experiment::NetfilterRules if !a => &topologies[1],
        _ => &topologies[0],
    };
    let base = Plan {
        topo,
        target: topo.server_ip,
        bridge_nf: None,
        tc_loops: None,
    };
    Ok(match experiment {
        Experiment::NetfilterToggle => Plan {
            bridge_nf: Some(a),
            ..base
        },
        Experiment::NetfilterRules => base,
        Experiment::Bpf => Plan {
            tc_loops: a.then_some(bpf_loops),
            ..base
        },
        Experiment::Vxlan if a => base,
        Experiment::Vxlan => Plan {
            target: topo
                .server_native_ip
                .context("the two-host topology has no native address")?,
            ..base
        },
    })
}

/// A child process killed and reaped when dropped, on every path out of the bench (nothing
/// cnitrace attaches is pinned, so SIGKILL leaves nothing behind).
struct Running(Option<Child>);

impl Running {
    /// Spawns `command` with stderr piped and waits until a line of it contains `marker`;
    /// the rest of stderr is drained so the child never blocks on a full pipe.
    fn start(command: &mut Command, marker: &'static str) -> Result<Self> {
        let mut child = command
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {command:?}"))?;
        let stderr = child.stderr.take().context("stderr")?;
        let running = Running(Some(child));
        let (seen, wait) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
            let mut said = String::new();
            while let Some(Ok(line)) = lines.next() {
                if line.contains(marker) {
                    let _ = seen.send(Ok(()));
                    lines.for_each(drop);
                    return;
                }
                said.push_str(&line);
                said.push('\n');
            }
            let _ = seen.send(Err(said));
        });
        match wait.recv_timeout(Duration::from_mins(1)) {
            Ok(Ok(())) => Ok(running),
            Ok(Err(said)) => bail!("{command:?} exited before `{marker}`: {}", said.trim()),
            Err(_) => bail!("{command:?} did not print `{marker}` within a minute"),
        }
    }

    /// Interrupts (SIGINT, as Ctrl-C: the profiler prints its breakdown, tc-work detaches)
    /// and returns what the child printed.
    fn stop(mut self) -> Result<Output> {
        let child = self.0.take().context("stopped twice")?;
        let child_id = child.id();
        let status = Command::new("kill")
            .args(["-INT", &child_id.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -INT {child_id} failed");
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "child {} exited with {} when interrupted",
                child_id,
                out.status
            );
        }
        Ok(out)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `cnitrace profile` counting packets on the client pod's interface, its window open.
fn start_profile(bin: &Path, topo: &Topology, view: &str) -> Result<Running> {
    let mut command = Command::new(bin);
    command
        .args([
            "profile",
            "--duration",
            "600",
            "--format",
            "json",
            "--view",
            view,
        ])
        .args(["--no-ruleset", "--iface", &topo.client_iface])
        .args(["--netns", &topo.client])
        .stdout(Stdio::piped());
    Running::start(&mut command, "profiling for")
}

/// The tc program on the ingress of the node's end of the client's veth, attached.
fn start_tc_work(bin: &Path, topo: &Topology, loops: u32) -> Result<Running> {
    let mut command = Command::new(bin);
    command
        .args(["lab", "tc-work", "--netns", &topo.node])
        .args(["--iface", &topo.node_client_iface, "--direction", "ingress"])
        .args(["--loops", &loops.to_string()])
        .stdout(Stdio::null());
    Running::start(&mut command, "attached to")
}

/// bridge-nf-call-iptables of the node namespace. The sysctl is per network namespace (on
/// 6.18, writing it in a fresh namespace leaves the host's value), so the host keeps its own.
fn set_bridge_nf(node: &str, on: bool) -> Result<()> {
    let setting = format!("net.bridge.bridge-nf-call-iptables={}", u8::from(on));
    ns_run(node, &["sysctl", "-qw", &setting])?;
    Ok(())
}

/// One run's truth and claims.
struct Sample {
    /// Busy cycles of the node per packet, from cpuidle residency: the truth.
    busy_cpp: f64,
    /// The same from /proc/stat, whose idle time also covers the idle loop's own work
    /// (entering and leaving the idle state), which cpuidle residency counts as busy.
    stat_cpp: f64,
    /// The profiler's own total CPP.
    profiled_cpp: f64,
    /// CPP of every component and sub-component the profiler reported.
    cpp: BTreeMap<String, f64>,
    gbps: f64,
    /// [`background_busy`] just before the transfer.
    background: f64,
}

impl Sample {
    fn parse(json: &Value, busy_s: f64, stat_s: f64, gbps: f64) -> Result<Self> {
        let cycles_per_ns = json["clock"]["cycles_per_ns"]
            .as_f64()
            .context("no clock.cycles_per_ns")?;
        let packets = json["packets"]["count"]
            .as_f64()
            .filter(|&p| p > 0.0)
            .context("no packets counted")?;
        let cpp = ["components", "subcomponents"]
            .iter()
            .flat_map(|key| json[key].as_array().into_iter().flatten())
            .filter_map(|c| Some((c["name"].as_str()?.to_owned(), c["cpp"].as_f64()?)))
            .collect();
        Ok(Sample {
            busy_cpp: busy_s * 1e9 * cycles_per_ns / packets,
            stat_cpp: stat_s * 1e9 * cycles_per_ns / packets,
            profiled_cpp: json["total"]["cpp"].as_f64().unwrap_or(f64::NAN),
            cpp,
            gbps,
            background: f64::NAN,
        })
    }

    /// The summed CPP of `components` (absent ones count 0: not seen in the window).
    fn claimed(&self, components: &[&str]) -> f64 {
        components
            .iter()
            .map(|c| self.cpp.get(*c).copied().unwrap_or(0.0))
            .sum()
    }
}

/// One profiled iperf3 transfer of `plan`. The busy CPU is read around the transfer alone, the
/// profiler's window spans it (and counts its packets).
fn measure(bin: &Path, plan: &Plan, args: &Args) -> Result<Sample> {
    if let Some(on) = plan.bridge_nf {
        set_bridge_nf(&plan.topo.node, on)?;
    }
    // Attached before the profiler starts and detached after it ends, so the program's
    // symbol is known to the profiler for the whole window.
    let work = plan
        .tc_loops
        .map(|loops| start_tc_work(bin, plan.topo, loops))
        .transpose()?;
    let profile = start_profile(bin, plan.topo, &args.view)?;
    let background = background_busy()?;
    let (before, stat_before) = (busy_cpu_seconds()?, busy_by_proc_stat()?);
    let topo = plan.topo;
    let gbps = Flow::new(&topo.client, &topo.server, plan.target, args.seconds)
        .start()?
        .finish()?;
    let busy_s = busy_cpu_seconds()? - before;
    let stat_s = busy_by_proc_stat()? - stat_before;
    // The connection's last segments (FIN, ACK) are out within milliseconds.
    thread::sleep(Duration::from_millis(300));
    let out = profile.stop()?;
    if let Some(work) = work {
        work.stop()?;
    }
    let json: Value = serde_json::from_slice(&out.stdout).context("the profile's JSON")?;
    Ok(Sample {
        background,
        ..Sample::parse(&json, busy_s, stat_s, gbps)?
    })
}

/// The busy fraction of all CPUs over half a second with no traffic (the profiler sampling):
/// the truth counts every busy cycle of the node, so anything else running (a build, say)
/// shows up here and in the spread, never silently.
fn background_busy() -> Result<f64> {
    let span = Duration::from_millis(500);
    let cpus = thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    let before = busy_cpu_seconds()?;
    thread::sleep(span);
    Ok((busy_cpu_seconds()? - before) / (span.as_secs_f64() * cpus))
}

/// Both sides of one round: (A, B).
type Pair = (Sample, Sample);

/// Runs every round of `experiment` on topologies made for it (removed when it ends).
fn run_experiment(bin: &Path, experiment: Experiment, args: &Args) -> Result<Vec<Pair>> {
    let topologies = experiment.topologies()?;
    let mut pairs = Vec::new();
    for round in 0..args.rounds {
        // A then B, next round B then A: neither side always runs first.
        let order = if round % 2 == 0 {
            [Side::A, Side::B]
        } else {
            [Side::B, Side::A]
        };
        let (mut a, mut b) = (None, None);
        for side in order {
            let plan = plan(experiment, &topologies, side, args.bpf_loops)?;
            let sample = measure(bin, &plan, args)?;
            progress(experiment, round, args.rounds, side, &sample);
            match side {
                Side::A => a = Some(sample),
                Side::B => b = Some(sample),
            }
        }
        pairs.push((a.context("side A")?, b.context("side B")?));
    }
    Ok(pairs)
}

fn progress(experiment: Experiment, round: u32, rounds: u32, side: Side, sample: &Sample) {
    let claims = experiment
        .claims()
        .iter()
        .map(|(label, components)| format!("{label} {:.1}", sample.claimed(components)))
        .collect::<Vec<_>>()
        .join(", ");
    eprintln!(
        "bench-truth: {} round {}/{rounds} side {}: {:.2} Gbit/s, busy CPP {:.0}, profiled CPP {:.0}, {claims}, background busy {:.1}%",
        experiment.title(),
        round + 1,
        if side == Side::A { "A" } else { "B" },
        sample.gbps,
        sample.busy_cpp,
        sample.profiled_cpp,
        sample.background * 100.0,
    );
}

/// Sample standard deviation.
fn std_dev(values: &[f64]) -> f64 {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
}

fn median_of(values: &[f64]) -> f64 {
    median(&mut values.to_vec())
}

fn min_max(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// The per-round A-B differences of `f`.
fn differences(pairs: &[Pair], f: impl Fn(&Sample) -> f64) -> Vec<f64> {
    pairs.iter().map(|(a, b)| f(a) - f(b)).collect()
}

fn with_ci(values: &[f64]) -> String {
    let (mean, half) = mean_ci(values);
    format!("{mean:+.1} ± {half:.1}")
}

/// The markdown rows of one experiment, one per claim.
fn rows(out: &mut String, experiment: Experiment, pairs: &[Pair]) {
    let truth = differences(pairs, |s| s.busy_cpp);
    let stat_truth = differences(pairs, |s| s.stat_cpp);
    let profiled = differences(pairs, |s| s.profiled_cpp);
    let side = |f: fn(&Pair) -> &Sample, g: fn(&Sample) -> f64| {
        pairs.iter().map(|p| g(f(p))).collect::<Vec<f64>>()
    };
    let (busy_a, busy_b) = (
        side(|p| &p.0, |s| s.busy_cpp),
        side(|p| &p.1, |s| s.busy_cpp),
    );
    let (gbps_a, gbps_b) = (side(|p| &p.0, |s| s.gbps), side(|p| &p.1, |s| s.gbps));
    let background: Vec<f64> = pairs
        .iter()
        .flat_map(|(a, b)| [a.background * 100.0, b.background * 100.0])
        .collect();
    for (label, components) in experiment.claims() {
        let claimed = differences(pairs, |s| s.claimed(components));
        let ratios: Vec<f64> = claimed.iter().zip(&truth).map(|(c, t)| c / t).collect();
        let (lo, hi) = min_max(&ratios);
        let of_means = |truth: &[f64]| mean_ci(&claimed).0 / mean_ci(truth).0;
        let _ = writeln!(
            out,
            "| {} | {label} | {} | {:+.1} | {} | {} | {:+.1} | {} | {:.2} ({lo:.2} to {hi:.2}) | {:.2} / {:.2} | {:+.1} | {:.1} / {:.1} | {:.2} / {:.2} | {:.1} ({:.1}) |",
            experiment.title(),
            pairs.len(),
            median_of(&truth),
            with_ci(&truth),
            with_ci(&stat_truth),
            median_of(&claimed),
            with_ci(&claimed),
            median_of(&ratios),
            of_means(&truth),
            of_means(&stat_truth),
            median_of(&profiled),
            std_dev(&busy_a),
            std_dev(&busy_b),
            median_of(&gbps_a),
            median_of(&gbps_b),
            median_of(&background),
            min_max(&background).1,
        );
    }
}

/// Components and sub-components outside the experiment's claims that changed most between
/// A and B: where the rest of the saving was charged. Leaves only (a parent is the sum of its
/// dotted parts), by |median difference|.
fn elsewhere(experiment: Experiment, pairs: &[Pair]) -> String {
    let claimed: BTreeSet<&str> = experiment
        .claims()
        .iter()
        .flat_map(|(_, components)| components.iter().copied())
        .collect();
    let names: BTreeSet<&String> = pairs
        .iter()
        .flat_map(|(a, b)| a.cpp.keys().chain(b.cpp.keys()))
        .collect();
    let is_parent = |name: &str| names.iter().any(|n| n.starts_with(&format!("{name}.")));
    let family = |name: &str| name.split('.').next().is_some_and(|c| claimed.contains(c));
    let mut changes: Vec<(f64, &str)> = names
        .iter()
        .filter(|n| !family(n) && !is_parent(n))
        .map(|n| {
            let diffs = differences(pairs, |s| s.cpp.get(*n).copied().unwrap_or(0.0));
            (median_of(&diffs), n.as_str())
        })
        .collect();
    changes.sort_by(|x, y| y.0.abs().total_cmp(&x.0.abs()));
    changes
        .iter()
        .take(4)
        .map(|(diff, name)| format!("{name} {diff:+.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn report(args: &Args, results: &[(Experiment, Vec<Pair>)], failures: &[String]) -> String {
    let mut out = String::new();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let command = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let _ = writeln!(out, "\ncommand: cargo xtask {command}");
    let _ = writeln!(out, "kernel: {}", kernel.trim());
    let _ = writeln!(
        out,
        "{} rounds x {} s of iperf3 per side, A/B alternated (A,B then B,A), bpf loops {}, view {}\n",
        args.rounds, args.seconds, args.bpf_loops, args.view
    );
    let _ = writeln!(
        out,
        "| experiment | claim | rounds | true ΔCPP median | true Δ mean ± 95% | true Δ by /proc/stat mean ± 95% | claimed ΔCPP median | claimed Δ mean ± 95% | claimed/true median (min to max) | claimed/true of means: cpuidle / /proc/stat | profiled total Δ median | σ busy CPP A / B | Gbit/s A / B | background busy % median (max) |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for (experiment, pairs) in results {
        rows(&mut out, *experiment, pairs);
    }
    let _ = writeln!(
        out,
        "\nΔ = side A (component present) - side B (removed), per round; true = busy cycles of the whole node per packet (cpuidle residency x cycles_per_ns / packets on the client pod's interface; the /proc/stat column counts the idle loop's own entry and exit work as idle, as the profiler does, where cpuidle residency counts it as busy); claimed = the profiler's CPP of the component(s); ± = 95% Student t half-width of the paired per-round differences; ratio = median of per-round claimed/true; of means = mean claimed Δ / mean true Δ (steadier when a round's true Δ is near 0). Noise: σ is the standard deviation of the true busy CPP within each side over rounds (the A/A spread); a true Δ inside a few σ is not a measured saving. profiled total Δ: the profiler's own total CPP difference. background busy: share of all CPUs busy in the 0.5 s before each transfer (no traffic, profiler sampling); more than a few percent means something else ran on the node and the truth is polluted."
    );
    let _ = writeln!(
        out,
        "\nLargest other changes (median A-B CPP, leaves outside the claim):"
    );
    for (experiment, pairs) in results {
        let _ = writeln!(
            out,
            "- {}: {}",
            experiment.title(),
            elsewhere(*experiment, pairs)
        );
    }
    for failure in failures {
        let _ = writeln!(out, "\nFAILED: {failure}");
    }
    out
}

pub fn run(args: &Args) -> Result<()> {
    if !crate::is_root() {
        bail!("bench-truth needs root (network namespaces, BPF programs, sysctls)");
    }
    if args.rounds < 2 {
        bail!("--rounds must be at least 2 (a spread needs two rounds)");
    }
    bootstrap::ensure_bench()?;
    run_command(cargo().args(["build", "--release", "--package", "cnitrace"]))?;
    let bin = workspace_root().join("target/release/cnitrace");
    remove_stale();
    let (mut results, mut failures) = (Vec::new(), Vec::new());
    for &experiment in &args.experiments {
        // One experiment failing (a module missing, say) still leaves the others' rows.
        match run_experiment(&bin, experiment, args) {
            Ok(pairs) => results.push((experiment, pairs)),
            Err(error) => {
                eprintln!("bench-truth: {}: {error:#}", experiment.title());
                failures.push(format!("{}: {error:#}", experiment.title()));
            }
        }
    }
    print!("{}", report(args, &results, &failures));
    if !failures.is_empty() {
        bail!("{} experiment(s) failed", failures.len());
    }
    Ok(())
}
