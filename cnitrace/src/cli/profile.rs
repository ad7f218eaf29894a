//! `cnitrace profile` and `cnitrace netfilter`: one window from the command line.

use std::io::IsTerminal as _;

use cnitrace::{
    contract::PacketUnit,
    netfilter,
    probe::{AttachMode, Backend, BackendKind},
    profile::{self, Ending, ProfileOptions},
    render,
    window::WindowSpec,
};

use super::{Format, interrupted};

#[derive(clap::Args)]
pub struct ProfileArgs {
    /// Window length in seconds. Ctrl-C ends the window early and still reports it.
    #[arg(long, default_value_t = 10.0, allow_negative_numbers = true)]
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
    #[arg(long = "iface")]
    pub ifaces: Vec<String>,
    /// Named network namespace(s) (`ip netns`) where --iface names are looked up.
    #[arg(long = "netns")]
    pub netns: Vec<String>,
    /// What a packet is: a wire-size segment (default, as the paper counts) or an skb.
    #[arg(long, value_enum, default_value_t = PacketUnit::Segment)]
    pub packet_unit: PacketUnit,
    /// Count the packets entering each netfilter hook with a temporary nftables table (removed
    /// afterwards), so rules per packet are known for nft-based iptables too.
    #[arg(long)]
    pub count_hook_entries: bool,
    /// Do not read the iptables/nftables rulesets around the window.
    #[arg(long, conflicts_with = "count_hook_entries")]
    pub no_ruleset: bool,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(clap::Args)]
pub struct NetfilterArgs {
    #[command(flatten)]
    pub profile: ProfileArgs,
    /// Do not add the counting table: rules per packet then only for legacy iptables.
    #[arg(long)]
    pub no_count: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Report {
    Breakdown,
    Netfilter,
}

pub async fn run(args: ProfileArgs, report: Report) -> anyhow::Result<()> {
    let options = ProfileOptions {
        duration_s: args.duration,
        backend: Backend::requested(args.backend, args.attach)?,
        sampler: args.probes.config(),
        window: WindowSpec {
            ifaces: args.ifaces,
            unit: args.packet_unit,
            netfilter: netfilter::Options {
                read_rules: !args.no_ruleset,
                count_entries: args.count_hook_entries,
                namespaces: args.netns.clone(),
            },
            netns: args.netns,
            bpf_stats: true,
        },
    };
    let tty = std::io::stderr().is_terminal();
    if !tty {
        eprintln!(
            "cnitrace: profiling for {} s (Ctrl-C ends the window early)",
            options.duration_s
        );
    }
    let progress = |elapsed: f64, total: f64| {
        if tty {
            eprint!(
                "\rcnitrace: profiling {elapsed:>5.0}/{total:.0} s (Ctrl-C ends the window early)"
            );
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
    super::print(args.format, &breakdown, |b| match report {
        Report::Breakdown => render::table(b),
        Report::Netfilter => render::netfilter_report(b),
    })
}

/// `cnitrace netfilter`: the profile with rulesets read and hook entries counted unless
/// `--no-count`.
pub async fn run_netfilter(mut args: NetfilterArgs) -> anyhow::Result<()> {
    args.profile.count_hook_entries = !args.no_count;
    args.profile.no_ruleset = false;
    run(args.profile, Report::Netfilter).await
}
