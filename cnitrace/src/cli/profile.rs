//! `cnitrace profile` and `cnitrace netfilter`: one window from the command line.

use std::io::{IsTerminal as _, Write as _};

use cnitrace::{
    contract::{Breakdown, PacketUnit, View},
    flame, netfilter,
    probe::{AttachMode, Backend, BackendKind},
    profile::{self, Ending, ProfileOptions},
    render,
    window::WindowSpec,
};

use super::{Format, interrupted};

/// What `profile` and `netfilter` share: the window, the probes, the packets and the output.
#[derive(clap::Args)]
pub struct WindowArgs {
    /// Window length in seconds. Ctrl-C ends the window early and still reports it.
    #[arg(short, long, default_value_t = 10.0, allow_negative_numbers = true)]
    pub duration: f64,
    /// auto is sampling (its cost does not grow with the packet rate); tracing puts a probe
    /// pair on every call of each component's entry points (kprobes or fentry).
    #[arg(long, value_enum, default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,
    /// Tracing: fentry/fexit per function where possible else kprobes (auto), or force one.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub attach: AttachMode,
    #[command(flatten)]
    pub probes: super::ProbeArgs,
    /// Interface(s) whose transmitted packets are the denominator (summed). Default: the
    /// interface that transmitted the most in the window.
    #[arg(short, long = "iface")]
    pub ifaces: Vec<String>,
    /// Named network namespace(s) (`ip netns`) where --iface names are looked up.
    #[arg(short, long = "netns")]
    pub netns: Vec<String>,
    /// What a packet is: a wire-size segment (default, as on the wire) or an skb.
    #[arg(long, value_enum, default_value_t = PacketUnit::Segment)]
    pub packet_unit: PacketUnit,
    /// How a sampled stack is charged: layer (the first component frame from the innermost
    /// outward, stopping at a layer boundary such as ip_rcv or a softirq entry), self (the
    /// innermost function's component, as perf --no-children) or children (every component
    /// on the stack, as perf --children; shares may add up to more than 100%).
    #[arg(long, value_enum, default_value_t = View::Layer)]
    pub view: View,
    /// Also split each component by the context its work ran in (hardirq, softirq inline,
    /// ksoftirqd, process) in the table; the JSON always has it (`by_context`).
    #[arg(long, value_enum)]
    pub by: Option<Split>,
    /// table and json: the breakdown; folded: the sampled stacks as `outer;...;inner cycles`
    /// lines (flamegraph.pl, inferno, speedscope); pprof: a gzipped pprof profile (go tool
    /// pprof, Pyroscope, Parca) to stdout.
    #[arg(short, long, value_enum, default_value_t = ProfileFormat::Table)]
    pub format: ProfileFormat,
    /// Include the sampled stacks in the JSON (input of `cnitrace diff`).
    #[arg(long)]
    pub stacks: bool,
    /// Also write an interactive SVG flame graph of the window here, frames coloured by
    /// component.
    #[arg(long, value_name = "FILE.svg")]
    pub flamegraph: Option<std::path::PathBuf>,
}

/// An extra split of the table.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    Context,
}

/// What `profile` prints.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProfileFormat {
    Table,
    Json,
    Folded,
    Pprof,
}

#[derive(clap::Args)]
pub struct ProfileArgs {
    #[command(flatten)]
    pub window: WindowArgs,
    /// Count the packets entering each netfilter hook with a temporary nftables table (removed
    /// afterwards), so rules per packet are known for nft-based iptables too.
    #[arg(long)]
    pub count_hook_entries: bool,
    /// Do not read the iptables/nftables rulesets around the window.
    #[arg(long, conflicts_with = "count_hook_entries")]
    pub no_ruleset: bool,
}

#[derive(clap::Args)]
pub struct NetfilterArgs {
    #[command(flatten)]
    pub window: WindowArgs,
    /// Count the packets entering each netfilter hook with a temporary nftables table
    /// (`cnitrace_entries_*`, removed afterwards, also on Ctrl-C): this changes the firewall
    /// for the window. Without it, rules per packet are known where the rules keep counters
    /// (iptables-legacy, iptables-nft, nft rules with `counter`) and hook entries are not.
    #[arg(long)]
    pub count_hook_entries: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Report {
    Breakdown,
    Netfilter,
}

/// What is read around the window beside the probes.
#[derive(Clone, Copy)]
pub struct Rulesets {
    pub read: bool,
    pub count_hook_entries: bool,
}

pub async fn run(args: WindowArgs, rulesets: Rulesets, report: Report) -> anyhow::Result<()> {
    if args.format == ProfileFormat::Pprof && std::io::stdout().is_terminal() {
        anyhow::bail!(
            "--format pprof writes a binary profile: redirect stdout to a file (> profile.pb.gz)"
        );
    }
    let wants_stacks = args.stacks
        || args.flamegraph.is_some()
        || matches!(args.format, ProfileFormat::Folded | ProfileFormat::Pprof);
    let options = ProfileOptions {
        duration_s: args.duration,
        backend: Backend::requested(args.backend, args.attach)?,
        sampler: args.probes.config(),
        window: WindowSpec {
            ifaces: args.ifaces.clone(),
            unit: args.packet_unit,
            view: args.view,
            netfilter: netfilter::Options {
                read_rules: rulesets.read,
                count_entries: rulesets.count_hook_entries,
                namespaces: args.netns.clone(),
            },
            netns: args.netns.clone(),
            bpf_stats: true,
            stacks: wants_stacks,
        },
    };
    let tty = std::io::stderr().is_terminal();
    // Without a terminal, one line once the window is open (probes attached, start snapshot
    // taken): scripts and benchmarks start their traffic when they read it.
    let mut announced = false;
    let progress = |elapsed: f64, total: f64| {
        if tty {
            eprint!(
                "\rcnitrace: profiling {elapsed:>5.0}/{total:.0} s (Ctrl-C ends the window early)"
            );
        } else if !announced {
            announced = true;
            eprintln!("cnitrace: profiling for {total} s (Ctrl-C ends the window early)");
        }
    };
    let (breakdown, ending) = profile::run(&options, interrupted(), progress).await?;
    if tty {
        eprintln!();
    }
    if ending == Ending::Interrupted {
        eprintln!(
            "cnitrace: interrupted; reporting the {:.1} s measured",
            breakdown.window.duration_s
        );
    }
    output(&args, &breakdown, report)
}

/// Prints the window as asked and writes the flame graph; a window without stacks (tracing
/// backend) is still printed as a table or JSON, then reported as the error it is.
fn output(args: &WindowArgs, breakdown: &Breakdown, report: Report) -> anyhow::Result<()> {
    if let Some(path) = &args.flamegraph {
        let svg = flame::flamegraph_svg(breakdown);
        match svg {
            Ok(svg) => std::fs::write(path, svg)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?,
            Err(e) => eprintln!("cnitrace: no flame graph written: {e}"),
        }
    }
    match args.format {
        ProfileFormat::Folded => print!("{}", flame::folded(breakdown)?),
        ProfileFormat::Pprof => std::io::stdout().write_all(&flame::pprof_gz(breakdown)?)?,
        ProfileFormat::Json if !args.stacks => {
            let mut without = breakdown.clone();
            without.stacks = None;
            super::print(Format::Json, &without, |_| String::new())?;
        }
        ProfileFormat::Json => super::print(Format::Json, breakdown, |_| String::new())?,
        ProfileFormat::Table => print!(
            "{}",
            match report {
                Report::Breakdown if args.by == Some(Split::Context) =>
                    render::table(breakdown) + &render::context_table(breakdown),
                Report::Breakdown => render::table(breakdown),
                Report::Netfilter => render::netfilter_report(breakdown),
            }
        ),
    }
    Ok(())
}

/// `cnitrace profile`.
pub async fn run_profile(args: ProfileArgs) -> anyhow::Result<()> {
    let rulesets = Rulesets {
        read: !args.no_ruleset,
        count_hook_entries: args.count_hook_entries,
    };
    run(args.window, rulesets, Report::Breakdown).await
}

/// `cnitrace netfilter`: the profile with the rulesets always read, reported per hook and chain.
pub async fn run_netfilter(args: NetfilterArgs) -> anyhow::Result<()> {
    let rulesets = Rulesets {
        read: true,
        count_hook_entries: args.count_hook_entries,
    };
    run(args.window, rulesets, Report::Netfilter).await
}
