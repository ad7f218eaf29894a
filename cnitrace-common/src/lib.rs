//! Types and names shared by the cnitrace eBPF programs and the user-space agent.
//!
//! Everything here crosses the kernel/user boundary as raw bytes, so every type is
//! `#[repr(C)]` with explicit padding, holds no `bool` or enum, and has its size asserted.
#![no_std]

/// Names of the eBPF programs in the object. They also prefix what `bpftool prog show` lists,
/// which is how tests and users recognise what belongs to cnitrace.
pub mod program {
    /// `perf_event` stack sampler.
    pub const SAMPLER: &str = "cnitrace_sample";
    /// Raw tracepoint `net_dev_start_xmit` packet counter.
    pub const TX_COUNTER: &str = "cnitrace_tx";
    /// Raw tracepoints `irq:softirq_entry` and `softirq_exit`. (softirq_raise is left out:
    /// it fires per raise, often per packet, and a raise count is not worth that cost.)
    pub const SOFTIRQ_ENTRY: &str = "cnitrace_si_in";
    pub const SOFTIRQ_EXIT: &str = "cnitrace_si_out";
    /// The lab's tc program with adjustable work per packet (a datapath program, not ours).
    pub const LAB_TC_WORK: &str = "lab_tc_work";
    /// The lab's Cilium-like forwarding program: redirects pod traffic to the destination
    /// pod's host-side device by destination IPv4 address.
    pub const LAB_REDIRECT: &str = "lab_redirect";
    /// Prefix every cnitrace instrumentation program name starts with.
    pub const PREFIX: &str = "cnitrace_";
    /// Tracing with kprobes: one program attached to every traced function, and its return.
    pub const TRACE_KPROBE: &str = "cnitrace_kprobe";
    pub const TRACE_KRETPROBE: &str = "cnitrace_kretprobe";
    /// Tracing with BPF trampolines: `cnitrace_fentry_N` / `cnitrace_fexit_N`, N < TRACE_SLOTS.
    pub const TRACE_FENTRY_PREFIX: &str = "cnitrace_fentry_";
    pub const TRACE_FEXIT_PREFIX: &str = "cnitrace_fexit_";
}

/// Names of the maps in the object.
pub mod map {
    pub const STACKS: &str = "CNT_STACKS";
    pub const SAMPLES: &str = "CNT_SAMPLES";
    pub const IFACES: &str = "CNT_IFACES";
    pub const FAULTS: &str = "CNT_FAULTS";
    pub const SOFTIRQ: &str = "CNT_SOFTIRQ";
    /// `lab_redirect`'s table: destination IPv4 address (network order) -> [`super::LabRoute`].
    pub const LAB_ROUTES: &str = "LAB_ROUTES";
    /// Tracing: per-CPU [`super::TraceCost`] by component id.
    pub const TRACE: &str = "CNT_TRACE";
    /// Tracing: function address -> component id, for kprobes.
    pub const TRACE_FUNCTIONS: &str = "CNT_TRACE_FUNCS";
    /// Tracing: fentry slot -> component id.
    pub const TRACE_SLOTS: &str = "CNT_TRACE_SLOTS";
    /// The sampler's epoch (one `u32`): user space advances it to retire old sample keys and
    /// stacks, which it deletes once no open window can still need them.
    pub const EPOCH: &str = "CNT_EPOCH";
}

/// Names of the read-only globals user space sets before loading: struct offsets read from the
/// running kernel's BTF, so one object works on every kernel layout.
pub mod global {
    pub const SKB_LEN: &str = "SKB_LEN";
    pub const SKB_HEAD: &str = "SKB_HEAD";
    pub const SKB_END: &str = "SKB_END";
    pub const SHINFO_GSO_SEGS: &str = "SHINFO_GSO_SEGS";
    pub const DEV_NAME: &str = "DEV_NAME";
    pub const DEV_IFINDEX: &str = "DEV_IFINDEX";
    pub const DEV_ND_NET: &str = "DEV_ND_NET";
    pub const NET_NS_INUM: &str = "NET_NS_INUM";
    pub const LAB_WORK_LOOPS: &str = "LAB_WORK_LOOPS";
}

/// Capacity of the stack table (distinct kernel stacks). Filling it is counted, not silent.
pub const MAX_STACKS: u32 = 32_768;
/// Innermost kernel frames kept per stack: enough to reach the datapath component from the
/// sampled instruction; the outer syscall or softirq entry frames do not change attribution.
pub const STACK_DEPTH: usize = 64;
/// Capacity of the per-CPU sample aggregate (distinct stack + flags keys).
pub const MAX_SAMPLE_KEYS: u32 = 32_768;
/// Capacity of the per-device packet counters (devices of all namespaces).
pub const MAX_IFACES: u32 = 4_096;
/// `IFNAMSIZ` in the kernel.
pub const IFNAMSIZ: usize = 16;

/// The sampled context ran in user mode (no kernel stack).
pub const SAMPLE_FLAG_USER: u32 = 1;
/// The sampled task was a per-CPU idle task (pid 0); user space decides whether the stack
/// shows interrupt work done on the idle task (busy) or the idle loop itself (not busy).
pub const SAMPLE_FLAG_IDLE_TASK: u32 = 2;

/// Key of the sample aggregate: one kernel stack and the context flags.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SampleKey {
    /// 64-bit FNV-1a hash of the kernel frames (key of the stack table); 0 when no kernel stack
    /// was taken (user mode, or the copy failed).
    pub stack_hash: u64,
    /// `SAMPLE_FLAG_*` bits.
    pub flags: u32,
    /// The sampler's epoch when the key was made (also mixed into `stack_hash`), so that keys
    /// of a retired epoch stop growing and can be deleted without ever being made again.
    pub epoch: u32,
}

/// One kernel stack: return addresses, innermost first, zero-filled past the last frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StackFrames {
    pub ips: [u64; STACK_DEPTH],
}

impl Default for StackFrames {
    fn default() -> Self {
        Self {
            ips: [0; STACK_DEPTH],
        }
    }
}

/// FNV-1a over a stack's frames; the same function on both sides keeps keys comparable.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Value of the sample aggregate.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SampleValue {
    /// Number of samples.
    pub count: u64,
    /// Sum of the sample periods: nanoseconds for cpu-clock, cycles for a hardware counter.
    pub period: u64,
}

impl SampleValue {
    /// Sum of two aggregates (per-CPU values are summed this way).
    #[must_use]
    pub const fn plus(&self, other: &Self) -> Self {
        Self {
            count: self.count + other.count,
            period: self.period + other.period,
        }
    }

    /// What was added since `earlier` (counters only grow; saturating guards a map reset).
    #[must_use]
    pub const fn since(&self, earlier: &Self) -> Self {
        Self {
            count: self.count.saturating_sub(earlier.count),
            period: self.period.saturating_sub(earlier.period),
        }
    }
}

/// Packets and bytes one device transmitted. Keyed in the kernel by the `net_device` address,
/// so equal names in different namespaces stay apart; the identity fields are filled when the
/// device is first seen.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IfaceCounters {
    pub name: [u8; IFNAMSIZ],
    pub ifindex: u32,
    /// Inode number of the device's network namespace (as `stat /run/netns/NAME` shows).
    pub netns_inode: u32,
    pub tx_skbs: u64,
    /// Wire segments: `gso_segs` of each transmitted skb (1 for a non-GSO skb).
    pub tx_segments: u64,
    pub tx_bytes: u64,
}

impl IfaceCounters {
    /// Sum of two counter sets of the same device (per-CPU values are summed this way). The
    /// identity comes from whichever side has one (a CPU that never saw the device has zeros).
    #[must_use]
    pub const fn plus(&self, other: &Self) -> Self {
        let identity = if self.ifindex != 0 { self } else { other };
        Self {
            name: identity.name,
            ifindex: identity.ifindex,
            netns_inode: identity.netns_inode,
            tx_skbs: self.tx_skbs + other.tx_skbs,
            tx_segments: self.tx_segments + other.tx_segments,
            tx_bytes: self.tx_bytes + other.tx_bytes,
        }
    }

    /// What was added since `earlier` (counters only grow; saturating guards a map reset).
    #[must_use]
    pub const fn since(&self, earlier: &Self) -> Self {
        Self {
            name: self.name,
            ifindex: self.ifindex,
            netns_inode: self.netns_inode,
            tx_skbs: self.tx_skbs.saturating_sub(earlier.tx_skbs),
            tx_segments: self.tx_segments.saturating_sub(earlier.tx_segments),
            tx_bytes: self.tx_bytes.saturating_sub(earlier.tx_bytes),
        }
    }

    /// The device name up to its NUL.
    pub fn name_bytes(&self) -> &[u8] {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        &self.name[..end]
    }
}

/// Most iterations `lab_tc_work` can do per packet (its verifier-visible bound).
pub const LAB_MAX_LOOPS: u32 = 8192;

/// Depth of the per-CPU nesting stack of traced functions.
pub const TRACE_MAX_DEPTH: usize = 16;
/// fentry/fexit program pairs in the object (`cnitrace_fentry_N`, `cnitrace_fexit_N`): one per
/// function traced with BPF trampolines; the rest fall back to kprobes.
pub const TRACE_SLOTS: u32 = 16;
/// Most functions traced with kprobes.
pub const MAX_TRACE_FUNCTIONS: u32 = 512;
/// Component ids the tracer accounts (indices into the taxonomy's components).
pub const MAX_TRACE_COMPONENTS: u32 = 32;

/// One traced function in progress on a CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceFrame {
    pub component: u32,
    pub padding: u32,
    /// When the function was entered (for inclusive time).
    pub entered_ns: u64,
    /// When it last got the CPU back from a traced callee (for exclusive time).
    pub resumed_ns: u64,
}

/// Depth of the per-CPU stack of traced functions in progress (the frames are the entries
/// 0..depth of a per-CPU array map of [`TraceFrame`]s).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceDepth {
    pub depth: u32,
    /// Entries not pushed because the stack was full; their exits are skipped.
    pub overflow: u32,
}

/// What the tracer measured for one component on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TraceCost {
    /// Completed calls of the component's traced functions.
    pub hits: u64,
    /// Time in the component minus the time in traced callees of other components.
    pub exclusive_ns: u64,
    /// Time from entry to return.
    pub inclusive_ns: u64,
    /// Traced calls of other functions made while this component was innermost: each one
    /// lends this component part of its probes' cost.
    pub nested_calls: u64,
}

impl TraceCost {
    #[must_use]
    pub const fn plus(&self, other: &Self) -> Self {
        Self {
            hits: self.hits + other.hits,
            exclusive_ns: self.exclusive_ns + other.exclusive_ns,
            inclusive_ns: self.inclusive_ns + other.inclusive_ns,
            nested_calls: self.nested_calls + other.nested_calls,
        }
    }

    #[must_use]
    pub const fn since(&self, earlier: &Self) -> Self {
        Self {
            hits: self.hits.saturating_sub(earlier.hits),
            exclusive_ns: self.exclusive_ns.saturating_sub(earlier.exclusive_ns),
            inclusive_ns: self.inclusive_ns.saturating_sub(earlier.inclusive_ns),
            nested_calls: self.nested_calls.saturating_sub(earlier.nested_calls),
        }
    }
}

const _: () = assert!(core::mem::size_of::<TraceFrame>() == 24);
const _: () = assert!(core::mem::size_of::<TraceDepth>() == 8);
const _: () = assert!(core::mem::size_of::<TraceCost>() == 32);

/// Most destinations `lab_redirect` knows.
pub const LAB_MAX_ROUTES: u32 = 1024;

/// Where `lab_redirect` sends packets for one destination: out of `ifindex`, with the
/// Ethernet header rewritten to `macs` (destination then source), as a router would.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct LabRoute {
    pub ifindex: u32,
    pub macs: [u8; 12],
}

const _: () = assert!(core::mem::size_of::<LabRoute>() == 16);

/// `NR_SOFTIRQS`: HI, TIMER, NET_TX, NET_RX, BLOCK, IRQ_POLL, TASKLET, SCHED, HRTIMER, RCU.
pub const NR_SOFTIRQS: u32 = 10;

/// Softirq work of one vector on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SoftirqStats {
    /// Handler runs (softirq_entry .. softirq_exit pairs).
    pub count: u64,
    /// Nanoseconds spent in the handler.
    pub ns: u64,
    /// The part of `count` and `ns` that ran in ksoftirqd rather than inline on irq exit or
    /// local_bh_enable.
    pub ksoftirqd_count: u64,
    pub ksoftirqd_ns: u64,
}

impl SoftirqStats {
    #[must_use]
    pub const fn plus(&self, other: &Self) -> Self {
        Self {
            count: self.count + other.count,
            ns: self.ns + other.ns,
            ksoftirqd_count: self.ksoftirqd_count + other.ksoftirqd_count,
            ksoftirqd_ns: self.ksoftirqd_ns + other.ksoftirqd_ns,
        }
    }

    #[must_use]
    pub const fn since(&self, earlier: &Self) -> Self {
        Self {
            count: self.count.saturating_sub(earlier.count),
            ns: self.ns.saturating_sub(earlier.ns),
            ksoftirqd_count: self.ksoftirqd_count.saturating_sub(earlier.ksoftirqd_count),
            ksoftirqd_ns: self.ksoftirqd_ns.saturating_sub(earlier.ksoftirqd_ns),
        }
    }
}

/// Per-CPU state between softirq_entry and softirq_exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SoftirqStart {
    /// bpf_ktime_get_ns at entry; 0 when no handler is running.
    pub start_ns: u64,
    pub vector: u32,
    /// 1 when the handler runs in a ksoftirqd thread.
    pub in_ksoftirqd: u32,
}

/// Indices of the per-CPU fault counters: every way a kernel-side update can fail.
pub mod fault {
    /// The kernel stack could not be copied or the stack table was full: the sample's time is
    /// kept but it cannot be attributed to a component.
    pub const STACK_LOST: u32 = 0;
    /// The sample aggregate was full: the sample is lost entirely.
    pub const SAMPLE_MAP_FULL: u32 = 1;
    /// The interface counter map was full: the packet was not counted.
    pub const IFACE_MAP_FULL: u32 = 2;
    /// A kernel field (skb length, segments, device identity) could not be read.
    pub const FIELD_READ: u32 = 3;
    /// Total number of samples the sampler saw (so lost can be expressed as a fraction).
    pub const SAMPLES_SEEN: u32 = 4;
    /// Tracing: a function was entered with the nesting stack full (its time goes to the caller).
    pub const TRACE_OVERFLOW: u32 = 5;
    /// Tracing: a function returned with no entry on the stack (an entry probe missed).
    pub const TRACE_UNMATCHED_EXIT: u32 = 6;
    /// Tracing: a kprobe fired at an address cnitrace did not register.
    pub const TRACE_UNKNOWN_FUNCTION: u32 = 7;
    /// Tracing: the nesting stack was found stale (its bottom frame entered over a second ago)
    /// and started again: a return probe was missed (kretprobe instances
    /// exhausted), and without the restart nothing would be charged again on that CPU.
    pub const TRACE_RESYNC: u32 = 8;
    /// Number of slots.
    pub const COUNT: u32 = 9;
}

const _: () = assert!(core::mem::size_of::<SampleKey>() == 16);
const _: () = assert!(core::mem::size_of::<StackFrames>() == 8 * STACK_DEPTH);
const _: () = assert!(core::mem::size_of::<SampleValue>() == 16);
const _: () = assert!(core::mem::size_of::<IfaceCounters>() == 48);
const _: () = assert!(core::mem::size_of::<SoftirqStats>() == 32);
const _: () = assert!(core::mem::size_of::<SoftirqStart>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers without padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::SampleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SampleValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IfaceCounters {}
    // SAFETY: repr(C), integers and bytes only, no padding (size asserted).
    unsafe impl aya::Pod for super::LabRoute {}
    // SAFETY: repr(C), integers only, explicit padding, sizes asserted.
    unsafe impl aya::Pod for super::TraceCost {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TraceDepth {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::StackFrames {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SoftirqStats {}
}
