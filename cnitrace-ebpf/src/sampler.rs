//! The stack sampler: a `perf_event` program that aggregates kernel stacks per CPU, keyed by
//! the frames' hash, with the sample periods summed.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{bpf_get_current_pid_tgid, generated::bpf_get_stack},
    macros::{map, perf_event},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
    programs::PerfEventContext,
};
use cnitrace_common::{
    FNV_OFFSET, FNV_PRIME, MAX_SAMPLE_KEYS, MAX_STACKS, SAMPLE_FLAG_IDLE_TASK, SAMPLE_FLAG_USER,
    STACK_DEPTH, SampleKey, SampleValue, StackFrames, fault,
};

use crate::shared::count_fault;

/// Stack table keyed by the frames' hash. Not preallocated: memory grows with distinct stacks
/// only, and a 64-bit key makes collisions negligible (a stack-trace map's buckets collide).
#[map(name = "CNT_STACKS")]
static STACKS: HashMap<u64, StackFrames> = HashMap::with_max_entries(MAX_STACKS, BPF_F_NO_PREALLOC);
/// Per-CPU scratch for copying a stack (too large for the 512-byte BPF stack).
#[map(name = "CNT_SCRATCH")]
static SCRATCH: PerCpuArray<StackFrames> = PerCpuArray::with_max_entries(1, 0);

/// The current epoch, set by user space (see `cnitrace_common::map::EPOCH`).
#[map(name = "CNT_EPOCH")]
static EPOCH: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "CNT_SAMPLES")]
static SAMPLES: PerCpuHashMap<SampleKey, SampleValue> =
    PerCpuHashMap::with_max_entries(MAX_SAMPLE_KEYS, 0);

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
    let epoch = EPOCH.get(0).copied().unwrap_or(0);
    let stack_hash = match record_kernel_stack(ctx, epoch) {
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
        epoch,
    };
    add_sample(&key, period)
}

/// Copies the sampled kernel stack, stores it under its hash (the epoch mixed in: each epoch
/// stores its own copy), returns the hash; `None` when the sample hit user mode (no kernel
/// frames).
#[inline(always)]
fn record_kernel_stack(ctx: &PerfEventContext, epoch: u32) -> Result<Option<u64>, u32> {
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
    let mut hash = (FNV_OFFSET ^ u64::from(epoch)).wrapping_mul(FNV_PRIME);
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
