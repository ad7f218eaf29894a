//! The exact softirq timer: per vector, handler runs and time, and the part run in ksoftirqd.

use core::mem::MaybeUninit;

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{map, raw_tracepoint},
    maps::PerCpuArray,
    programs::RawTracePointContext,
};
use cnitrace_common::{NR_SOFTIRQS, SoftirqStart, SoftirqStats};

#[map(name = "CNT_SOFTIRQ")]
static SOFTIRQ: PerCpuArray<SoftirqStats> = PerCpuArray::with_max_entries(NR_SOFTIRQS, 0);

#[map(name = "CNT_SOFTIRQ_START")]
static SOFTIRQ_START: PerCpuArray<SoftirqStart> = PerCpuArray::with_max_entries(1, 0);

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
