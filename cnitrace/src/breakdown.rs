//! Pure math from a measurement window to a Breakdown: attribution of samples to components,
//! cycles per packet (busy cycles over packets), shares, and the JSON types of the public contract.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use cnitrace_common::{IfaceCounters, SoftirqStats};
use serde::{Deserialize, Serialize};

use crate::{
    attribution::{self, ExecContext, Rule},
    components::{self, COMPONENTS, OTHER, OTHER_USER, SELF_COST},
    contract::{
        BpfProgramCost, Breakdown, Clock, ClockSource, ComponentCost, ContextCycles, CpuSplit,
        CycleUnit, FunctionCost, HookCost, MIN_SAMPLES, NetfilterSection, PacketUnit, Packets,
        Quality, Skid, SoftirqCost, TOP_FUNCTIONS, Total, TracedComponent, TracedFunction,
        TracingQuality, Unavailable, View, Window,
    },
    netfilter::hooks::{self, HookSite},
};

const NETFILTER: &str = "netfilter";
const NETFILTER_RULES: &str = "netfilter.rules";

/// One aggregated sample stack of a window.
#[derive(Debug, Clone, Default)]
pub struct StackSample {
    /// Kernel function names, innermost first. Empty when the stack was lost or user mode.
    pub frames: Vec<String>,
    /// `SAMPLE_FLAG_*`.
    pub flags: u32,
    /// The kernel could not record this stack (counted as lost; its time stays in the total).
    pub stack_lost: bool,
    pub count: u64,
    /// Sum of sample periods (ns for cpu-clock, cycles for a PMU).
    pub period: u64,
}

/// Kernel-side fault counters over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Faults {
    pub samples_seen: u64,
    pub stack_lost: u64,
    pub sample_map_full: u64,
    pub iface_map_full: u64,
    pub field_read: u64,
    pub trace_overflow: u64,
    pub trace_resync: u64,
    pub trace_unmatched_exit: u64,
    pub trace_unknown_function: u64,
    /// Samples a window may lack because the agent's memory budget dropped the retired
    /// epoch that held them (an upper bound: the whole epoch's samples).
    pub samples_dropped: u64,
}

/// Aggregate CPU time of all CPUs from /proc/stat, in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTicks {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

impl CpuTicks {
    #[must_use]
    pub fn since(&self, earlier: &Self) -> Self {
        Self {
            user: self.user.saturating_sub(earlier.user),
            nice: self.nice.saturating_sub(earlier.nice),
            system: self.system.saturating_sub(earlier.system),
            idle: self.idle.saturating_sub(earlier.idle),
            iowait: self.iowait.saturating_sub(earlier.iowait),
            irq: self.irq.saturating_sub(earlier.irq),
            softirq: self.softirq.saturating_sub(earlier.softirq),
            steal: self.steal.saturating_sub(earlier.steal),
        }
    }

    fn total(&self) -> u64 {
        self.user
            + self.nice
            + self.system
            + self.idle
            + self.iowait
            + self.irq
            + self.softirq
            + self.steal
    }
}

/// Softirq vector names, indexed by vector number (include/linux/interrupt.h).
pub const SOFTIRQ_NAMES: [&str; 10] = [
    "HI", "TIMER", "NET_TX", "NET_RX", "BLOCK", "IRQ_POLL", "TASKLET", "SCHED", "HRTIMER", "RCU",
];

/// One BPF program's run statistics over a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BpfProgramRun {
    pub id: u32,
    pub name: String,
    pub program_type: u32,
    pub run_count: u64,
    pub run_time_ns: u64,
    pub attach: String,
}

impl BpfProgramRun {
    fn is_own(&self) -> bool {
        self.name.starts_with(cnitrace_common::program::PREFIX)
    }
}

/// Everything measured in one window, symbolized, before any interpretation.
#[derive(Debug, Clone)]
pub struct RawWindow {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub duration_s: f64,
    pub clock: Clock,
    /// The sampler's mean rate over the window (it may change while a window is open).
    pub frequency_hz: f64,
    pub cpus: u32,
    pub samples: Vec<StackSample>,
    /// Per-device transmit counters of the window.
    pub ifaces: Vec<IfaceCounters>,
    /// Per softirq vector (index = vector number).
    pub softirq: Vec<SoftirqStats>,
    /// Whether `softirq` carries handler times (exact probes); otherwise only run counts, and
    /// times come from the sampled stacks.
    pub softirq_timed: bool,
    /// What counted `ifaces` (`packets.source` names it).
    pub packet_counter: String,
    /// CPU time by state over the window, all CPUs.
    pub cpu: CpuTicks,
    /// BPF programs that ran in the window.
    pub bpf_programs: Vec<BpfProgramRun>,
    /// How run-time statistics were enabled, or `None` if they were not (then run times are 0
    /// and the `bpf` component stays the sampled estimate).
    pub bpf_stats: Option<String>,
    pub faults: Faults,
    /// The tracing backend's measurements (`None`: sampling).
    pub trace: Option<TraceWindow>,
}

/// What the tracer measured in a window.
#[derive(Debug, Clone, Default)]
pub struct TraceWindow {
    /// Per component (taxonomy name): calls, exclusive and inclusive ns, all CPUs.
    pub costs: Vec<(String, cnitrace_common::TraceCost)>,
    pub functions: Vec<TracedFunction>,
    /// The costliest calibrated probe pair in use.
    pub probe_pair_ns: Option<f64>,
    /// Per component, the calibrated cost of the pairs on its functions.
    pub pair_ns: Vec<(String, f64)>,
    pub calibration: String,
}

#[derive(Debug, Clone, Default)]
pub struct PacketSelection {
    /// Interfaces whose transmitted packets are summed; empty means the busiest one.
    pub ifaces: Vec<String>,
    /// Network namespaces (inode numbers) the named interfaces may be in; empty means any.
    pub netns_inodes: Vec<u32>,
    pub unit: PacketUnit,
    /// The attribution rule the figures are computed with (not a packet choice, but chosen
    /// with them for every window).
    pub view: View,
}

/// Facts about the node and the run that the math does not derive.
#[derive(Debug, Clone)]
pub struct Context {
    pub node: String,
    pub kernel: String,
    pub backend: String,
    /// Components whose code is absent on this node, with the reason.
    pub unavailable: Vec<Unavailable>,
}

/// Program types that run per packet on the network datapath (the `bpf` component).
pub fn is_datapath_type(program_type: u32) -> bool {
    // SCHED_CLS 3, SCHED_ACT 4, XDP 6, CGROUP_SKB 8, LWT_IN/OUT/XMIT 10-12, SK_SKB 14,
    // SK_MSG 16, LWT_SEG6LOCAL 19, FLOW_DISSECTOR 22, NETFILTER 32.
    matches!(
        program_type,
        3 | 4 | 6 | 8 | 10 | 11 | 12 | 14 | 16 | 19 | 22 | 32
    )
}

/// The dotted class of one sample under the default rule (`layer`, skid to the caller), or
/// `None` if the CPU was idle.
pub fn attribute(sample: &StackSample) -> Option<&'static str> {
    let rule = Rule {
        view: View::Layer,
        skid: true,
    };
    attribution::attribute(sample, rule).map(|charge| charge.classes[0])
}
/// Splits `total` into integer parts proportional to `weights` that add up exactly to `total`
/// (largest remainder method).
pub fn apportion(total: u64, weights: &[u64]) -> Vec<u64> {
    let sum: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    if sum == 0 {
        return vec![0; weights.len()];
    }
    let mut parts: Vec<u64> = Vec::with_capacity(weights.len());
    let mut remainders: Vec<(u128, usize)> = Vec::with_capacity(weights.len());
    for (index, &weight) in weights.iter().enumerate() {
        let scaled = u128::from(total) * u128::from(weight);
        parts.push((scaled / sum) as u64);
        remainders.push((scaled % sum, index));
    }
    let assigned: u64 = parts.iter().sum();
    remainders.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, index) in remainders.iter().take((total - assigned) as usize) {
        parts[index] += 1;
    }
    parts
}

fn per_packet(cycles: u64, packets: u64) -> Option<f64> {
    (packets > 0).then(|| cycles as f64 / packets as f64)
}

fn share(cycles: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        cycles as f64 / total as f64
    }
}

fn device_name(c: &IfaceCounters) -> String {
    String::from_utf8_lossy(c.name_bytes()).into_owned()
}

/// Selects the denominator. Without `--iface`, the busiest device by transmitted segments:
/// every hop of a benchmark flow transmits the same data packets, so the busiest device carries
/// the benchmark without double counting across hops. With `--iface`, the named devices in the
/// allowed namespaces, summed.
pub fn select_packets(
    devices: &[IfaceCounters],
    selection: &PacketSelection,
    counter: &str,
) -> Packets {
    let chosen: Vec<&IfaceCounters> = if selection.ifaces.is_empty() {
        devices
            .iter()
            .filter(|c| c.name_bytes() != b"lo")
            .max_by_key(|c| (c.tx_segments, c.tx_skbs))
            .filter(|c| c.tx_skbs > 0)
            .into_iter()
            .collect()
    } else {
        devices
            .iter()
            .filter(|c| {
                selection
                    .ifaces
                    .iter()
                    .any(|name| name.as_bytes() == c.name_bytes())
                    && (selection.netns_inodes.is_empty()
                        || selection.netns_inodes.contains(&c.netns_inode))
            })
            .collect()
    };
    let skbs = chosen.iter().map(|c| c.tx_skbs).sum();
    let segments = chosen.iter().map(|c| c.tx_segments).sum();
    let bytes = chosen.iter().map(|c| c.tx_bytes).sum();
    let names: Vec<String> = chosen.iter().map(|c| device_name(c)).collect();
    let located: Vec<String> = chosen
        .iter()
        .map(|c| {
            format!(
                "{} (ifindex {}, netns inode {})",
                device_name(c),
                c.ifindex,
                c.netns_inode
            )
        })
        .collect();
    let source = match (selection.ifaces.is_empty(), located.is_empty()) {
        (true, false) => format!(
            "{counter} on {} (the busiest device in the window; choose with --iface)",
            located.join(", ")
        ),
        (true, true) => format!("{counter}: no device transmitted in the window"),
        (false, false) => format!("{counter} summed over {}", located.join(", ")),
        (false, true) => format!(
            "{counter}: {} transmitted nothing in the window",
            selection.ifaces.join(", ")
        ),
    };
    let count = match selection.unit {
        PacketUnit::Skb => skbs,
        PacketUnit::Segment => segments,
    };
    Packets {
        count,
        unit: selection.unit,
        source,
        skbs,
        segments,
        bytes,
        interfaces: names,
    }
}

/// How a window's samples are read under `view`: they skid only where a cpu-clock sampler
/// took them (the tracer takes none).
pub fn rule_for(raw: &RawWindow, view: View) -> Rule {
    Rule {
        view,
        skid: raw.clock.source == ClockSource::CpuClock && raw.trace.is_none(),
    }
}

/// Samples and summed sample periods of one class.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    samples: u64,
    period: u64,
}

impl Tally {
    fn add(&mut self, sample: &StackSample) {
        self.samples += sample.count;
        self.period += sample.period;
    }
}

/// A window's samples, counted by class under one rule.
#[derive(Default)]
struct Tallies<'a> {
    /// Per dotted class.
    by_class: HashMap<&'static str, Tally>,
    /// Per top-level component, each sample once (under `children` a sample may count for
    /// several components, never twice for one).
    by_component: HashMap<&'a str, Tally>,
    /// Per (innermost function, class it was charged to): summed period.
    by_function: HashMap<(&'a str, &'static str), u64>,
    netfilter_sites: HashMap<HookSite, SitePeriods>,
    /// Per (component, context): summed period.
    by_context: HashMap<(&'a str, ExecContext), u64>,
    /// Per (caller <- enable point, class): samples that skidded.
    skid: HashMap<(String, &'static str), Tally>,
    samples: u64,
    busy_samples: u64,
    idle_samples: u64,
    busy_period: u64,
    truncated: u64,
}

fn tally(raw: &RawWindow, rule: Rule) -> Tallies<'_> {
    let mut t = Tallies::default();
    for sample in &raw.samples {
        t.samples += sample.count;
        let Some(charge) = attribution::attribute(sample, rule) else {
            t.idle_samples += sample.count;
            continue;
        };
        t.busy_samples += sample.count;
        t.busy_period += sample.period;
        if attribution::is_truncated(sample) {
            t.truncated += sample.count;
        }
        let mut tops: Vec<&str> = Vec::with_capacity(charge.classes.len());
        let context = attribution::context_of(sample);
        for &class in &charge.classes {
            t.by_class.entry(class).or_default().add(sample);
            let top = components::top_level(class);
            if !tops.contains(&top) {
                tops.push(top);
                t.by_component.entry(top).or_default().add(sample);
                *t.by_context.entry((top, context)).or_default() += sample.period;
            }
        }
        let function = sample
            .frames
            .first()
            .map_or("[user or unknown]", String::as_str);
        *t.by_function
            .entry((function, charge.classes[0]))
            .or_default() += sample.period;
        if tops.contains(&NETFILTER) {
            let site = hooks::site_of(&sample.frames).unwrap_or(HookSite::UNKNOWN);
            let periods = t.netfilter_sites.entry(site).or_default();
            periods.total += sample.period;
            if charge.classes.contains(&NETFILTER_RULES) {
                periods.rules += sample.period;
            }
        }
        if let Some(caller) = charge.skid_caller {
            t.skid
                .entry((caller, charge.classes[0]))
                .or_default()
                .add(sample);
        }
    }
    t
}

/// What every figure of a window is divided by and scaled with.
#[derive(Debug, Clone, Copy)]
struct Scale {
    packets: u64,
    total_cycles: u64,
    cycles_per_unit: f64,
    /// Busy cycles per busy sample: what one more sample would have weighed.
    cycles_per_sample: f64,
}

impl Scale {
    fn cycles(&self, period: u64) -> u64 {
        (period as f64 * self.cycles_per_unit).round() as u64
    }

    /// A sampled figure: its samples and their Poisson interval.
    fn sampled(&self, name: &str, cycles: u64, samples: u64, available: bool) -> ComponentCost {
        let per_sample = if samples > 0 {
            cycles as f64 / samples as f64
        } else {
            self.cycles_per_sample
        };
        let (low, high) = attribution::poisson_ci95(samples);
        ComponentCost {
            name: name.to_owned(),
            cycles,
            cpp: per_packet(cycles, self.packets),
            share: share(cycles, self.total_cycles),
            available,
            samples,
            cpp_ci95: (self.packets > 0).then(|| {
                let p = self.packets as f64;
                [low * per_sample / p, high * per_sample / p]
            }),
            few_samples: samples < MIN_SAMPLES,
        }
    }

    fn function(&self, function: &str, class: &str, period: u64) -> FunctionCost {
        let cycles = self.cycles(period);
        FunctionCost {
            function: function.to_owned(),
            component: class.to_owned(),
            cycles,
            share: share(cycles, self.total_cycles),
        }
    }

    /// A figure measured exactly (BPF statistics): its interval is the point.
    fn exact(&self, name: &str, cycles: u64, samples: u64) -> ComponentCost {
        let cpp = per_packet(cycles, self.packets);
        ComponentCost {
            name: name.to_owned(),
            cycles,
            cpp,
            share: share(cycles, self.total_cycles),
            available: true,
            samples,
            cpp_ci95: cpp.map(|v| [v, v]),
            few_samples: false,
        }
    }
}

/// Turns a window into a Breakdown. Under `layer` and `self`, component cycles add up exactly
/// to `total.cycles`; under `children` each counts every sample whose stack holds it.
pub fn compute(raw: &RawWindow, context: &Context, selection: &PacketSelection) -> Breakdown {
    let rule = rule_for(raw, selection.view);
    let t = tally(raw, rule);
    let mut total_cycles =
        (t.busy_period as f64 * raw.clock.cycles_per_period_unit()).round() as u64;
    let packets = select_packets(&raw.ifaces, selection, &raw.packet_counter);
    let traced = raw
        .trace
        .as_ref()
        .map(|trace| traced_cycles(trace, raw, &mut total_cycles));
    let scale = Scale {
        packets: packets.count,
        total_cycles,
        cycles_per_unit: raw.clock.cycles_per_period_unit(),
        cycles_per_sample: if t.busy_samples > 0 {
            total_cycles as f64 / t.busy_samples as f64
        } else {
            0.0
        },
    };
    let top_cycles = top_level_cycles(&t, traced.as_ref(), rule.view, &scale);
    let (mut components_out, bpf_sampled_cycles, bpf_exact_cycles) = component_costs(
        raw,
        context,
        &t,
        top_cycles,
        traced.as_ref(),
        rule.view,
        &scale,
    );
    let subcomponents_out = subcomponent_costs(&t, &components_out, rule.view, &scale);
    let cycles_of = |class: &str| -> u64 {
        subcomponents_out
            .iter()
            .find(|c| c.name == class)
            .map_or(0, |c| c.cycles)
    };
    let netfilter_cycles = components_out
        .iter()
        .find(|c| c.name == NETFILTER)
        .map_or(0, |c| c.cycles);
    let netfilter = NetfilterSection {
        hooks: hook_costs(
            &t.netfilter_sites,
            netfilter_cycles,
            cycles_of(NETFILTER_RULES),
            packets.count,
        ),
        ..NetfilterSection::default()
    };
    let tracing = raw.trace.as_ref().map(|trace| {
        tracing_quality(
            trace,
            raw,
            traced.as_ref().expect("traced"),
            &mut components_out,
            packets.count,
        )
    });
    let (probe_runs, probe_ns) = raw
        .bpf_programs
        .iter()
        .filter(|p| p.is_own())
        .fold((0u64, 0u64), |(runs, ns), p| {
            (runs + p.run_count, ns + p.run_time_ns)
        });
    Breakdown {
        node: context.node.clone(),
        kernel: context.kernel.clone(),
        window: Window {
            start: raw.start,
            end: raw.end,
            duration_s: raw.duration_s,
        },
        backend: context.backend.clone(),
        clock: raw.clock.clone(),
        cycle_unit: CycleUnit::of(raw.clock.source),
        view: rule.view,
        total: Total {
            cycles: total_cycles,
            cpp: per_packet(total_cycles, packets.count),
        },
        components: components_out,
        unavailable: context.unavailable.clone(),
        softirq: softirq_costs(raw, packets.count),
        cpu: cpu_split(raw, packets.bytes),
        bpf_programs: bpf_program_costs(raw, packets.count),
        top_functions: top_functions(&t, &scale),
        netfilter,
        by_context: context_cycles(&t, &scale),
        quality: Quality {
            samples: t.samples,
            busy_samples: t.busy_samples,
            idle_samples: t.idle_samples,
            lost: raw.faults.stack_lost + raw.faults.sample_map_full,
            truncated_stacks: t.truncated,
            samples_dropped: raw.faults.samples_dropped,
            stack_lost: raw.faults.stack_lost,
            sample_map_full: raw.faults.sample_map_full,
            packet_map_full: raw.faults.iface_map_full,
            field_read_errors: raw.faults.field_read,
            frequency_hz: raw.frequency_hz.round() as u64,
            expected_samples: (raw.frequency_hz * raw.duration_s * f64::from(raw.cpus)).round()
                as u64,
            self_cycles: cycles_of(SELF_COST),
            user_cycles: cycles_of(OTHER_USER),
            bpf_stats: raw.bpf_stats.clone(),
            bpf_sampled_cycles,
            bpf_exact_cycles,
            probe_runs,
            probe_cost_ns: (raw.bpf_stats.is_some() && probe_runs > 0)
                .then(|| probe_ns as f64 / probe_runs as f64),
            tracing,
            skid: rule.skid.then(|| skid_quality(&t, &scale)),
            agent_cost: None,
        },
        packets,
        subcomponents: subcomponents_out,
        stacks: None,
    }
}

/// Each top-level component's cycles, in taxonomy order.
fn top_level_cycles(
    t: &Tallies,
    traced: Option<&TracedCycles>,
    view: View,
    scale: &Scale,
) -> Vec<u64> {
    if let Some(traced) = traced {
        return traced.net.clone();
    }
    let periods: Vec<u64> = COMPONENTS
        .iter()
        .map(|c| t.by_component.get(c.name).map_or(0, |tally| tally.period))
        .collect();
    match view {
        // A sample counts once per component it holds: no closure to keep.
        View::Children => periods.iter().map(|&p| scale.cycles(p)).collect(),
        View::Layer | View::Leaf => apportion(scale.total_cycles, &periods),
    }
}

/// The top-level components, with the exact `bpf` figure (when statistics were on) in place
/// of the sampled one. Returns them with the sampled and exact `bpf` cycles.
fn component_costs(
    raw: &RawWindow,
    context: &Context,
    t: &Tallies,
    mut top_cycles: Vec<u64>,
    traced: Option<&TracedCycles>,
    view: View,
    scale: &Scale,
) -> (Vec<ComponentCost>, u64, Option<u64>) {
    let index_of = |name: &str| {
        COMPONENTS
            .iter()
            .position(|c| c.name == name)
            .expect("contract component")
    };
    let (bpf_index, other_index) = (index_of("bpf"), index_of(OTHER));
    let bpf_sampled_cycles = top_cycles[bpf_index];
    let bpf_exact_cycles = raw.bpf_stats.as_ref().map(|_| {
        let ns: u64 = raw
            .bpf_programs
            .iter()
            .filter(|p| !p.is_own() && is_datapath_type(p.program_type))
            .map(|p| p.run_time_ns)
            .sum();
        (ns as f64 * raw.clock.cycles_per_ns).round() as u64
    });
    if let Some(exact) = bpf_exact_cycles {
        if view == View::Children {
            // No closure to keep: components overlap.
            top_cycles[bpf_index] = exact;
        } else {
            // The exact figure replaces the estimate; `other` absorbs the difference so the
            // components still add up to the busy total (bounded by what other holds).
            let pool = top_cycles[bpf_index] + top_cycles[other_index];
            top_cycles[bpf_index] = exact.min(pool);
            top_cycles[other_index] = pool - top_cycles[bpf_index];
        }
    }
    let costs = COMPONENTS
        .iter()
        .zip(&top_cycles)
        .map(|(component, &cycles)| {
            let samples = match traced {
                Some(traced) => traced.hits(component.name),
                None => t.by_component.get(component.name).map_or(0, |s| s.samples),
            };
            let available = !context.unavailable.iter().any(|u| u.name == component.name);
            if component.name == "bpf" && bpf_exact_cycles.is_some() {
                scale.exact(component.name, cycles, samples)
            } else {
                scale.sampled(component.name, cycles, samples, available)
            }
        })
        .collect();
    (costs, bpf_sampled_cycles, bpf_exact_cycles)
}

/// The dotted parts of each component. Under `layer` and `self` a component's cycles are
/// apportioned over its parts (its undotted samples keep the rest); under `children` each
/// part counts its own samples.
fn subcomponent_costs(
    t: &Tallies,
    components: &[ComponentCost],
    view: View,
    scale: &Scale,
) -> Vec<ComponentCost> {
    let mut out = Vec::new();
    for component in components {
        let mut parts: Vec<(&str, Tally)> = t
            .by_class
            .iter()
            .filter(|(class, _)| {
                class.contains('.') && components::top_level(class) == component.name
            })
            .map(|(&class, &tally)| (class, tally))
            .collect();
        if parts.is_empty() {
            continue;
        }
        parts.sort_unstable_by_key(|&(name, _)| name);
        let split: Vec<u64> = if view == View::Children {
            parts
                .iter()
                .map(|(_, tally)| scale.cycles(tally.period))
                .collect()
        } else {
            let plain = t
                .by_class
                .get(component.name.as_str())
                .map_or(0, |tally| tally.period);
            let mut weights: Vec<u64> = parts.iter().map(|(_, tally)| tally.period).collect();
            weights.push(plain);
            apportion(component.cycles, &weights)
        };
        for (&(name, tally), &cycles) in parts.iter().zip(&split) {
            out.push(scale.sampled(name, cycles, tally.samples, true));
        }
    }
    out
}

fn top_functions(t: &Tallies, scale: &Scale) -> Vec<FunctionCost> {
    let mut functions: Vec<FunctionCost> = t
        .by_function
        .iter()
        .map(|(&(function, class), &period)| scale.function(function, class, period))
        .collect();
    costliest(&mut functions, TOP_FUNCTIONS);
    functions
}

/// Keeps the `n` costliest, costliest first (ties by name, so output is stable).
fn costliest(functions: &mut Vec<FunctionCost>, n: usize) {
    functions.sort_unstable_by(|a, b| {
        b.cycles
            .cmp(&a.cycles)
            .then_with(|| a.function.cmp(&b.function))
    });
    functions.truncate(n);
}

/// Each sampled component's cycles by context, in taxonomy order.
fn context_cycles(t: &Tallies, scale: &Scale) -> Vec<ContextCycles> {
    COMPONENTS
        .iter()
        .filter(|c| t.by_component.contains_key(c.name))
        .map(|c| {
            let cycles =
                |context| scale.cycles(t.by_context.get(&(c.name, context)).copied().unwrap_or(0));
            ContextCycles {
                name: c.name.to_owned(),
                hardirq: cycles(ExecContext::HardIrq),
                softirq: cycles(ExecContext::SoftIrq),
                ksoftirqd: cycles(ExecContext::Ksoftirqd),
                process: cycles(ExecContext::Process),
                unknown: cycles(ExecContext::Unknown),
            }
        })
        .collect()
}

/// How many callers the skid section lists.
const SKID_CALLERS: usize = 10;

fn skid_quality(t: &Tallies, scale: &Scale) -> Skid {
    let (mut samples, mut period) = (0, 0);
    let mut callers: Vec<FunctionCost> = t
        .skid
        .iter()
        .map(|((caller, class), tally)| {
            samples += tally.samples;
            period += tally.period;
            scale.function(caller, class, tally.period)
        })
        .collect();
    costliest(&mut callers, SKID_CALLERS);
    let cycles = scale.cycles(period);
    Skid {
        samples,
        cycles,
        share: share(cycles, scale.total_cycles),
        callers,
    }
}

fn bpf_program_costs(raw: &RawWindow, packets: u64) -> Vec<BpfProgramCost> {
    let mut programs: Vec<BpfProgramCost> = raw
        .bpf_programs
        .iter()
        .filter(|p| !p.is_own())
        .map(|p| {
            let cycles = (p.run_time_ns as f64 * raw.clock.cycles_per_ns).round() as u64;
            BpfProgramCost {
                id: p.id,
                name: p.name.clone(),
                attach: p.attach.clone(),
                run_cnt: p.run_count,
                run_time_ns: p.run_time_ns,
                cycles,
                cpp: per_packet(cycles, packets),
                datapath: is_datapath_type(p.program_type),
            }
        })
        .collect();
    programs.sort_unstable_by(|a, b| b.run_time_ns.cmp(&a.run_time_ns).then(a.id.cmp(&b.id)));
    programs
}

/// Busy ns of all CPUs over the window from /proc/stat (user, system, irq, softirq).
fn busy_ns(cpu: &CpuTicks) -> f64 {
    let ticks = cpu.user + cpu.nice + cpu.system + cpu.irq + cpu.softirq;
    ticks as f64 * 1e9 / procfs::ticks_per_second() as f64
}

/// What the tracer's times make of each top-level component, in taxonomy order.
#[derive(Debug, Clone)]
struct TracedCycles {
    /// Exclusive time of the component's traced functions.
    gross: Vec<u64>,
    /// `gross` less the calibrated cost of the probes on them: the headline figures. The
    /// probes' cost goes to `other` (cnitrace's own cost), so the closure holds.
    net: Vec<u64>,
    hits: Vec<u64>,
}

impl TracedCycles {
    fn hits(&self, component: &str) -> u64 {
        COMPONENTS
            .iter()
            .position(|c| c.name == component)
            .map_or(0, |i| self.hits[i])
    }
}

/// The calibrated cost of the probes inside one component's exclusive time. A probe pair's
/// cost splits at its clock reads: about half lands in the traced function, half in the
/// function that called it. So a component carries half a pair per own call and half a pair
/// per traced call it makes (at the costliest pair in use, as the callee's mode is not
/// recorded).
fn probe_cycles(
    trace: &TraceWindow,
    name: &str,
    cost: &cnitrace_common::TraceCost,
    cycles_per_ns: f64,
) -> f64 {
    let pair_ns = trace
        .pair_ns
        .iter()
        .find(|(component, _)| component == name)
        .map(|(_, ns)| *ns);
    pair_ns.map_or(0.0, |ns| ns * cost.hits as f64 * cycles_per_ns / 2.0)
        + trace.probe_pair_ns.map_or(0.0, |ns| {
            ns * cost.nested_calls as f64 * cycles_per_ns / 2.0
        })
}

/// Tracing: each component's exclusive time, net of its probes; `other` is the rest of the
/// busy time. When the traced time exceeds /proc/stat's (tick granularity), the total is
/// raised to keep closure.
fn traced_cycles(trace: &TraceWindow, raw: &RawWindow, total: &mut u64) -> TracedCycles {
    let cycles_per_ns = raw.clock.cycles_per_ns;
    let mut traced = TracedCycles {
        gross: vec![0; COMPONENTS.len()],
        net: vec![0; COMPONENTS.len()],
        hits: vec![0; COMPONENTS.len()],
    };
    for (i, component) in COMPONENTS.iter().enumerate() {
        if component.name == OTHER {
            continue;
        }
        if let Some((_, cost)) = trace.costs.iter().find(|(name, _)| name == component.name) {
            let gross = (cost.exclusive_ns as f64 * cycles_per_ns).round() as u64;
            let probes = probe_cycles(trace, component.name, cost, cycles_per_ns);
            traced.gross[i] = gross;
            traced.net[i] = (gross as f64 - probes).max(0.0).round() as u64;
            traced.hits[i] = cost.hits;
        }
    }
    let gross: u64 = traced.gross.iter().sum();
    *total = ((busy_ns(&raw.cpu) * cycles_per_ns).round() as u64).max(gross);
    let other = COMPONENTS
        .iter()
        .position(|c| c.name == OTHER)
        .expect("other");
    traced.net[other] = *total - traced.net.iter().sum::<u64>();
    traced
}

/// The tracing section, and each traced component's interval: from net of its probes (the
/// headline) to gross.
fn tracing_quality(
    trace: &TraceWindow,
    raw: &RawWindow,
    traced: &TracedCycles,
    components: &mut [ComponentCost],
    packets: u64,
) -> TracingQuality {
    let cycles_per_ns = raw.clock.cycles_per_ns;
    // The probes' cost the traced components were cleared of is in `other`'s remainder.
    let probes: u64 = traced
        .gross
        .iter()
        .zip(&traced.net)
        .map(|(gross, net)| gross.saturating_sub(*net))
        .sum();
    for (component, (&gross, &net)) in components
        .iter_mut()
        .zip(traced.gross.iter().zip(&traced.net))
    {
        // Measured, not sampled: no component lacks samples.
        component.few_samples = false;
        let (low, high) = if component.name == OTHER {
            (component.cycles.saturating_sub(probes), component.cycles)
        } else {
            (net, gross)
        };
        component.cpp_ci95 = per_packet(low, packets)
            .zip(per_packet(high, packets))
            .map(|(low, high)| [low, high]);
    }
    let components_traced: Vec<TracedComponent> = trace
        .costs
        .iter()
        .filter(|(_, cost)| cost.hits > 0)
        .map(|(name, cost)| {
            let net = COMPONENTS
                .iter()
                .position(|c| c.name == name)
                .map_or(0, |i| traced.net[i]);
            TracedComponent {
                name: name.clone(),
                hits: cost.hits,
                hits_per_packet: (packets > 0).then(|| cost.hits as f64 / packets as f64),
                inclusive_cycles: (cost.inclusive_ns as f64 * cycles_per_ns).round() as u64,
                probe_pair_ns: trace
                    .pair_ns
                    .iter()
                    .find(|(component, _)| component == name)
                    .map(|(_, ns)| *ns),
                nested_calls: cost.nested_calls,
                cpp_net_of_probes: per_packet(net, packets),
            }
        })
        .collect();
    TracingQuality {
        functions: trace.functions.clone(),
        probe_pair_ns: trace.probe_pair_ns,
        calibration: trace.calibration.clone(),
        components: components_traced,
        nesting_overflows: raw.faults.trace_overflow,
        nesting_resyncs: raw.faults.trace_resync,
        unmatched_exits: raw.faults.trace_unmatched_exit,
        unknown_functions: raw.faults.trace_unknown_function,
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct SitePeriods {
    total: u64,
    rules: u64,
}

/// Splits the netfilter component (and its rules part) over the hooks the samples were in.
/// Families and hooks are merged across `from_bridge`, which is kept as a part.
fn hook_costs(
    sites: &HashMap<HookSite, SitePeriods>,
    netfilter_cycles: u64,
    rule_cycles: u64,
    packets: u64,
) -> Vec<HookCost> {
    let mut sites: Vec<(&HookSite, &SitePeriods)> = sites.iter().collect();
    sites.sort_unstable_by_key(|(site, _)| **site);
    let totals = apportion(
        netfilter_cycles,
        &sites.iter().map(|(_, p)| p.total).collect::<Vec<_>>(),
    );
    let rules = apportion(
        rule_cycles,
        &sites.iter().map(|(_, p)| p.rules).collect::<Vec<_>>(),
    );
    let mut out: Vec<HookCost> = Vec::new();
    for ((site, _), (cycles, rule_cycles)) in sites.iter().zip(totals.into_iter().zip(rules)) {
        let (family, hook) = (site.family.as_str(), site.hook.as_str());
        let entry = HookCost::entry(&mut out, family, hook);
        entry.cycles += cycles;
        entry.rule_cycles += rule_cycles;
        if site.from_bridge {
            entry.from_bridge_cycles += cycles;
        }
    }
    for entry in &mut out {
        entry.cpp = per_packet(entry.cycles, packets);
        entry.share = share(entry.cycles, netfilter_cycles);
    }
    out.sort_by_key(|h| std::cmp::Reverse(h.cycles));
    out
}

impl HookCost {
    /// The entry of `family` and `hook` in `hooks`, added if missing.
    pub fn entry<'a>(hooks: &'a mut Vec<HookCost>, family: &str, hook: &str) -> &'a mut HookCost {
        let index = hooks
            .iter()
            .position(|h| h.family == family && h.hook == hook)
            .unwrap_or_else(|| {
                hooks.push(HookCost::empty(family, hook));
                hooks.len() - 1
            });
        &mut hooks[index]
    }

    pub fn empty(family: &str, hook: &str) -> Self {
        Self {
            family: family.to_owned(),
            hook: hook.to_owned(),
            cycles: 0,
            cpp: None,
            share: 0.0,
            from_bridge_cycles: 0,
            rule_cycles: 0,
            chains: 0,
            rules: 0,
            packets: None,
            rules_evaluated: None,
            rules_traversed_per_packet: None,
            cycles_per_rule_evaluated: None,
        }
    }
}

/// Ethernet, IPv4 and TCP headers with the timestamp option: the bytes every segment of a TCP
/// stream carries besides its payload.
const SEGMENT_HEADERS: u64 = 14 + 20 + 32;

/// Wire segments of `skbs` transmitted skbs carrying `bytes` on a device of `mtu`: a GSO skb
/// of n full segments is `SEGMENT_HEADERS + n * (mtu - 52)` bytes long, a small skb is one
/// segment. Exact for full-sized TCP segments; a partial last segment counts as its fraction.
pub fn segments(skbs: u64, bytes: u64, mtu: u32) -> u64 {
    let payload_per_segment = u64::from(mtu).saturating_sub(52);
    if payload_per_segment == 0 {
        return skbs;
    }
    let payload = bytes.saturating_sub(skbs * SEGMENT_HEADERS);
    (payload as f64 / payload_per_segment as f64)
        .round()
        .max(skbs as f64) as u64
}

/// Parses /proc/softirqs: per vector (in [`SOFTIRQ_NAMES`] order), runs summed over CPUs.
pub fn parse_proc_softirqs(text: &str) -> Vec<u64> {
    let mut counts = vec![0; SOFTIRQ_NAMES.len()];
    for line in text.lines().skip(1) {
        let Some((name, per_cpu)) = line.split_once(':') else {
            continue;
        };
        if let Some(vector) = SOFTIRQ_NAMES.iter().position(|n| *n == name.trim()) {
            // Saturating: a corrupt or hostile line must not wrap (or panic in a debug build).
            counts[vector] = per_cpu
                .split_whitespace()
                .filter_map(|n| n.parse::<u64>().ok())
                .fold(0u64, u64::saturating_add);
        }
    }
    counts
}

/// Each vector's handler, as it appears on a stack sampled while the handler ran.
const SOFTIRQ_HANDLERS: [&[&str]; 10] = [
    &["tasklet_hi_action"],
    &["run_timer_softirq"],
    &["net_tx_action"],
    &["net_rx_action"],
    &["blk_done_softirq"],
    &["irq_poll_softirq"],
    &["tasklet_action"],
    &["sched_balance_softirq", "run_rebalance_domains"],
    &["hrtimer_run_softirq"],
    &["rcu_core_si"],
];

/// Handler times per vector from the sampled stacks: a sample with a vector's handler on its
/// stack was spent in that handler (in ksoftirqd when `run_ksoftirqd` is below it).
fn sampled_softirq_times(raw: &RawWindow) -> Vec<SoftirqStats> {
    let ns_per_unit = raw.clock.cycles_per_period_unit() / raw.clock.cycles_per_ns;
    let mut stats: Vec<SoftirqStats> = raw
        .softirq
        .iter()
        .map(|s| SoftirqStats {
            count: s.count,
            ..SoftirqStats::default()
        })
        .collect();
    for sample in &raw.samples {
        let Some(vector) = sample.frames.iter().find_map(|frame| {
            let name = components::base_name(frame);
            SOFTIRQ_HANDLERS
                .iter()
                .position(|handlers| handlers.contains(&name))
        }) else {
            continue;
        };
        let ns = (sample.period as f64 * ns_per_unit).round() as u64;
        if let Some(s) = stats.get_mut(vector) {
            s.ns += ns;
            if sample.frames.iter().any(|f| f == "run_ksoftirqd") {
                s.ksoftirqd_ns += ns;
            }
        }
    }
    stats
}

fn softirq_costs(raw: &RawWindow, packets: u64) -> Vec<SoftirqCost> {
    let sampled;
    let stats = if raw.softirq_timed {
        &raw.softirq
    } else {
        sampled = sampled_softirq_times(raw);
        &sampled
    };
    stats
        .iter()
        .zip(SOFTIRQ_NAMES)
        .filter(|(s, _)| s.count > 0)
        .map(|(s, name)| {
            let cycles = (s.ns as f64 * raw.clock.cycles_per_ns).round() as u64;
            SoftirqCost {
                vector: name.to_owned(),
                count: s.count,
                cycles,
                cpp: per_packet(cycles, packets),
                in_ksoftirqd_share: if s.ns == 0 {
                    0.0
                } else {
                    s.ksoftirqd_ns as f64 / s.ns as f64
                },
            }
        })
        .collect()
}

fn cpu_split(raw: &RawWindow, bytes: u64) -> CpuSplit {
    let t = &raw.cpu;
    let total = t.total();
    let fraction = |ticks: u64| {
        if total == 0 {
            0.0
        } else {
            ticks as f64 / total as f64
        }
    };
    let busy = fraction(t.user + t.nice + t.system + t.softirq + t.irq);
    let busy_cpus = busy * f64::from(raw.cpus);
    let throughput_gbps = if raw.duration_s > 0.0 {
        bytes as f64 * 8.0 / raw.duration_s / 1e9
    } else {
        0.0
    };
    CpuSplit {
        user: fraction(t.user + t.nice),
        system: fraction(t.system),
        softirq: fraction(t.softirq),
        irq: fraction(t.irq),
        idle: fraction(t.idle + t.iowait),
        steal: fraction(t.steal),
        busy_cpus,
        throughput_gbps,
        gbps_per_busy_cpu: (busy_cpus > 0.0).then(|| throughput_gbps / busy_cpus),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::components::OTHER_KERNEL;
    use cnitrace_common::{SAMPLE_FLAG_IDLE_TASK, SAMPLE_FLAG_USER};

    fn component<'a>(b: &'a Breakdown, name: &str) -> &'a ComponentCost {
        b.components
            .iter()
            .chain(&b.subcomponents)
            .find(|c| c.name == name)
            .unwrap()
    }

    #[test]
    fn every_figure_carries_its_samples_and_interval() {
        let raw = window(
            vec![
                stack(&["br_forward"], 0, 400, 400_000_000),
                stack(&["ipt_do_table", "nf_hook_slow"], 0, 10, 10_000_000),
                stack(&["tcp_sendmsg"], 0, 590, 590_000_000),
            ],
            &[("veth0", 1000, 1000)],
        );
        let b = compute(&raw, &context(), &PacketSelection::default());
        let bridge = component(&b, "bridge");
        let [low, high] = bridge.cpp_ci95.unwrap();
        let cpp = bridge.cpp.unwrap();
        assert_eq!(bridge.samples, 400);
        assert!(!bridge.few_samples);
        // 400 samples: about +-10% (Poisson), around the figure.
        assert!(low < cpp && cpp < high, "{low} {cpp} {high}");
        assert!((high / cpp - 1.10).abs() < 0.01 && (1.0 - low / cpp - 0.095).abs() < 0.01);
        let netfilter = component(&b, "netfilter");
        assert!(netfilter.few_samples && netfilter.samples == 10);
        assert_eq!(component(&b, "netfilter.rules").samples, 10);
        // No sample is still an upper bound: 3.7 samples' worth.
        let vxlan = component(&b, "vxlan");
        let per_sample = b.total.cycles as f64 / 1000.0 / 1000.0;
        assert_eq!(vxlan.samples, 0);
        assert!(vxlan.cpp_ci95.unwrap()[0].abs() < f64::EPSILON);
        assert!((vxlan.cpp_ci95.unwrap()[1] / per_sample - 3.69).abs() < 0.05);
        assert_eq!((b.view, b.cycle_unit), (View::Layer, CycleUnit::Reference));
    }

    #[test]
    fn views_follow_perf_self_and_children() {
        let raw = window(
            vec![
                stack(
                    &[
                        "memcpy",
                        "skb_copy_bits",
                        "br_nf_pre_routing",
                        "br_handle_frame",
                    ],
                    0,
                    10,
                    10,
                ),
                stack(
                    &[
                        "tcp_v4_rcv",
                        "ip_local_deliver",
                        "ip_rcv",
                        "br_handle_frame_finish",
                    ],
                    0,
                    30,
                    30,
                ),
            ],
            &[("veth0", 10, 10)],
        );
        let view = |view| {
            let selection = PacketSelection {
                view,
                ..PacketSelection::default()
            };
            let b = compute(&raw, &context(), &selection);
            let cycles = |name| component(&b, name).cycles;
            (
                cycles("bridge"),
                cycles("netfilter"),
                cycles("other"),
                b.total.cycles,
            )
        };
        // layer: the host's receive under the bridge is other; the helper is netfilter's.
        assert_eq!(view(View::Layer), (0, 25, 75, 100));
        // self: the innermost function only.
        assert_eq!(view(View::Leaf), (0, 0, 100, 100));
        // children: every component on the stack; no closure.
        assert_eq!(view(View::Children), (100, 25, 0, 100));
    }

    #[test]
    fn datapath_program_types() {
        assert!(is_datapath_type(3) && is_datapath_type(6));
        assert!(!is_datapath_type(7) && !is_datapath_type(17)); // perf_event, raw_tracepoint
    }

    fn stack(frames: &[&str], flags: u32, count: u64, period: u64) -> StackSample {
        StackSample {
            frames: frames.iter().map(|f| (*f).to_owned()).collect(),
            flags,
            stack_lost: false,
            count,
            period,
        }
    }

    /// A window with one busy device and no samples, for other modules' tests.
    pub(crate) fn raw_window() -> RawWindow {
        window(Vec::new(), &[("veth0", 100, 100)])
    }

    fn window(samples: Vec<StackSample>, ifaces: &[(&str, u64, u64)]) -> RawWindow {
        RawWindow {
            start: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            end: DateTime::from_timestamp(1_700_000_010, 0).unwrap(),
            duration_s: 10.0,
            clock: Clock {
                source: ClockSource::CpuClock,
                cycles_per_ns: 2.5,
                calibration: "test".into(),
            },
            frequency_hz: 1000.0,
            cpus: 2,
            samples,
            ifaces: ifaces
                .iter()
                .enumerate()
                .map(|(i, &(name, skbs, segs))| {
                    let mut c = IfaceCounters {
                        ifindex: i as u32 + 1,
                        netns_inode: 4_026_531_840 + i as u32 % 2,
                        tx_skbs: skbs,
                        tx_segments: segs,
                        tx_bytes: segs * 1500,
                        ..Default::default()
                    };
                    c.name[..name.len()].copy_from_slice(name.as_bytes());
                    c
                })
                .collect(),
            softirq: vec![SoftirqStats::default(); 10],
            softirq_timed: true,
            packet_counter: "net_dev_start_xmit".to_owned(),
            cpu: CpuTicks::default(),
            bpf_programs: Vec::new(),
            bpf_stats: None,
            faults: Faults::default(),
            trace: None,
        }
    }

    pub(crate) fn context() -> Context {
        Context {
            node: "n".into(),
            kernel: "k".into(),
            backend: "sampling".into(),
            unavailable: vec![Unavailable {
                name: "ipip".into(),
                reason: "absent".into(),
            }],
        }
    }

    #[test]
    fn softirq_counts_saturate_instead_of_overflowing() {
        // Found by `cargo xtask fuzz` (proc_files): a sum past u64::MAX panicked.
        let text = format!("CPU0 CPU1\n NET_RX: {} {}\n", u64::MAX, u64::MAX);
        assert_eq!(parse_proc_softirqs(&text)[3], u64::MAX);
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// Frames from every component and from outside the taxonomy.
        const FRAMES: &[&str] = &[
            "br_handle_frame",
            "nf_hook_slow",
            "ipt_do_table",
            "ip_forward",
            "fib_table_lookup",
            "vxlan_xmit",
            "ipip_rcv",
            "veth_xmit",
            "skb_segment",
            "memcpy",
            "__netif_receive_skb",
            "net_rx_action",
            "do_syscall_64",
            "bpf_prog_0123456789abcdef_cil_from_container",
        ];

        fn sample() -> impl Strategy<Value = StackSample> {
            (
                prop::collection::vec(prop::sample::select(FRAMES), 0..6),
                prop::sample::select(&[0u32, SAMPLE_FLAG_USER, SAMPLE_FLAG_IDLE_TASK][..]),
                any::<bool>(),
                1u64..1000,
                1u64..10_000_000,
            )
                .prop_map(|(frames, flags, stack_lost, count, period)| StackSample {
                    frames: frames.into_iter().map(str::to_owned).collect(),
                    flags,
                    stack_lost,
                    count,
                    period: period * count,
                })
        }

        proptest! {
            /// Whatever the samples, the components add up to the total, each top-level
            /// component to its sub-components, and shares to one.
            #[test]
            fn components_always_add_up_to_the_total(
                samples in prop::collection::vec(sample(), 0..40),
                segments in 0u64..1_000_000,
            ) {
                let raw = window(samples, &[("eth0", segments / 2 + 1, segments)]);
                let b = compute(&raw, &context(), &PacketSelection::default());
                let sum: u64 = b.components.iter().map(|c| c.cycles).sum();
                prop_assert_eq!(sum, b.total.cycles);
                for c in &b.components {
                    let parts: u64 = b
                        .subcomponents
                        .iter()
                        .filter(|s| components::top_level(&s.name) == c.name)
                        .map(|s| s.cycles)
                        .sum();
                    prop_assert!(parts == c.cycles || parts == 0, "{}: {} vs {}", c.name, parts, c.cycles);
                }
                if b.total.cycles > 0 {
                    let shares: f64 = b.components.iter().map(|c| c.share).sum();
                    prop_assert!((shares - 1.0).abs() < 1e-9, "shares add to {}", shares);
                }
            }

            /// The largest-remainder split always hands out exactly the total.
            #[test]
            fn apportion_is_exact(total in any::<u64>(), weights in prop::collection::vec(any::<u32>(), 0..20)) {
                let weights: Vec<u64> = weights.into_iter().map(u64::from).collect();
                let parts = apportion(total, &weights);
                prop_assert_eq!(parts.len(), weights.len());
                if weights.iter().any(|&w| w > 0) {
                    prop_assert_eq!(parts.iter().map(|&p| u128::from(p)).sum::<u128>(), u128::from(total));
                }
            }
        }
    }

    #[test]
    fn innermost_component_wins() {
        // nf_hook_slow called from the bridge is netfilter, not bridge.
        let s = stack(
            &[
                "memcpy",
                "nf_hook_slow",
                "br_nf_pre_routing",
                "br_handle_frame",
            ],
            0,
            1,
            1,
        );
        assert_eq!(attribute(&s), Some("netfilter.hook"));
        let s = stack(
            &[
                "ipt_do_table",
                "nf_hook_slow",
                "br_nf_forward_ip",
                "__br_forward",
            ],
            0,
            1,
            1,
        );
        assert_eq!(attribute(&s), Some("netfilter.rules"));
        let s = stack(
            &[
                "_raw_spin_lock",
                "veth_xmit",
                "dev_hard_start_xmit",
                "br_forward",
            ],
            0,
            1,
            1,
        );
        assert_eq!(attribute(&s), Some("veth"));
        // No datapath frame: the host's own work, by its innermost named group.
        let s = stack(&["tcp_sendmsg", "sock_sendmsg"], 0, 1, 1);
        assert_eq!(attribute(&s), Some(crate::components::OTHER_TCP));
        let s = stack(&["ext4_da_write_begin", "vfs_write"], 0, 1, 1);
        assert_eq!(attribute(&s), Some(crate::components::OTHER_SYSCALL));
        let s = stack(&["ext4_da_write_begin"], 0, 1, 1);
        assert_eq!(attribute(&s), Some(OTHER_KERNEL));
    }

    #[test]
    fn idle_is_excluded_but_interrupt_work_on_the_idle_task_is_not() {
        let idle = stack(
            &["pv_native_safe_halt", "default_idle", "do_idle"],
            SAMPLE_FLAG_IDLE_TASK,
            1,
            1,
        );
        assert_eq!(attribute(&idle), None);
        let softirq_on_idle = stack(
            &[
                "br_forward",
                "net_rx_action",
                "handle_softirqs",
                "irq_exit_rcu",
                "default_idle",
            ],
            SAMPLE_FLAG_IDLE_TASK,
            1,
            1,
        );
        assert_eq!(attribute(&softirq_on_idle), Some("bridge"));
        let user = stack(&[], SAMPLE_FLAG_USER, 1, 1);
        assert_eq!(attribute(&user), Some(OTHER_USER));
    }

    #[test]
    fn closure_is_exact_and_cpp_follows_eq_1() {
        let raw = window(
            vec![
                stack(&["br_forward"], 0, 30, 30_000_001),
                stack(&["nf_hook_slow", "br_handle_frame"], 0, 20, 20_000_003),
                stack(&["nf_conntrack_in", "nf_hook_slow"], 0, 10, 10_000_007),
                stack(&["veth_xmit"], 0, 7, 7_000_000),
                stack(&["tcp_sendmsg"], 0, 13, 13_000_000),
                stack(&[], SAMPLE_FLAG_USER, 20, 20_000_000),
                stack(&["default_idle"], SAMPLE_FLAG_IDLE_TASK, 100, 100_000_000),
            ],
            &[
                ("veth-a", 100, 1000),
                ("veth-b", 50, 500),
                ("lo", 9999, 9999),
            ],
        );
        let b = compute(&raw, &context(), &PacketSelection::default());
        let busy_ns = 100_000_011f64;
        assert_eq!(b.total.cycles, (busy_ns * 2.5).round() as u64);
        let sum: u64 = b.components.iter().map(|c| c.cycles).sum();
        assert_eq!(sum, b.total.cycles, "closure");
        for parent in ["netfilter", "other"] {
            let parent_cycles = b.component(parent).unwrap().cycles;
            let subs: u64 = b
                .subcomponents
                .iter()
                .filter(|c| components::top_level(&c.name) == parent)
                .map(|c| c.cycles)
                .sum();
            assert_eq!(subs, parent_cycles, "{parent} sub-components add up");
        }
        // Busiest non-loopback interface, in segments.
        assert_eq!(b.packets.count, 1000);
        assert_eq!(b.packets.interfaces, vec!["veth-a".to_owned()]);
        let bridge = b.component("bridge").unwrap();
        let expected_bridge = 30_000_001.0 * 2.5;
        assert!((bridge.cycles as f64 - expected_bridge).abs() <= 1.0);
        // eq. 1: CPP = Cycle_total / N_packet x Cycle_percentage.
        let eq1 = b.total.cycles as f64 / 1000.0 * bridge.share;
        assert!((bridge.cpp.unwrap() - eq1).abs() < 1e-6);
        assert_eq!(b.quality.idle_samples, 100);
        assert_eq!(b.quality.busy_samples, 100);
        assert_eq!(b.quality.expected_samples, 20_000);
        assert!(!b.component("ipip").unwrap().available);
        assert_eq!(b.top_functions[0].function, "br_forward");
        assert_eq!(b.top_functions[0].component, "bridge");
        assert!(
            b.top_functions.iter().all(|f| f.function != "default_idle"),
            "idle is not a hot function"
        );
        assert_eq!(b.component("ipip").unwrap().cycles, 0);
    }

    #[test]
    fn explicit_interfaces_and_units() {
        let raw = window(
            vec![stack(&["br_forward"], 0, 1, 1000)],
            &[("a", 10, 100), ("b", 5, 50)],
        );
        let sel = PacketSelection {
            ifaces: vec!["a".into(), "b".into()],
            netns_inodes: Vec::new(),
            unit: PacketUnit::Skb,
            view: View::Layer,
        };
        let b = compute(&raw, &context(), &sel);
        assert_eq!(
            (b.packets.count, b.packets.segments, b.packets.skbs),
            (15, 150, 15)
        );
        assert_eq!(b.total.cpp, Some(2500.0 / 15.0));
        // Restricted to one namespace, only the device living there counts.
        let sel = PacketSelection {
            netns_inodes: vec![4_026_531_841],
            ..sel
        };
        let b = compute(&raw, &context(), &sel);
        assert_eq!(b.packets.interfaces, vec!["b".to_owned()]);
        assert_eq!(b.packets.count, 5);
    }

    #[test]
    fn no_packets_gives_null_cpp_not_infinity() {
        let raw = window(vec![stack(&["br_forward"], 0, 1, 1000)], &[]);
        let b = compute(&raw, &context(), &PacketSelection::default());
        assert_eq!(b.total.cpp, None);
        assert!(b.packets.source.contains("no device transmitted"));
        let json = serde_json::to_value(&b).unwrap();
        assert!(json["total"]["cpp"].is_null());
    }

    #[test]
    fn json_has_the_contract_keys() {
        let raw = window(vec![stack(&["br_forward"], 0, 1, 1000)], &[("a", 1, 1)]);
        let json =
            serde_json::to_value(compute(&raw, &context(), &PacketSelection::default())).unwrap();
        for key in [
            "node",
            "kernel",
            "window",
            "backend",
            "clock",
            "packets",
            "total",
            "components",
            "unavailable",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
        assert_eq!(json["clock"]["source"], "cpu_clock");
        assert_eq!(json["packets"]["unit"], "segment");
        assert!(
            json["window"]["start"]
                .as_str()
                .unwrap()
                .starts_with("2023-11-14T")
        );
        let c = &json["components"][0];
        for key in ["name", "cycles", "cpp", "share", "available"] {
            assert!(c.get(key).is_some(), "component.{key}");
        }
    }

    #[test]
    fn softirq_and_cpu_split() {
        let mut raw = window(vec![stack(&["br_forward"], 0, 1, 1000)], &[("a", 10, 1000)]);
        raw.softirq[3] = SoftirqStats {
            count: 100,
            ns: 4_000_000,
            ksoftirqd_count: 25,
            ksoftirqd_ns: 1_000_000,
        };
        raw.cpu = CpuTicks {
            user: 100,
            nice: 0,
            system: 300,
            idle: 400,
            iowait: 0,
            irq: 50,
            softirq: 150,
            steal: 0,
        };
        let b = compute(&raw, &context(), &PacketSelection::default());
        assert_eq!(b.softirq.len(), 1);
        let net_rx = &b.softirq[0];
        assert_eq!(net_rx.vector, "NET_RX");
        assert_eq!(net_rx.cycles, 10_000_000);
        assert_eq!(net_rx.cpp, Some(10_000.0));
        assert!((net_rx.in_ksoftirqd_share - 0.25).abs() < 1e-12);
        let c = &b.cpu;
        let sum = c.user + c.system + c.softirq + c.irq + c.idle + c.steal;
        assert!((sum - 1.0).abs() < 1e-12, "split sums to {sum}");
        assert!((c.busy_cpus - 1.2).abs() < 1e-12);
        // 1000 segments x 1500 bytes x 8 bits over 10 s.
        assert!((c.throughput_gbps - 1.2e-3).abs() < 1e-12);
        assert!((c.gbps_per_busy_cpu.unwrap() - 1e-3).abs() < 1e-12);
    }

    #[test]
    fn exact_bpf_replaces_the_estimate_and_keeps_closure() {
        let mut raw = window(
            vec![
                stack(&["bpf_prog_0123456789abcdef_cil_from"], 0, 10, 10_000_000),
                stack(&["tcp_sendmsg"], 0, 90, 90_000_000),
            ],
            &[("a", 10, 1000)],
        );
        let run = |id, name: &str, program_type, ns| BpfProgramRun {
            id,
            name: name.into(),
            program_type,
            run_count: 1000,
            run_time_ns: ns,
            attach: "tcx ingress on ifindex 2 (a)".into(),
        };
        raw.bpf_programs = vec![
            run(7, "cil_from", 3, 16_000_000),
            run(8, "cnitrace_tx", 17, 500_000),
            run(9, "some_tracer", 2, 1_000_000),
        ];
        raw.bpf_stats = Some("BPF_ENABLE_STATS".into());
        let b = compute(&raw, &context(), &PacketSelection::default());
        // Exact: only datapath programs that are not cnitrace's, converted at 2.5 cycles/ns.
        assert_eq!(b.component("bpf").unwrap().cycles, 40_000_000);
        assert_eq!(b.quality.bpf_sampled_cycles, 25_000_000);
        assert_eq!(b.quality.bpf_exact_cycles, Some(40_000_000));
        let sum: u64 = b.components.iter().map(|c| c.cycles).sum();
        assert_eq!(sum, b.total.cycles);
        let names: Vec<&str> = b.bpf_programs.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            vec!["cil_from", "some_tracer"],
            "own programs are not listed"
        );
        assert!(b.bpf_programs[0].datapath && !b.bpf_programs[1].datapath);
        assert_eq!(b.quality.probe_runs, 1000);
        assert_eq!(b.quality.probe_cost_ns, Some(500.0));
    }

    #[test]
    fn netfilter_is_split_by_hook_and_adds_up() {
        let samples = vec![
            // Rules on a bridged frame: IPv4 FORWARD from the bridge.
            stack(
                &[
                    "ipt_do_table",
                    "nf_hook_slow",
                    "br_nf_forward_ip",
                    "nf_hook_slow",
                    "__br_forward",
                ],
                0,
                30,
                30_000,
            ),
            // Rules on a routed packet: IPv4 FORWARD.
            stack(
                &["ipt_do_table", "nf_hook_slow", "ip_forward"],
                0,
                10,
                10_000,
            ),
            // Conntrack in PREROUTING.
            stack(
                &["nf_conntrack_in", "nf_hook_slow", "ip_rcv"],
                0,
                20,
                20_000,
            ),
            // No caller that tells.
            stack(&["nf_ct_get_tuple", "mystery"], 0, 1, 1_001),
            // Not netfilter at all.
            stack(&["br_forward", "br_handle_frame"], 0, 40, 40_000),
        ];
        let b = compute(
            &window(samples, &[("veth0", 100, 100)]),
            &context(),
            &PacketSelection::default(),
        );
        let hooks = &b.netfilter.hooks;
        let netfilter = b.component("netfilter").unwrap().cycles;
        assert_eq!(hooks.iter().map(|h| h.cycles).sum::<u64>(), netfilter);
        let forward = &hooks[0];
        assert_eq!(
            (forward.family.as_str(), forward.hook.as_str()),
            ("ipv4", "FORWARD")
        );
        assert_eq!(forward.cycles, 100_000, "40 000 ns x 2.5 cycles/ns");
        assert_eq!(forward.from_bridge_cycles, 75_000);
        assert_eq!(forward.rule_cycles, 100_000);
        assert_eq!(forward.cpp, Some(1000.0));
        assert_eq!(hooks[1].hook, "PREROUTING");
        assert_eq!(hooks[1].rule_cycles, 0);
        assert_eq!(
            (hooks[2].family.as_str(), hooks[2].hook.as_str()),
            ("unknown", "unknown")
        );
        assert!((hooks.iter().map(|h| h.share).sum::<f64>() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn apportion_is_exact_and_proportional() {
        assert_eq!(apportion(10, &[1, 1, 1]), vec![4, 3, 3]);
        assert_eq!(apportion(0, &[5, 5]), vec![0, 0]);
        assert_eq!(apportion(7, &[0, 0]), vec![0, 0]);
        let parts = apportion(1_000_003, &[333, 333, 334, 0]);
        assert_eq!(parts.iter().sum::<u64>(), 1_000_003);
        assert_eq!(parts[3], 0);
    }
}
