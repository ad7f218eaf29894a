//! What the agent's memory is made of on a node of N CPUs, and the check that its cgroup's
//! limit covers it. Per-CPU maps are allocated for every possible CPU and, since Linux 5.11,
//! charged to the loading process's memory cgroup: sized for 2 CPUs they would take 96 MiB on
//! 192, so their capacity shrinks as the CPUs grow.

use cnitrace_common::{IfaceCounters, MAX_IFACES, MAX_SAMPLE_KEYS, MAX_STACKS, SampleValue};

use crate::error::Error;

/// The most the per-CPU sample aggregate's values may take.
const SAMPLE_VALUES_BUDGET: usize = 16 << 20;
/// The most the per-CPU device counters' values may take.
const IFACE_VALUES_BUDGET: usize = 4 << 20;
/// The kernel's own bookkeeping per hash element (bucket, element header, per-CPU pointer),
/// rounded up.
const ELEMENT_OVERHEAD: usize = 96;
/// A stored stack: the frames and its element (the stack table grows with use).
const STACK_BYTES: usize = cnitrace_common::STACK_DEPTH * 8 + ELEMENT_OVERHEAD;
/// The agent process at its peak apart from what is counted below: measured 26-40 MB (the
/// soak and agent benchmarks), with room.
const PROCESS_BYTES: usize = 64 << 20;
/// What the agent may keep between windows (its memory budgets).
const HELD_BYTES: usize = super::kernel::MAX_HELD_BYTES + crate::agent::MAX_STOPPED_STACKS_BYTES;

/// Distinct sample keys the aggregate holds on `cpus` possible CPUs: all 32,768 up to 32
/// CPUs, fewer beyond (at least 4,096: epochs then turn over more often, which costs a little
/// user-space work, not samples).
pub fn sample_keys(cpus: usize) -> u32 {
    let fit = SAMPLE_VALUES_BUDGET / (size_of::<SampleValue>() * cpus.max(1));
    u32::try_from(fit)
        .unwrap_or(u32::MAX)
        .clamp(4_096, MAX_SAMPLE_KEYS)
}

/// Devices the exact packet counter holds on `cpus` possible CPUs (at least 512).
pub fn iface_slots(cpus: usize) -> u32 {
    let fit = IFACE_VALUES_BUDGET / (size_of::<IfaceCounters>() * cpus.max(1));
    u32::try_from(fit)
        .unwrap_or(u32::MAX)
        .clamp(512, MAX_IFACES)
}

/// The memory the agent needs on a node, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryNeed {
    pub maps: usize,
    pub process: usize,
    pub held: usize,
}

impl MemoryNeed {
    pub fn on(cpus: usize) -> Self {
        let per_element = |values: usize| values * cpus + ELEMENT_OVERHEAD;
        let maps = sample_keys(cpus) as usize * per_element(size_of::<SampleValue>())
            + iface_slots(cpus) as usize * per_element(size_of::<IfaceCounters>())
            + MAX_STACKS as usize * STACK_BYTES;
        Self {
            maps,
            process: PROCESS_BYTES,
            held: HELD_BYTES,
        }
    }

    pub fn total(&self) -> usize {
        self.maps + self.process + self.held
    }
}

/// This process's memory cgroup limit, if it has one: cgroup v2's `memory.max`, else v1's
/// `memory.limit_in_bytes` (whose "no limit" is a number near 2^63, above any need).
fn cgroup_limit() -> Option<usize> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read =
        |file: String| -> Option<usize> { std::fs::read_to_string(file).ok()?.trim().parse().ok() };
    let v2 = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .and_then(|path| read(format!("/sys/fs/cgroup{path}/memory.max")));
    v2.or_else(|| {
        let path = cgroups.lines().find_map(|l| {
            let (_, rest) = l.split_once(':')?;
            let (controllers, path) = rest.split_once(':')?;
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then_some(path)
        })?;
        read(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"))
    })
    // In a container the cgroup namespace (or the runtime's mount) puts its own cgroup at
    // the root of the mount while /proc/self/cgroup may still name the host's path.
    .or_else(|| read("/sys/fs/cgroup/memory.max".to_owned()))
    .or_else(|| read("/sys/fs/cgroup/memory/memory.limit_in_bytes".to_owned()))
}

/// Refuses to start under a memory limit smaller than the node needs, saying how much and
/// why, instead of being killed by the OOM killer later.
pub fn check_limit() -> Result<(), Error> {
    let cpus = aya::util::nr_cpus().unwrap_or(1);
    check(cgroup_limit(), MemoryNeed::on(cpus), cpus)
}

fn check(limit: Option<usize>, need: MemoryNeed, cpus: usize) -> Result<(), Error> {
    let Some(limit) = limit else {
        return Ok(());
    };
    if limit >= need.total() {
        return Ok(());
    }
    let mib = |bytes: usize| bytes.div_ceil(1 << 20);
    Err(Error::InvalidArgument(format!(
        "the memory limit ({} MiB) is below what the agent needs on this node of {cpus} \
         possible CPUs: {} MiB = {} MiB of BPF maps + {} MiB for the process + {} MiB it may \
         keep between windows; raise the limit (the DaemonSet's resources.limits.memory) to \
         at least {} Mi",
        mib(limit),
        mib(need.total()),
        mib(need.maps),
        mib(need.process),
        mib(need.held),
        mib(need.total()),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_shrink_as_the_cpus_grow() {
        assert_eq!(sample_keys(2), MAX_SAMPLE_KEYS);
        assert_eq!(sample_keys(32), MAX_SAMPLE_KEYS);
        assert_eq!(sample_keys(192), 5_461);
        assert_eq!(sample_keys(100_000), 4_096);
        assert_eq!(iface_slots(2), MAX_IFACES);
        assert_eq!(iface_slots(192), 512);
        // The per-CPU values stay within their budgets up to 192 CPUs.
        let values = sample_keys(192) as usize * 16 * 192;
        assert!(values <= SAMPLE_VALUES_BUDGET, "{values}");
    }

    #[test]
    fn the_shipped_limit_covers_a_large_node_and_a_small_limit_is_refused() {
        // deploy/daemonset.yaml's limit.
        let shipped = 256 << 20;
        for cpus in [2, 64, 192, 512] {
            let need = MemoryNeed::on(cpus);
            assert!(need.total() <= shipped, "{cpus} CPUs: {need:?}");
            assert!(check(Some(shipped), need, cpus).is_ok());
        }
        let err = check(Some(64 << 20), MemoryNeed::on(192), 192).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("64 MiB") && text.contains("192 possible CPUs"),
            "{text}"
        );
        assert!(text.contains("resources.limits.memory"), "{text}");
        assert!(
            check(None, MemoryNeed::on(192), 192).is_ok(),
            "no limit, no check"
        );
    }
}
