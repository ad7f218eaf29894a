//! Measurement windows: a snapshot of the cumulative kernel aggregates, the difference of two
//! snapshots, and turning a window into a Breakdown with the node's context.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use cnitrace_common::{IfaceCounters, SampleKey, SampleValue, SoftirqStats};

use crate::{
    breakdown::{
        self, Breakdown, Context, CpuTicks, Faults, PacketSelection, RawWindow, Unavailable,
    },
    components::{self, COMPONENTS},
    kallsyms::Kallsyms,
};

/// Cumulative counters at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub wall: DateTime<Utc>,
    pub mono: std::time::Instant,
    pub samples: HashMap<SampleKey, SampleValue>,
    /// Per device, keyed by the kernel's `net_device` address.
    pub ifaces: BTreeMap<u64, IfaceCounters>,
    /// Per softirq vector, all CPUs summed.
    pub softirq: Vec<SoftirqStats>,
    pub cpu: CpuTicks,
    /// Every loaded BPF program's cumulative statistics, by id.
    pub bpf_programs: BTreeMap<u32, crate::probe::bpf_stats::ProgramStats>,
    pub faults: Faults,
    /// Tracing backend: per component id, all CPUs summed (empty when sampling).
    pub trace: Vec<cnitrace_common::TraceCost>,
}

/// What happened between two snapshots.
#[derive(Debug, Clone, Default)]
pub struct Delta {
    pub samples: Vec<(SampleKey, SampleValue)>,
    pub ifaces: BTreeMap<u64, IfaceCounters>,
    pub softirq: Vec<SoftirqStats>,
    pub cpu: CpuTicks,
    pub faults: Faults,
    pub trace: Vec<cnitrace_common::TraceCost>,
}

impl Snapshot {
    /// `self - earlier`, keeping only entries that changed. Counters only grow, so a key absent
    /// from `earlier` started at zero.
    pub fn delta(&self, earlier: &Snapshot) -> Delta {
        let mut samples: Vec<(SampleKey, SampleValue)> = self
            .samples
            .iter()
            .filter_map(|(key, now)| {
                let before = earlier.samples.get(key).copied().unwrap_or_default();
                let diff = now.since(&before);
                (diff.count > 0).then_some((*key, diff))
            })
            .collect();
        samples.sort_unstable_by_key(|(key, _)| *key);
        let ifaces = self
            .ifaces
            .iter()
            .filter_map(|(device, now)| {
                let before = earlier.ifaces.get(device).copied().unwrap_or_default();
                let diff = now.since(&before);
                (diff.tx_skbs > 0).then_some((*device, diff))
            })
            .collect();
        let (a, b) = (&self.faults, &earlier.faults);
        let faults = Faults {
            samples_seen: a.samples_seen.saturating_sub(b.samples_seen),
            stack_lost: a.stack_lost.saturating_sub(b.stack_lost),
            sample_map_full: a.sample_map_full.saturating_sub(b.sample_map_full),
            iface_map_full: a.iface_map_full.saturating_sub(b.iface_map_full),
            field_read: a.field_read.saturating_sub(b.field_read),
            trace_overflow: a.trace_overflow.saturating_sub(b.trace_overflow),
            trace_unmatched_exit: a
                .trace_unmatched_exit
                .saturating_sub(b.trace_unmatched_exit),
            trace_unknown_function: a
                .trace_unknown_function
                .saturating_sub(b.trace_unknown_function),
        };
        let trace = self
            .trace
            .iter()
            .enumerate()
            .map(|(i, now)| now.since(&earlier.trace.get(i).copied().unwrap_or_default()))
            .collect();
        let softirq = self
            .softirq
            .iter()
            .zip(
                earlier
                    .softirq
                    .iter()
                    .copied()
                    .chain(std::iter::repeat(SoftirqStats::default())),
            )
            .map(|(now, before)| now.since(&before))
            .collect();
        Delta {
            samples,
            ifaces,
            softirq,
            cpu: self.cpu.since(&earlier.cpu),
            faults,
            trace,
        }
    }
}

/// What a window needs from the kernel side. The sampler implements it; router tests use a
/// synthetic one, so everything above the probe runs without privileges.
pub trait Probe: Send + Sync + 'static {
    /// The cumulative counters now.
    fn snapshot(&self) -> Result<Snapshot, crate::Error>;
    /// The window between two snapshots, symbolized. `bpf_stats` says how BPF run-time
    /// statistics were enabled over the window, if they were.
    fn window(
        &self,
        start: &Snapshot,
        end: &Snapshot,
        bpf_stats: Option<&str>,
    ) -> Result<RawWindow, crate::Error>;
    /// Components this node lacks, with the reason.
    fn unavailable(&self) -> Vec<Unavailable>;
    fn backend(&self) -> &'static str {
        "sampling"
    }
    /// Switches BPF run-time statistics on until the guard drops (`None` if unavailable).
    fn enable_bpf_stats(&self) -> Option<crate::probe::bpf_stats::StatsGuard> {
        crate::probe::bpf_stats::StatsGuard::enable()
            .inspect_err(|e| tracing::warn!("BPF run-time statistics unavailable: {e}"))
            .ok()
    }
}

/// The node name: NODE_NAME (the DaemonSet sets it from spec.nodeName), else the hostname.
pub fn node_name() -> String {
    std::env::var("NODE_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

pub fn kernel_release() -> String {
    nix::sys::utsname::uname().map_or_else(
        |_| "unknown".to_owned(),
        |u| u.release().to_string_lossy().into_owned(),
    )
}

/// Components whose code is absent from this kernel, with the reason.
pub fn unavailable_components(kallsyms: &Kallsyms) -> Vec<Unavailable> {
    let present: std::collections::HashSet<&str> =
        kallsyms.names().map(components::base_name).collect();
    COMPONENTS
        .iter()
        .filter_map(|c| {
            components::unavailable_reason(c, |s| present.contains(s)).map(|reason| Unavailable {
                name: c.name.to_owned(),
                reason,
            })
        })
        .collect()
}

/// The Breakdown of a window from any probe, with this node's context.
pub fn breakdown_from(
    probe: &dyn Probe,
    raw: &RawWindow,
    selection: &PacketSelection,
) -> Breakdown {
    let context = Context {
        node: node_name(),
        kernel: kernel_release(),
        backend: probe.backend().to_owned(),
        unavailable: probe.unavailable(),
    };
    breakdown::compute(raw, &context, selection)
}

/// The Breakdown of a window, with this node's context.
pub fn breakdown_of(
    raw: &RawWindow,
    kallsyms: &Kallsyms,
    backend: &str,
    selection: &PacketSelection,
) -> Breakdown {
    let context = Context {
        node: node_name(),
        kernel: kernel_release(),
        backend: backend.to_owned(),
        unavailable: unavailable_components(kallsyms),
    };
    breakdown::compute(raw, &context, selection)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(samples: &[(u64, u64, u64)], ifaces: &[(&str, u64)], stack_lost: u64) -> Snapshot {
        Snapshot {
            wall: Utc::now(),
            mono: std::time::Instant::now(),
            samples: samples
                .iter()
                .map(|&(id, count, period)| {
                    (
                        SampleKey {
                            stack_hash: id,
                            flags: 0,
                            padding: 0,
                        },
                        SampleValue { count, period },
                    )
                })
                .collect(),
            ifaces: ifaces
                .iter()
                .enumerate()
                .map(|(device, &(n, skbs))| {
                    let mut c = IfaceCounters {
                        tx_skbs: skbs,
                        ..Default::default()
                    };
                    c.name[..n.len()].copy_from_slice(n.as_bytes());
                    (device as u64, c)
                })
                .collect(),
            softirq: vec![SoftirqStats::default(); 10],
            cpu: CpuTicks::default(),
            bpf_programs: BTreeMap::new(),
            trace: Vec::new(),
            faults: Faults {
                stack_lost,
                ..Default::default()
            },
        }
    }

    #[test]
    fn delta_keeps_only_what_changed() {
        let a = snapshot(&[(1, 10, 100), (2, 5, 50)], &[("veth0", 7), ("lo", 3)], 1);
        let b = snapshot(
            &[(1, 15, 150), (2, 5, 50), (3, 2, 20)],
            &[("veth0", 10), ("lo", 3)],
            4,
        );
        let d = b.delta(&a);
        let ids: Vec<(u64, u64, u64)> = d
            .samples
            .iter()
            .map(|(k, v)| (k.stack_hash, v.count, v.period))
            .collect();
        assert_eq!(ids, vec![(1, 5, 50), (3, 2, 20)]);
        assert_eq!(d.ifaces.len(), 1);
        assert_eq!(d.ifaces[&0].tx_skbs, 3);
        assert_eq!(d.ifaces[&0].name_bytes(), b"veth0");
        assert_eq!(d.faults.stack_lost, 3);
    }

    #[test]
    fn unavailable_lists_absent_components_with_reasons() {
        let syms =
            Kallsyms::parse("ffffffff81000000 t br_forward\nffffffff81000100 t nf_hook_slow\n");
        let unavailable = unavailable_components(&syms);
        let names: Vec<&str> = unavailable.iter().map(|u| u.name.as_str()).collect();
        assert!(names.contains(&"ipip") && names.contains(&"vxlan") && names.contains(&"ovs"));
        assert!(!names.contains(&"bridge") && !names.contains(&"netfilter"));
        assert!(!names.contains(&"other") && !names.contains(&"bpf"));
        assert!(unavailable.iter().all(|u| !u.reason.is_empty()));
    }
}
