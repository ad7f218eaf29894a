//! The public contract: the Breakdown and its sections, the agent's session and error bodies.
//!
//! Scripts, dashboards and other agents read these as JSON (CLI `--format json`, REST), so
//! field names are part of the contract. This module depends on nothing else in the crate; the
//! arithmetic that fills it lives in [`crate::breakdown`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Where the cycle figures come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClockSource {
    /// Sample periods are hardware CPU cycles.
    PmuCycles,
    /// Sample periods are nanoseconds of cpu-clock, converted with a calibrated cycles_per_ns.
    CpuClock,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Clock {
    pub source: ClockSource,
    pub cycles_per_ns: f64,
    /// How cycles_per_ns was obtained.
    pub calibration: String,
}

impl Clock {
    /// Cycles represented by one unit of sample period.
    pub fn cycles_per_period_unit(&self) -> f64 {
        match self.source {
            ClockSource::PmuCycles => 1.0,
            ClockSource::CpuClock => self.cycles_per_ns,
        }
    }
}

/// What one cycle of the figures is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CycleUnit {
    /// Reference cycles: nanoseconds times the TSC rate (`clock.cycles_per_ns`), whatever the
    /// core's frequency. Every figure of a cpu-clock window is in this unit: sampled time and
    /// the exact sources (BPF run time, softirq handler time, traced time) alike.
    #[default]
    Reference,
    /// Core cycles, as the PMU counts them: the sampled figures. The exact sources are
    /// nanoseconds converted at the TSC rate, so they equal core cycles only while the core
    /// runs at its nominal frequency.
    Core,
}

impl CycleUnit {
    pub fn of(source: ClockSource) -> Self {
        match source {
            ClockSource::PmuCycles => CycleUnit::Core,
            ClockSource::CpuClock => CycleUnit::Reference,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CycleUnit::Reference => "reference",
            CycleUnit::Core => "core",
        }
    }
}

/// How a sampled stack is charged to components (the attribution rule).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum View {
    /// Walk from the innermost frame outward; the first component frame decides, and a layer
    /// boundary (a hand-off such as `ip_rcv` or `__dev_queue_xmit`, or a softirq, interrupt or
    /// system call entry) stops the walk: what ran beneath it is the host's (`other`).
    #[default]
    Layer,
    /// The innermost function's own component (perf report --no-children).
    #[serde(rename = "self")]
    #[value(name = "self")]
    Leaf,
    /// Every component on the stack (perf report --children): a sample counts for each, so
    /// shares may add up to more than 100%.
    Children,
}

impl View {
    pub fn as_str(self) -> &'static str {
        match self {
            View::Layer => "layer",
            View::Leaf => "self",
            View::Children => "children",
        }
    }
}

/// Which packets are the denominator.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum PacketUnit {
    /// Socket buffers as the stack handles them (a 64 KB GSO skb is one).
    Skb,
    /// Wire-size packets: each skb's `gso_segs`.
    #[default]
    Segment,
}

impl PacketUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            PacketUnit::Skb => "skb",
            PacketUnit::Segment => "segment",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Breakdown {
    pub node: String,
    pub kernel: String,
    pub window: Window,
    pub backend: String,
    pub clock: Clock,
    /// The unit of every `cycles` and `cpp` of this Breakdown.
    #[serde(default)]
    pub cycle_unit: CycleUnit,
    /// The attribution rule the components were computed with. Under `children` a sample
    /// counts for every component on its stack, and components no longer add up to the total.
    #[serde(default)]
    pub view: View,
    pub packets: Packets,
    pub total: Total,
    pub components: Vec<ComponentCost>,
    /// Dotted sub-components (`netfilter.conntrack`, ...); within a component they add up to it.
    pub subcomponents: Vec<ComponentCost>,
    pub unavailable: Vec<Unavailable>,
    /// Softirq handlers that ran in the window, per vector.
    pub softirq: Vec<SoftirqCost>,
    /// How the CPUs spent the window (fractions of all CPUs' time; they add up to 1).
    pub cpu: CpuSplit,
    /// BPF programs (other than cnitrace's) that ran in the window, costliest first.
    pub bpf_programs: Vec<BpfProgramCost>,
    /// The hottest sampled functions (innermost frame), for finding what a component is made of.
    pub top_functions: Vec<FunctionCost>,
    /// Netfilter per hook (from the calling frames) and, where the ruleset was read, the chains
    /// and rules packets walked.
    pub netfilter: NetfilterSection,
    /// Each component's sampled cycles by context (components with samples only; empty with
    /// the tracing backend). They add up to the sampled figure (`bpf`: the sampled estimate).
    #[serde(default)]
    pub by_context: Vec<ContextCycles>,
    pub quality: Quality,
    /// Every distinct sampled stack of the window (idle excluded), costliest first: what
    /// flame graphs and pprof profiles are drawn from. Present only where asked for
    /// (`profile --stacks`, the agent's flame graph endpoints); never with the tracing
    /// backend, which samples no stacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stacks: Option<Vec<StackCost>>,
}

/// One distinct sampled stack and the cycles it stands for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StackCost {
    /// Function names, outermost first. User-mode samples are `[user space]`, samples
    /// whose kernel stack was lost `[stack lost]`.
    pub frames: Vec<String>,
    /// The dotted (sub-)component the stack is attributed to (the layer rule).
    pub component: String,
    pub samples: u64,
    pub cycles: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NetfilterSection {
    /// One entry per family and hook, costliest first; their cycles add up to the `netfilter`
    /// component.
    pub hooks: Vec<HookCost>,
    /// Each base chain walked in the window (one per table, hook and namespace read).
    pub chains: Vec<ChainWalk>,
    /// How the ruleset was read, or why it was not.
    pub ruleset_notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HookCost {
    /// `ipv4`, `ipv6`, `bridge`, `arp`, or `unknown` when no calling frame told.
    pub family: String,
    /// `PREROUTING`, `INPUT`, `FORWARD`, `OUTPUT`, `POSTROUTING` or `unknown`.
    pub hook: String,
    pub cycles: u64,
    pub cpp: Option<f64>,
    /// Fraction of the netfilter component.
    pub share: f64,
    /// Of `cycles`, the part run by bridge-netfilter on bridged frames.
    pub from_bridge_cycles: u64,
    /// Of `cycles`, rule evaluation (`netfilter.rules`).
    pub rule_cycles: u64,
    /// Base chains at this hook plus the user chains they reach, over the namespaces read.
    pub chains: u32,
    pub rules: u32,
    /// Packets that entered the hook (`null`: not known).
    pub packets: Option<u64>,
    pub rules_evaluated: Option<u64>,
    pub rules_traversed_per_packet: Option<f64>,
    /// `rule_cycles / rules_evaluated`: the cost of one rule for one packet.
    pub cycles_per_rule_evaluated: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SoftirqCost {
    pub vector: String,
    /// Handler runs.
    pub count: u64,
    /// Handler time converted with `clock.cycles_per_ns`.
    pub cycles: u64,
    pub cpp: Option<f64>,
    /// Fraction of the handler time that ran in ksoftirqd (the rest ran inline on irq exit or
    /// local_bh_enable).
    pub in_ksoftirqd_share: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BpfProgramCost {
    pub id: u32,
    pub name: String,
    /// Where it is attached, from its BPF link ("tcx ingress on ifindex 7 (veth1)").
    pub attach: String,
    pub run_cnt: u64,
    pub run_time_ns: u64,
    pub cycles: u64,
    pub cpp: Option<f64>,
    /// Runs per packet of the datapath (counted in the `bpf` component).
    pub datapath: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CpuSplit {
    /// user + nice.
    pub user: f64,
    pub system: f64,
    pub softirq: f64,
    pub irq: f64,
    /// idle + iowait.
    pub idle: f64,
    /// Time a hypervisor ran something else (0 on bare metal).
    pub steal: f64,
    /// CPUs' worth of busy time (user + system + softirq + irq) over the window.
    pub busy_cpus: f64,
    /// Throughput of the selected packets in Gbit/s.
    pub throughput_gbps: f64,
    /// Performance efficiency: throughput per busy CPU.
    pub gbps_per_busy_cpu: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FunctionCost {
    pub function: String,
    /// The dotted component the whole sample was attributed to.
    pub component: String,
    pub cycles: u64,
    pub share: f64,
}

/// How many functions `top_functions` lists.
pub const TOP_FUNCTIONS: usize = 25;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Window {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub duration_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Packets {
    /// The denominator of every `cpp`.
    pub count: u64,
    pub unit: PacketUnit,
    pub source: String,
    pub skbs: u64,
    pub segments: u64,
    pub bytes: u64,
    pub interfaces: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Total {
    /// Busy cycles of all CPUs in the window (kernel and user; idle excluded).
    pub cycles: u64,
    /// `null` when no packet was counted.
    pub cpp: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ComponentCost {
    pub name: String,
    pub cycles: u64,
    pub cpp: Option<f64>,
    pub share: f64,
    pub available: bool,
    /// Samples behind the figure (sampling), or completed calls of its traced functions
    /// (tracing).
    #[serde(default)]
    pub samples: u64,
    /// 95% interval of `cpp` (`null` without packets). Sampled figures: the interval of a
    /// Poisson count of `samples`, the window's sampling error only (run-to-run variation of
    /// the workload comes on top). Exact sources (BPF statistics): the point itself. Traced
    /// figures: from net of the calibrated probe cost (`cpp`) to gross.
    #[serde(default)]
    pub cpp_ci95: Option<[f64; 2]>,
    /// Fewer than `MIN_SAMPLES` samples support a sampled figure: its interval is about
    /// -35%/+50% or wider, and it should not be compared with another window's.
    #[serde(default)]
    pub few_samples: bool,
}

/// Below this many samples, a sampled component is flagged `few_samples`.
pub const MIN_SAMPLES: u64 = 25;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Unavailable {
    pub name: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Quality {
    /// Samples taken in the window (busy and idle).
    pub samples: u64,
    pub busy_samples: u64,
    pub idle_samples: u64,
    /// Samples whose stack or whole record was lost.
    pub lost: u64,
    /// Busy samples whose stack the kernel cut at the sampler's depth limit (their outermost
    /// frames lost; the innermost, which decide the component, kept).
    #[serde(default)]
    pub truncated_stacks: u64,
    /// Samples the window may lack because the agent's memory budget dropped the retired
    /// sample epoch that held them (an upper bound; 0 outside long agent windows).
    #[serde(default)]
    pub samples_dropped: u64,
    pub stack_lost: u64,
    pub sample_map_full: u64,
    pub packet_map_full: u64,
    /// Kernel fields (skb length, segments, device identity) that could not be read.
    pub field_read_errors: u64,
    pub frequency_hz: u64,
    /// frequency x duration x CPUs: what a loss-free sampler would have taken.
    pub expected_samples: u64,
    /// Cycles spent in cnitrace's own in-datapath programs (included in `other`).
    pub self_cycles: u64,
    /// Cycles not attributed to any datapath component, of which user space:
    pub user_cycles: u64,
    /// How BPF run-time statistics were enabled for the window (`null`: they were not).
    pub bpf_stats: Option<String>,
    /// The `bpf` component as sampling estimated it (bpf_prog_* frames on the stacks) ...
    pub bpf_sampled_cycles: u64,
    /// ... and as the kernel's run-time statistics measured it, which `bpf` reports when
    /// available (the difference is taken from or given to `other`, keeping the closure).
    pub bpf_exact_cycles: Option<u64>,
    /// cnitrace's own in-kernel programs: runs and mean cost per run (from bpf_stats).
    pub probe_runs: u64,
    pub probe_cost_ns: Option<f64>,
    /// The tracing backend: what was attached how, the calibrated cost of a probe pair, calls
    /// per packet and CPP net of probe cost (`null` when sampling).
    pub tracing: Option<TracingQuality>,
    /// Samples that landed where interrupts are enabled again (cpu-clock only): the time of an
    /// interrupts-off section, charged to the function that held interrupts off (`null`
    /// with PMU cycles, whose samples are taken by NMI and do not skid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skid: Option<Skid>,
    /// The agent's own cost and its budget (absent outside the agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_cost: Option<AgentCost>,
}

/// One component's sampled cycles by the context they ran in: the first context entry from
/// the innermost frame outward (docs/method.md).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ContextCycles {
    pub name: String,
    /// Interrupt handlers.
    pub hardirq: u64,
    /// Softirqs run inline: on interrupt exit, or at `local_bh_enable` in the task that
    /// happened to run.
    pub softirq: u64,
    /// Softirq work in a thread: ksoftirqd, threaded NAPI.
    pub ksoftirqd: u64,
    /// System calls, kernel threads and user space.
    pub process: u64,
    /// Stacks cut at the depth limit before any context entry.
    pub unknown: u64,
}

/// Samples a cpu-clock sampler could only take when interrupts came back on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Skid {
    pub samples: u64,
    pub cycles: u64,
    /// Fraction of the busy cycles.
    pub share: f64,
    /// Where they were charged, costliest first: `function` is the caller that had
    /// interrupts off (`caller <- enable point`), `component` what it was charged to.
    pub callers: Vec<FunctionCost>,
}

/// What the agent estimates it costs the node, against the budget it keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AgentCost {
    /// `--max-overhead`: the most of the node's CPU time the agent lets itself take, percent.
    pub max_overhead_percent: f64,
    /// Samples per second per CPU x the cost of a sample + the agent process's CPU, percent
    /// of the node's CPU time, at the rate in force when the window closed.
    pub estimated_percent: f64,
    /// The agent process's own CPU (its user and system time), percent of the node's.
    pub process_cpu_percent: f64,
    /// The cost of one sample used: the calibrated figure (`--sample-cost-us`), or the
    /// sampler's run time measured by BPF statistics when that is higher.
    pub sample_cost_us: f64,
    /// The rate the sampler ran at when the window closed, per CPU.
    pub rate_hz: u64,
    /// Why the rate is below the one asked for (`null`: it is not).
    pub limited: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TracingQuality {
    pub functions: Vec<TracedFunction>,
    /// The costliest entry+exit probe pair in use, measured at start-up on this node.
    pub probe_pair_ns: Option<f64>,
    pub calibration: String,
    pub components: Vec<TracedComponent>,
    /// Entries not recorded because the nesting stack was full.
    pub nesting_overflows: u64,
    /// Times a CPU's nesting stack was found stale (a return probe missed) and restarted.
    pub nesting_resyncs: u64,
    /// Returns without a recorded entry (an entry probe missed).
    pub unmatched_exits: u64,
    pub unknown_functions: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TracedComponent {
    pub name: String,
    /// Completed calls of the component's traced functions.
    pub hits: u64,
    pub hits_per_packet: Option<f64>,
    /// Entry to return, callees included.
    pub inclusive_cycles: u64,
    /// Calibrated cost of one probe pair on this component's functions.
    pub probe_pair_ns: Option<f64>,
    /// Traced calls made while this component was innermost.
    pub nested_calls: u64,
    /// The component's CPP with its share of the probes' cost taken out: half a pair per own
    /// call and per traced call it made.
    pub cpp_net_of_probes: Option<f64>,
}

impl Breakdown {
    pub fn component(&self, name: &str) -> Option<&ComponentCost> {
        self.components.iter().find(|c| c.name == name)
    }

    /// Cycles of the `other` component (also reachable via [`Self::component`]).
    pub fn other_cycles(&self) -> u64 {
        self.component("other").map_or(0, |c| c.cycles)
    }
}

// ---- Building blocks shared with the probes and the netfilter walk ----

/// How one hook's base chain of one table was walked in a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChainWalk {
    /// Network namespace the ruleset was read in ("host" for cnitrace's own).
    pub netns: String,
    pub backend: String,
    pub family: String,
    pub hook: String,
    pub table: String,
    /// The base chain and the user chains reachable from it: the first 64 names, base chain
    /// first (kube-proxy's nat hooks reach tens of thousands).
    pub chains: Vec<String>,
    /// How many chains are reachable, the base chain included.
    pub chain_count: u32,
    /// Rules of all reachable chains.
    pub rules: u32,
    /// Packets that entered the base chain (`null`: not known).
    pub packets: Option<u64>,
    /// Rule evaluations by those packets, called chains included.
    pub rules_evaluated: Option<u64>,
    /// Where `packets` came from.
    pub packets_source: String,
    /// Some rules have no counter or changed in the window: evaluations are a lower bound.
    pub approximate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TracedFunction {
    pub function: String,
    pub component: String,
    /// `fentry`, `kprobe`, or `not attached`.
    pub mode: String,
    /// Why it is not attached, or how the symbol was found (`.isra` variants).
    pub note: Option<String>,
}

// ---- The agent's REST bodies ----

/// `POST /api/v1/sessions` body. Every field is optional.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionRequest {
    /// Stop by itself after this many seconds; open until stopped if absent.
    pub duration_s: Option<f64>,
    /// `auto`, `sampling` or `tracing`: must be the backend the agent runs (it is chosen when the
    /// agent starts); `auto` accepts whichever that is.
    pub backend: Option<String>,
    /// Interfaces whose transmitted packets are the denominator (default: the busiest device).
    pub ifaces: Option<Vec<String>>,
    /// Named network namespaces the interfaces may be in.
    pub netns: Option<Vec<String>>,
    /// `segment` (default) or `skb`.
    pub packet_unit: Option<PacketUnit>,
    /// `layer` (default), `self` or `children`: how sampled stacks are charged.
    #[serde(default)]
    pub view: Option<View>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    Running,
    Stopped,
    Failed,
}

/// A session as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    pub id: u64,
    pub state: SessionState,
    pub started: DateTime<Utc>,
    pub duration_s: Option<f64>,
    pub ifaces: Vec<String>,
    pub netns: Vec<String>,
    /// Present once the session has stopped.
    pub breakdown: Option<Breakdown>,
    /// Present if computing the breakdown failed.
    pub error: Option<String>,
}

/// `{"error": "..."}` with a 4xx status (5xx only when measuring itself failed).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example in docs/json.md is real output: it must stay a valid Breakdown (trimmed
    /// arrays, every field).
    #[test]
    fn the_documented_example_is_a_breakdown() {
        let doc = include_str!("../../docs/json.md");
        let start = doc.find("```json\n").expect("an example") + "```json\n".len();
        let end = start + doc[start..].find("\n```").expect("its end");
        let example: Breakdown = serde_json::from_str(&doc[start..end]).expect("a Breakdown");
        assert_eq!(
            (example.view, example.cycle_unit),
            (View::Layer, CycleUnit::Reference)
        );
        assert!(example.components.iter().all(|c| c.cpp_ci95.is_some()));
        assert!(example.quality.skid.is_some());
    }
}
