//! cnitrace's kernel side: a `perf_event` stack sampler and a packet counter.
//!
//! Everything aggregates in per-CPU maps; nothing is sent to user space per event. Every way an
//! update can fail increments a counter in `CNT_FAULTS`, so user space can report what was lost.
#![no_std]
#![no_main]

use core::mem::MaybeUninit;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes,
        generated::{bpf_get_func_ip, bpf_get_stack, bpf_redirect},
    },
    macros::{classifier, fentry, fexit, kprobe, kretprobe, map, perf_event, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
    programs::{
        FEntryContext, FExitContext, PerfEventContext, ProbeContext, RawTracePointContext,
        RetProbeContext, TcContext,
    },
};
use cnitrace_common::{
    FNV_OFFSET, FNV_PRIME, IfaceCounters, LAB_MAX_LOOPS, LAB_MAX_ROUTES, LabRoute, MAX_IFACES,
    MAX_SAMPLE_KEYS, MAX_STACKS, MAX_TRACE_COMPONENTS, MAX_TRACE_FUNCTIONS, NR_SOFTIRQS,
    SAMPLE_FLAG_IDLE_TASK, SAMPLE_FLAG_USER, STACK_DEPTH, SampleKey, SampleValue, SoftirqStart,
    SoftirqStats, StackFrames, TRACE_MAX_DEPTH, TRACE_SLOTS, TraceCost, TraceDepth, TraceFrame,
    fault,
};

/// Stack table keyed by the frames' hash. Not preallocated: memory grows with distinct stacks
/// only, and a 64-bit key makes collisions negligible (a stack-trace map's buckets collide).
#[map(name = "CNT_STACKS")]
static STACKS: HashMap<u64, StackFrames> = HashMap::with_max_entries(MAX_STACKS, BPF_F_NO_PREALLOC);

#[map(name = "CNT_SOFTIRQ")]
static SOFTIRQ: PerCpuArray<SoftirqStats> = PerCpuArray::with_max_entries(NR_SOFTIRQS, 0);

#[map(name = "CNT_SOFTIRQ_START")]
static SOFTIRQ_START: PerCpuArray<SoftirqStart> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch for copying a stack (too large for the 512-byte BPF stack).
#[map(name = "CNT_SCRATCH")]
static SCRATCH: PerCpuArray<StackFrames> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "CNT_SAMPLES")]
static SAMPLES: PerCpuHashMap<SampleKey, SampleValue> =
    PerCpuHashMap::with_max_entries(MAX_SAMPLE_KEYS, 0);

/// Keyed by the `net_device` address: unique across namespaces while the device lives.
#[map(name = "CNT_IFACES")]
static IFACES: PerCpuHashMap<u64, IfaceCounters> = PerCpuHashMap::with_max_entries(MAX_IFACES, 0);

#[map(name = "CNT_FAULTS")]
static FAULTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(fault::COUNT, 0);

// Struct offsets, set by user space from the kernel's BTF before load.
#[unsafe(no_mangle)]
static SKB_LEN: u32 = 0;
#[unsafe(no_mangle)]
static SKB_HEAD: u32 = 0;
#[unsafe(no_mangle)]
static SKB_END: u32 = 0;
#[unsafe(no_mangle)]
static SHINFO_GSO_SEGS: u32 = 6;
#[unsafe(no_mangle)]
static DEV_NAME: u32 = 0;
#[unsafe(no_mangle)]
static DEV_IFINDEX: u32 = 0;
#[unsafe(no_mangle)]
static DEV_ND_NET: u32 = 0;
#[unsafe(no_mangle)]
static NET_NS_INUM: u32 = 0;

#[inline(always)]
fn global(value: &'static u32) -> usize {
    // SAFETY: the global lives in .rodata; a volatile read keeps the compiler from folding the
    // default value in, so the value user space set at load time is used.
    unsafe { core::ptr::read_volatile(value) as usize }
}

/// Zeroes `*place` with volatile u64 stores, in place. Plain zeroing (or moving a zeroed value)
/// compiles to a call to a `memset` BPF subprogram, which kallsyms lists as a program of its
/// own and would be mistaken for datapath BPF. `T` must be 8-aligned, a multiple of 8 bytes.
///
/// # Safety
/// `place` must be valid for writes of `T`.
#[inline(always)]
unsafe fn zero_in_place<T>(place: *mut T) {
    const { assert!(core::mem::size_of::<T>().is_multiple_of(8) && core::mem::align_of::<T>() == 8) };
    let words = place.cast::<u64>();
    for i in 0..core::mem::size_of::<T>() / 8 {
        // SAFETY: `i` indexes a u64 inside `*place` (caller guarantees validity and alignment).
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
}

#[inline(always)]
fn count_fault(index: u32) {
    if let Some(slot) = FAULTS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it and the program is not preempted.
        unsafe { *slot += 1 };
    }
}

#[perf_event]
pub fn cnitrace_sample(ctx: PerfEventContext) -> u32 {
    match try_sample(&ctx) {
        Ok(()) => 0,
        Err(fault_index) => {
            count_fault(fault_index);
            0
        }
    }
}

fn try_sample(ctx: &PerfEventContext) -> Result<(), u32> {
    count_fault(fault::SAMPLES_SEEN);
    // SAFETY: ctx.ctx points at the bpf_perf_event_data the kernel passed to this program.
    let period = unsafe { (*ctx.ctx).sample_period };
    let pid = bpf_get_current_pid_tgid() as u32;
    let mut flags = if pid == 0 { SAMPLE_FLAG_IDLE_TASK } else { 0 };
    let stack_hash = match record_kernel_stack(ctx) {
        Ok(Some(hash)) => hash,
        Ok(None) => {
            flags |= SAMPLE_FLAG_USER;
            0
        }
        Err(fault_index) => {
            // Keep the sample's time (unattributed) so the busy total stays right.
            count_fault(fault_index);
            0
        }
    };
    let key = SampleKey {
        stack_hash,
        flags,
        padding: 0,
    };
    add_sample(&key, period)
}

/// Copies the sampled kernel stack, stores it under its hash, returns the hash; `None` when the
/// sample hit user mode (no kernel frames).
#[inline(always)]
fn record_kernel_stack(ctx: &PerfEventContext) -> Result<Option<u64>, u32> {
    let frames = SCRATCH.get_ptr_mut(0).ok_or(fault::STACK_LOST)?;
    // SAFETY: the per-CPU scratch slot is ours for the duration of this non-preemptible program.
    let frames = unsafe { &mut *frames };
    let size = core::mem::size_of::<StackFrames>() as u32;
    // SAFETY: the buffer is `size` bytes of writable map memory.
    let copied = unsafe { bpf_get_stack(ctx.as_ptr(), frames.ips.as_mut_ptr().cast(), size, 0) };
    if copied < 0 {
        return Err(fault::STACK_LOST);
    }
    let depth = copied as usize / 8;
    if depth == 0 {
        return Ok(None);
    }
    let mut hash = FNV_OFFSET;
    for i in 0..STACK_DEPTH {
        if i >= depth {
            frames.ips[i] = 0;
        } else {
            hash = (hash ^ frames.ips[i]).wrapping_mul(FNV_PRIME);
        }
    }
    // SAFETY: lookup only; the value is not dereferenced.
    if unsafe { STACKS.get(hash) }.is_none()
        && let Err(errno) = STACKS.insert(hash, frames, u64::from(BPF_NOEXIST))
    {
        // -EEXIST: another CPU stored the same stack meanwhile, which is fine.
        if errno != -17 {
            return Err(fault::STACK_LOST);
        }
    }
    Ok(Some(hash))
}

#[inline(always)]
fn add_sample(key: &SampleKey, period: u64) -> Result<(), u32> {
    if let Some(value) = SAMPLES.get_ptr_mut(key) {
        // SAFETY: per-CPU value, written only by this CPU in a non-preemptible program.
        unsafe {
            (*value).count += 1;
            (*value).period += period;
        }
        return Ok(());
    }
    let value = SampleValue { count: 1, period };
    SAMPLES
        .insert(key, value, u64::from(BPF_NOEXIST))
        .map_err(|_| fault::SAMPLE_MAP_FULL)
}

/// `net_dev_start_xmit(const struct sk_buff *skb, const struct net_device *dev)`: a raw
/// tracepoint gets both pointers without the kernel formatting a trace record first, which is
/// most of a classic tracepoint's per-packet cost.
#[raw_tracepoint(tracepoint = "net_dev_start_xmit")]
pub fn cnitrace_tx(ctx: RawTracePointContext) -> i32 {
    if let Err(fault_index) = try_tx(&ctx) {
        count_fault(fault_index);
    }
    0
}

#[inline(always)]
fn read<T>(base: *const u8, offset: usize) -> Result<T, u32> {
    // SAFETY: bpf_probe_read_kernel checks the address; a fault is reported, not dereferenced.
    unsafe { bpf_probe_read_kernel(base.add(offset).cast::<T>()) }.map_err(|_| fault::FIELD_READ)
}

fn try_tx(ctx: &RawTracePointContext) -> Result<(), u32> {
    let skb: *const u8 = ctx.arg(0);
    let dev: *const u8 = ctx.arg(1);
    let len: u32 = read(skb, global(&SKB_LEN))?;
    let head: *const u8 = read(skb, global(&SKB_HEAD))?;
    // On 64-bit kernels `end` is an offset from `head`; skb_shinfo(skb) = head + end.
    let end: u32 = read(skb, global(&SKB_END))?;
    let segs: u16 = read(head, end as usize + global(&SHINFO_GSO_SEGS))?;
    let segs = if segs == 0 { 1 } else { u64::from(segs) };
    let key = dev as u64;
    if let Some(counters) = IFACES.get_ptr_mut(key) {
        // SAFETY: per-CPU value, written only by this CPU in a non-preemptible program.
        unsafe {
            (*counters).tx_skbs += 1;
            (*counters).tx_segments += segs;
            (*counters).tx_bytes += u64::from(len);
        }
        return Ok(());
    }
    // First packet of this device on this CPU: record who it is.
    let mut counters = MaybeUninit::<IfaceCounters>::uninit();
    // SAFETY: zeroed in place (so no memset subprogram), then only integer fields are written.
    let counters = unsafe {
        zero_in_place(counters.as_mut_ptr());
        counters.assume_init_mut()
    };
    // SAFETY: the helper bounds the copy to the 16-byte name and reports faults.
    unsafe { bpf_probe_read_kernel_str_bytes(dev.add(global(&DEV_NAME)), &mut counters.name) }
        .map_err(|_| fault::FIELD_READ)?;
    counters.ifindex = read(dev, global(&DEV_IFINDEX))?;
    let net: *const u8 = read(dev, global(&DEV_ND_NET))?;
    counters.netns_inode = read(net, global(&NET_NS_INUM))?;
    counters.tx_skbs = 1;
    counters.tx_segments = segs;
    counters.tx_bytes = u64::from(len);
    IFACES
        .insert(key, counters, u64::from(BPF_NOEXIST))
        .map_err(|_| fault::IFACE_MAP_FULL)
}

/// `softirq_entry(unsigned int vec_nr)`.
#[raw_tracepoint(tracepoint = "softirq_entry")]
pub fn cnitrace_si_in(ctx: RawTracePointContext) -> i32 {
    let vector: u64 = ctx.arg(0);
    if let Some(start) = SOFTIRQ_START.get_ptr_mut(0) {
        // Softirq handlers do not nest on a CPU, so one slot per CPU suffices.
        let in_ksoftirqd = current_comm_is_ksoftirqd();
        // SAFETY: per-CPU slot, written only by this CPU in a non-preemptible program.
        unsafe {
            (*start).start_ns = bpf_ktime_get_ns();
            (*start).vector = vector as u32;
            (*start).in_ksoftirqd = u32::from(in_ksoftirqd);
        }
    }
    0
}

/// Whether the current task is `ksoftirqd/N`. Reads the name with the raw helper into two
/// words and compares integers: aya's wrapper zero-fills a byte array and a byte-slice prefix
/// test becomes `memcmp`, both compiled to builtin BPF subprograms (see [`zero_in_place`]).
#[inline(always)]
fn current_comm_is_ksoftirqd() -> bool {
    let mut comm = MaybeUninit::<[u64; 2]>::uninit();
    // SAFETY: the buffer is 16 writable bytes; the kernel copies the NUL-padded task name.
    let rc =
        unsafe { aya_ebpf::helpers::generated::bpf_get_current_comm(comm.as_mut_ptr().cast(), 16) };
    if rc != 0 {
        return false;
    }
    // SAFETY: the helper succeeded and wrote all 16 bytes.
    let [first, second] = unsafe { comm.assume_init() };
    first == u64::from_le_bytes(*b"ksoftirq")
        && second & 0xffff == u64::from(u16::from_le_bytes(*b"d/"))
}

/// `softirq_exit(unsigned int vec_nr)`.
#[raw_tracepoint(tracepoint = "softirq_exit")]
pub fn cnitrace_si_out(ctx: RawTracePointContext) -> i32 {
    let vector: u64 = ctx.arg(0);
    let Some(start) = SOFTIRQ_START.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU slot, only this CPU touches it.
    let start = unsafe { &mut *start };
    // An exit without its entry (attached mid-handler) is skipped rather than mis-timed.
    if start.start_ns == 0 || u64::from(start.vector) != vector {
        return 0;
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let elapsed = unsafe { bpf_ktime_get_ns() }.saturating_sub(start.start_ns);
    start.start_ns = 0;
    if let Some(stats) = SOFTIRQ.get_ptr_mut(vector as u32) {
        // SAFETY: per-CPU value, written only by this CPU.
        unsafe {
            (*stats).count += 1;
            (*stats).ns += elapsed;
            if start.in_ksoftirqd != 0 {
                (*stats).ksoftirqd_count += 1;
                (*stats).ksoftirqd_ns += elapsed;
            }
        }
    }
    0
}

/// Iterations of busy work `lab_tc_work` does per packet, set at load time.
#[unsafe(no_mangle)]
static LAB_WORK_LOOPS: u32 = 0;

#[map(name = "LAB_SINK")]
static LAB_SINK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The project's own datapath program (not cnitrace's instrumentation, hence no `cnitrace_`
/// prefix): a tc program with a known, adjustable amount of work per packet, which lets tests
/// and the lab check that BPF costs are measured and attributed.
#[classifier]
pub fn lab_tc_work(ctx: TcContext) -> i32 {
    let loops = global(&LAB_WORK_LOOPS) as u32;
    let mut acc = u64::from(ctx.len());
    for i in 0..LAB_MAX_LOOPS {
        if i >= loops {
            break;
        }
        acc = acc
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(u64::from(i));
    }
    // Storing the result keeps the loop from being optimised away.
    if let Some(sink) = LAB_SINK.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *sink = acc };
    }
    0 // TC_ACT_OK: the packet continues unchanged.
}

#[map(name = "LAB_ROUTES")]
static LAB_ROUTES: HashMap<u32, LabRoute> = HashMap::with_max_entries(LAB_MAX_ROUTES, 0);

const TC_ACT_OK: i32 = 0;
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// Offset of the IPv4 destination address in an Ethernet frame.
const IPV4_DST_OFFSET: usize = 14 + 16;

/// The lab's Cilium-like datapath: on the ingress of a pod's host-side device, IPv4 packets to
/// a known pod are sent straight out of that pod's host-side device (bpf_redirect), skipping
/// the host's IP stack and netfilter, as Cilium's per-endpoint programs do.
#[classifier]
pub fn lab_redirect(ctx: TcContext) -> i32 {
    try_lab_redirect(&ctx).unwrap_or(TC_ACT_OK)
}

fn try_lab_redirect(ctx: &TcContext) -> Result<i32, i64> {
    let ethertype: u16 = ctx.load(12)?;
    if ethertype != ETH_P_IP_BE {
        return Ok(TC_ACT_OK);
    }
    let destination: u32 = ctx.load(IPV4_DST_OFFSET)?;
    // SAFETY: the value is read in place and not kept beyond this program run.
    let Some(route) = (unsafe { LAB_ROUTES.get(destination) }) else {
        return Ok(TC_ACT_OK);
    };
    // The map value is passed to the helper in place: no copy, no compiler memcpy.
    ctx.store(0, &route.macs, 0)?;
    // SAFETY: plain helper call; it only records the target device for the kernel.
    Ok(unsafe { bpf_redirect(route.ifindex, 0) } as i32)
}

// ---- Tracing backend: exclusive time per component with a per-CPU nesting stack ----

#[map(name = "CNT_TRACE")]
static TRACE: PerCpuArray<TraceCost> = PerCpuArray::with_max_entries(MAX_TRACE_COMPONENTS, 0);

#[map(name = "CNT_TRACE_DEPTH")]
static TRACE_DEPTH: PerCpuArray<TraceDepth> = PerCpuArray::with_max_entries(1, 0);

/// The per-CPU nesting stack's frames; entries 0..depth are in use. A map rather than an array
/// in one value: each frame is its own lookup, which the verifier bounds without arithmetic.
#[map(name = "CNT_TRACE_FRAMES")]
static TRACE_FRAMES: PerCpuArray<TraceFrame> =
    PerCpuArray::with_max_entries(TRACE_MAX_DEPTH as u32, 0);

#[map(name = "CNT_TRACE_FUNCS")]
static TRACE_FUNCTIONS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_TRACE_FUNCTIONS, 0);

#[map(name = "CNT_TRACE_SLOTS")]
static TRACE_SLOTS_MAP: Array<u32> = Array::with_max_entries(TRACE_SLOTS, 0);

/// What happened to the component being charged.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Charge {
    /// It returned.
    Completed,
    /// It called a traced function of its own or another component.
    Nested,
}

fn charge(component: u32, exclusive_ns: u64, inclusive_ns: u64, event: Charge) {
    if let Some(cost) = TRACE.get_ptr_mut(component) {
        // SAFETY: per-CPU slot; tracing programs on one CPU do not preempt each other.
        unsafe {
            (*cost).exclusive_ns += exclusive_ns;
            (*cost).inclusive_ns += inclusive_ns;
            match event {
                Charge::Completed => (*cost).hits += 1,
                Charge::Nested => (*cost).nested_calls += 1,
            }
        }
    }
}

/// A traced function of `component` starts: the function below it on the stack stops
/// accumulating exclusive time.
fn trace_enter(component: u32) {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(state) = TRACE_DEPTH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU value, only this CPU touches it, and probe programs do not nest.
    let state = unsafe { &mut *state };
    let depth = state.depth;
    if depth >= TRACE_MAX_DEPTH as u32 {
        state.overflow += 1;
        count_fault(fault::TRACE_OVERFLOW);
        return;
    }
    if depth > 0
        && let Some(below) = TRACE_FRAMES.get_ptr(depth - 1)
    {
        // SAFETY: per-CPU frame of this CPU.
        let below = unsafe { &*below };
        charge(
            below.component,
            now.saturating_sub(below.resumed_ns),
            0,
            Charge::Nested,
        );
    }
    let Some(frame) = TRACE_FRAMES.get_ptr_mut(depth) else {
        return;
    };
    // SAFETY: as above.
    unsafe {
        (*frame).component = component;
        (*frame).entered_ns = now;
        (*frame).resumed_ns = now;
    }
    state.depth = depth + 1;
}

/// The innermost traced function returns: it is charged, and its caller resumes.
fn trace_exit() {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(state) = TRACE_DEPTH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: as in trace_enter.
    let state = unsafe { &mut *state };
    if state.overflow > 0 {
        state.overflow -= 1;
        return;
    }
    let depth = state.depth;
    if depth == 0 {
        count_fault(fault::TRACE_UNMATCHED_EXIT);
        return;
    }
    if let Some(top) = TRACE_FRAMES.get_ptr(depth - 1) {
        // SAFETY: per-CPU frame of this CPU.
        let top = unsafe { &*top };
        charge(
            top.component,
            now.saturating_sub(top.resumed_ns),
            now.saturating_sub(top.entered_ns),
            Charge::Completed,
        );
    }
    state.depth = depth - 1;
    if depth > 1
        && let Some(caller) = TRACE_FRAMES.get_ptr_mut(depth - 2)
    {
        // SAFETY: as above.
        unsafe { (*caller).resumed_ns = now };
    }
}

/// Entry of any function traced with a kprobe: the component comes from the address.
#[kprobe]
pub fn cnitrace_kprobe(ctx: ProbeContext) -> u32 {
    // SAFETY: plain helper call on this program's own context.
    let ip = unsafe { bpf_get_func_ip(ctx.as_ptr()) };
    // SAFETY: the value is read in place, not kept.
    match unsafe { TRACE_FUNCTIONS.get(ip) } {
        Some(&component) => trace_enter(component),
        None => count_fault(fault::TRACE_UNKNOWN_FUNCTION),
    }
    0
}

#[kretprobe]
pub fn cnitrace_kretprobe(_ctx: RetProbeContext) -> u32 {
    trace_exit();
    0
}

fn enter_slot(slot: u32) -> u32 {
    if let Some(&component) = TRACE_SLOTS_MAP.get(slot) {
        trace_enter(component);
    }
    0
}

/// fentry/fexit pairs, one per function traced through a BPF trampoline (each program is
/// bound to its target when loaded).
macro_rules! trampoline_slots {
    ($($slot:literal => $entry:ident, $exit:ident;)*) => {
        $(
            #[fentry]
            pub fn $entry(_ctx: FEntryContext) -> u32 {
                enter_slot($slot)
            }

            #[fexit]
            pub fn $exit(_ctx: FExitContext) -> u32 {
                trace_exit();
                0
            }
        )*
    };
}

trampoline_slots! {
    0 => cnitrace_fentry_0, cnitrace_fexit_0;
    1 => cnitrace_fentry_1, cnitrace_fexit_1;
    2 => cnitrace_fentry_2, cnitrace_fexit_2;
    3 => cnitrace_fentry_3, cnitrace_fexit_3;
    4 => cnitrace_fentry_4, cnitrace_fexit_4;
    5 => cnitrace_fentry_5, cnitrace_fexit_5;
    6 => cnitrace_fentry_6, cnitrace_fexit_6;
    7 => cnitrace_fentry_7, cnitrace_fexit_7;
    8 => cnitrace_fentry_8, cnitrace_fexit_8;
    9 => cnitrace_fentry_9, cnitrace_fexit_9;
    10 => cnitrace_fentry_10, cnitrace_fexit_10;
    11 => cnitrace_fentry_11, cnitrace_fexit_11;
    12 => cnitrace_fentry_12, cnitrace_fexit_12;
    13 => cnitrace_fentry_13, cnitrace_fexit_13;
    14 => cnitrace_fentry_14, cnitrace_fexit_14;
    15 => cnitrace_fentry_15, cnitrace_fexit_15;
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
