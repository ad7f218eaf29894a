//! Snapshots of the cumulative kernel aggregates, and the difference of two of them.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use cnitrace_common::{IfaceCounters, SampleKey, SampleValue, SoftirqStats};

use crate::breakdown::{CpuTicks, Faults};

/// Cumulative counters at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub wall: DateTime<Utc>,
    pub mono: std::time::Instant,
    pub samples: HashMap<SampleKey, SampleValue>,
    /// Per device: keyed by the kernel's `net_device` address (exact counter), or by namespace
    /// and ifindex (device counters, whose `tx_segments` are derived per window).
    pub ifaces: BTreeMap<u64, IfaceCounters>,
    /// MTU of each device read from its own counters (empty with the exact counter).
    pub device_mtu: BTreeMap<u64, u32>,
    /// Per softirq vector, all CPUs summed.
    pub softirq: Vec<SoftirqStats>,
    pub cpu: CpuTicks,
    /// Every loaded BPF program's cumulative statistics, by id.
    pub bpf_programs: BTreeMap<u32, ProgramStats>,
    pub faults: Faults,
    /// Tracing backend: per component id, all CPUs summed (empty when sampling).
    pub trace: Vec<cnitrace_common::TraceCost>,
}

/// Cumulative run statistics of one loaded BPF program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: String,
    /// `bpf_prog_type` number.
    pub program_type: u32,
    pub run_count: u64,
    pub run_time_ns: u64,
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
        self.delta_with_retired(earlier, std::iter::empty())
    }

    /// [`Snapshot::delta`] where sample keys left the kernel map between the two snapshots:
    /// `retired` holds the final values of the keys of the epochs retired after `earlier` was
    /// taken, so their growth up to the retirement still counts (also for keys born after
    /// `earlier`).
    pub fn delta_with_retired<'a>(
        &'a self,
        earlier: &Snapshot,
        retired: impl Iterator<Item = (&'a SampleKey, SampleValue)>,
    ) -> Delta {
        let live = self.samples.iter().map(|(key, now)| (key, *now));
        let gone = retired.filter(|(key, _)| !self.samples.contains_key(*key));
        let mut samples: Vec<(SampleKey, SampleValue)> = live
            .chain(gone)
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
                let mut diff = now.since(&before);
                if let Some(&mtu) = self.device_mtu.get(device) {
                    diff.tx_segments = crate::breakdown::segments(diff.tx_skbs, diff.tx_bytes, mtu);
                }
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
            trace_resync: a.trace_resync.saturating_sub(b.trace_resync),
            trace_unmatched_exit: a
                .trace_unmatched_exit
                .saturating_sub(b.trace_unmatched_exit),
            trace_unknown_function: a
                .trace_unknown_function
                .saturating_sub(b.trace_unknown_function),
            // Known per window only, from the epochs it spans (see the probes).
            samples_dropped: 0,
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
                            epoch: 0,
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
            device_mtu: BTreeMap::new(),
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
    fn retired_keys_count_up_to_their_retirement() {
        let a = snapshot(&[(1, 10, 100), (2, 5, 50)], &[], 0);
        let b = snapshot(&[(3, 4, 40)], &[], 0);
        // Key 1 left the map with a final count of 12, key 2 unchanged, and key 4 was born
        // and retired between the two snapshots.
        let final_values: Vec<(SampleKey, SampleValue)> = [(1, 12, 120), (2, 5, 50), (4, 3, 30)]
            .into_iter()
            .map(|(id, count, period)| {
                (
                    SampleKey {
                        stack_hash: id,
                        flags: 0,
                        epoch: 0,
                    },
                    SampleValue { count, period },
                )
            })
            .collect();
        let d = b.delta_with_retired(&a, final_values.iter().map(|(k, v)| (k, *v)));
        let mut ids: Vec<(u64, u64, u64)> = d
            .samples
            .iter()
            .map(|(k, v)| (k.stack_hash, v.count, v.period))
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![(1, 2, 20), (3, 4, 40), (4, 3, 30)]);
        // Without the retired values, key 1's last growth is lost.
        assert_eq!(b.delta(&a).samples.len(), 1);
    }
}
