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
    /// `net:net_dev_start_xmit` packet counter.
    pub const TX_COUNTER: &str = "cnitrace_tx";
    /// `net:netif_receive_skb` packet counter.
    pub const RX_COUNTER: &str = "cnitrace_rx";
    /// Prefix every cnitrace program name starts with.
    pub const PREFIX: &str = "cnitrace_";
}

/// Names of the maps in the object.
pub mod map {
    pub const STACKS: &str = "CNT_STACKS";
    pub const SAMPLES: &str = "CNT_SAMPLES";
    pub const IFACES: &str = "CNT_IFACES";
    pub const FAULTS: &str = "CNT_FAULTS";
}

/// Names of the read-only globals user space sets before loading (tracepoint field offsets,
/// read from tracefs at run time so one object works on every kernel layout).
pub mod global {
    pub const TX_NAME_LOC: &str = "TX_NAME_LOC";
    pub const TX_LEN: &str = "TX_LEN";
    pub const TX_GSO_SEGS: &str = "TX_GSO_SEGS";
    pub const RX_NAME_LOC: &str = "RX_NAME_LOC";
    pub const RX_LEN: &str = "RX_LEN";
}

/// Capacity of the stack table (distinct kernel stacks). Filling it is counted, not silent.
pub const MAX_STACKS: u32 = 32_768;
/// Innermost kernel frames kept per stack: enough to reach the datapath component from the
/// sampled instruction; the outer syscall or softirq entry frames do not change attribution.
pub const STACK_DEPTH: usize = 64;
/// Capacity of the per-CPU sample aggregate (distinct stack + flags keys).
pub const MAX_SAMPLE_KEYS: u32 = 32_768;
/// Capacity of the per-interface packet counters (interface names, all namespaces).
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
    pub padding: u32,
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

/// Key of the packet counters: the device name as the tracepoint reports it. Aligned to 8 so
/// zeroing it compiles to two stores instead of a call to a `memset` BPF subprogram (which
/// kallsyms would list as a program of its own).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct IfaceKey {
    pub name: [u8; IFNAMSIZ],
}

/// Packets and bytes that crossed one device name.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IfaceCounters {
    pub tx_skbs: u64,
    /// Wire segments: `gso_segs` of each transmitted skb (1 for a non-GSO skb).
    pub tx_segments: u64,
    pub tx_bytes: u64,
    pub rx_skbs: u64,
    pub rx_bytes: u64,
}

impl IfaceCounters {
    /// Sum of two counter sets (per-CPU values are summed this way).
    #[must_use]
    pub const fn plus(&self, other: &Self) -> Self {
        Self {
            tx_skbs: self.tx_skbs + other.tx_skbs,
            tx_segments: self.tx_segments + other.tx_segments,
            tx_bytes: self.tx_bytes + other.tx_bytes,
            rx_skbs: self.rx_skbs + other.rx_skbs,
            rx_bytes: self.rx_bytes + other.rx_bytes,
        }
    }

    /// What was added since `earlier` (counters only grow; saturating guards a map reset).
    #[must_use]
    pub const fn since(&self, earlier: &Self) -> Self {
        Self {
            tx_skbs: self.tx_skbs.saturating_sub(earlier.tx_skbs),
            tx_segments: self.tx_segments.saturating_sub(earlier.tx_segments),
            tx_bytes: self.tx_bytes.saturating_sub(earlier.tx_bytes),
            rx_skbs: self.rx_skbs.saturating_sub(earlier.rx_skbs),
            rx_bytes: self.rx_bytes.saturating_sub(earlier.rx_bytes),
        }
    }
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
    /// A tracepoint field could not be read.
    pub const TRACEPOINT_READ: u32 = 3;
    /// Total number of samples the sampler saw (so lost can be expressed as a fraction).
    pub const SAMPLES_SEEN: u32 = 4;
    /// Number of slots.
    pub const COUNT: u32 = 5;
}

const _: () = assert!(core::mem::size_of::<SampleKey>() == 16);
const _: () = assert!(core::mem::size_of::<StackFrames>() == 8 * STACK_DEPTH);
const _: () = assert!(core::mem::size_of::<SampleValue>() == 16);
const _: () = assert!(core::mem::size_of::<IfaceKey>() == IFNAMSIZ);
const _: () = assert!(core::mem::size_of::<IfaceCounters>() == 40);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers without padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::SampleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SampleValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IfaceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IfaceCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::StackFrames {}
}
